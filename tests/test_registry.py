"""Operators, backbones, attention add-ons and tasks are found by name: every module of their package is
imported (and so registers itself), so adding a file is enough; docs/extending.md relies on it."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap

import pytest

from dynconv.registry import Registry, UnknownNameError, import_submodules

PACKAGES = ["dynconv.ops", "dynconv.backbones", "dynconv.attention", "dynconv.tasks"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_of_a_registering_package_is_imported(package):
    module = importlib.import_module(package)
    names = [info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_")]
    assert names
    missing = [name for name in names if f"{package}.{name}" not in sys.modules]
    assert not missing, missing


def test_a_new_module_registers_without_an_import_list(tmp_path, monkeypatch):
    """A file dropped into a package that calls import_submodules is registered: no list to edit."""
    package = tmp_path / "extra_ops"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from dynconv.registry import Registry, import_submodules
        THINGS = Registry("thing", "thing.name")
        import_submodules(__name__)
    """))
    (package / "gated.py").write_text(textwrap.dedent("""
        from extra_ops import THINGS
        @THINGS.register("gated")
        class Gated:
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("extra_ops")
    try:
        assert module.THINGS.names() == ["gated"]
    finally:
        for name in [n for n in sys.modules if n == "extra_ops" or n.startswith("extra_ops.")]:
            del sys.modules[name]


def test_unknown_name_lists_the_registered_ones():
    registry: Registry[int] = Registry("widget", "widget.name")
    registry.register("a")(1)
    registry.register("b")(2)
    with pytest.raises(UnknownNameError, match=r"widget.name='c' is not a known widget; valid values: a, b"):
        registry.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(3)
    assert registry.items() == [("a", 1), ("b", 2)]


def test_import_submodules_skips_private_modules(tmp_path, monkeypatch):
    package = tmp_path / "pkg_private"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_hidden.py").write_text("raise RuntimeError('a private module must not be imported')\n")
    (package / "shown.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import_submodules("pkg_private")
        assert "pkg_private.shown" in sys.modules and "pkg_private._hidden" not in sys.modules
    finally:
        for name in [n for n in sys.modules if n.startswith("pkg_private")]:
            del sys.modules[name]
