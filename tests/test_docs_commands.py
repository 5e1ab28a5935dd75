"""Docs that cannot rot: every `python train.py ...`, `python eval.py ...`, `torchrun ... train.py ...` and
`python scripts/<name>.py ...` command in a fenced bash block of README.md or docs/*.md composes its config
(nothing runs), so a renamed config group, key or option fails here instead of in a user's terminal.

train.py commands are composed like Hydra composes them (sweeps of `-m` expanded value by value, `hydra.*` and
`hydra/launcher=...` overrides included) and their model is validated on the meta device (operator knobs,
backbone, attention, task); the scripts compose through their own `config(argv)`, which validates what their
`main` would. Environment assignments in front of a command (`DYNCONV_CONV_ALGORITHM=model python ...`) are
applied while it composes. Paths that only exist on a user's machine (`data.root=/imagenet`,
`checkpoint=outputs/<run>/...`) are not checked: composing does not read them.

The shell scripts of scripts/ (the prepared GPU run, scripts/gpu_check.sh) are read the same way, each line a
command (a leading `step` wrapper dropped): minutes on a lent GPU must not be lost to a misspelt override.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.global_hydra import GlobalHydra

from dynconv.config import register_resolvers, validate_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SHELL_SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
SHELL_WRAPPERS = ("step",)  # shell functions in front of a command (gpu_check.sh's `step`: count failures, go on)
FENCE = re.compile(r"^```(?:bash|sh|shell|console)\s*\n(.*?)^```", re.MULTILINE | re.DOTALL)
APPS = {"train.py": "train", "eval.py": "eval"}  # Hydra apps: the config they compose
SEPARATORS = {"&&", "||", ";", "|", "&"}


def _commands(text: str, shell: bool = False):
    """(script, args, env) for every dynconv command in the fenced bash blocks of `text` (`shell`: all of `text`,
    a shell script)."""
    for block in [text] if shell else FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
            segment: list[str] = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    found = _dynconv_command(segment)
                    if found:
                        yield found
                    segment = []
                else:
                    segment.append(token)


def _dynconv_command(tokens: list[str]):
    if tokens and tokens[0] in SHELL_WRAPPERS:
        tokens = tokens[1:]
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        key, _, value = tokens.pop(0).partition("=")
        env[key] = value
    if not tokens or tokens[0] not in ("python", "python3", "torchrun"):
        return None
    for index, token in enumerate(tokens[1:], start=1):
        if token in APPS or (token.startswith("scripts/") and token.endswith(".py")):
            return token, [t for t in tokens[index + 1:]], env
        if not token.startswith("-") and "=" not in token and tokens[0] != "torchrun":
            return None  # python <something else>: not a dynconv command
    return None


def _documented():
    found = []
    for path in DOC_FILES:
        for script, args, env in _commands(path.read_text()):
            found.append(pytest.param(script, args, env, id=f"{path.name}: {script} {' '.join(args)}"[:150]))
    for path in SHELL_SCRIPTS:
        for script, args, env in _commands(path.read_text(), shell=True):
            found.append(pytest.param(script, args, env, id=f"{path.name}: {script} {' '.join(args)}"[:150]))
    return found


COMMANDS = _documented()


def test_the_docs_hold_commands_of_every_entry_point():
    """The README's commands are found (a broken extractor must not pass vacuously)."""
    scripts = {param.values[0] for param in COMMANDS}
    assert {"train.py", "eval.py", "scripts/profile.py", "scripts/bench.py"} <= scripts, scripts
    assert len(COMMANDS) >= 10
    in_scripts = [param for param in COMMANDS if param.id.startswith("gpu_check.sh: ")]
    assert len(in_scripts) >= 8 and any("bench.amp=fp16" in param.id for param in in_scripts)


def _expand_sweeps(args: list[str]) -> list[list[str]]:
    """`-m a=1,2 b=x` -> [[a=1, b=x], [a=2, b=x]] (each swept value once, the others at their first)."""
    overrides = [arg for arg in args if not arg.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    runs, base = [], []
    for arg, override in zip(overrides, parsed):
        base.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
                    if override.is_sweep_override() else arg)
    for position, override in enumerate(parsed):
        if override.is_sweep_override():
            for value in override.sweep_string_iterator():
                runs.append(base[:position] + [f"{override.get_key_element()}={value}"] + base[position + 1:])
    return runs or [base]


def _load_script(script: str):
    path = REPO / script
    assert path.is_file(), f"{script} is documented but does not exist"
    spec = importlib.util.spec_from_file_location(f"dynconv_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "config", None)), f"{script} has no config(argv) to compose its arguments"
    return module


@pytest.mark.parametrize(("script", "args", "env"), COMMANDS)
def test_documented_command_composes(script, args, env, monkeypatch, capsys):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    register_resolvers()
    if script in APPS:
        for overrides in _expand_sweeps(args):
            GlobalHydra.instance().clear()
            with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
                cfg = compose(config_name=APPS[script], overrides=overrides, return_hydra_config=True)
            if script == "train.py":
                validate_model_config(cfg)
        return
    module = _load_script(script)
    try:
        module.config(args)
    except SystemExit as error:  # compose_or_exit: exit 2 with the reason on stderr
        pytest.fail(f"{script} {' '.join(args)}: exit {error.code}: {capsys.readouterr().err.strip()}")
