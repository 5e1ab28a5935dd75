"""Packaging beyond what pyproject.toml can say: the top-level `configs/` tree (the one users edit in a clone) is
also shipped inside the package, as `dynconv/configs/`, so a regular install (`pip install <path or git URL>`)
has its configs without a clone. One source: the build maps the folder, nothing is copied into the repository.
dynconv/paths.py finds the tree in either place."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dynconv", "dynconv.*"]) + ["dynconv.configs"],
    package_dir={"dynconv.configs": "configs"},
    # Every YAML of the tree, at any depth (setuptools >= 62.3 expands "**"); configs/local/ is the user's own.
    package_data={"dynconv.configs": ["*.yaml", "**/*.yaml"], "dynconv": ["**/*.json", "**/*.yaml", "**/*.csv"]},
    exclude_package_data={"dynconv.configs": ["local/*"]},
)
