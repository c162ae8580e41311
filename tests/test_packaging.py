"""pyproject.toml declares what requirements.txt pins, and the `flash-jax` console script."""

import re
import tomllib
from pathlib import Path

from flash_jax import main

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_dependencies_are_the_runtime_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [re.sub(r"\s*#.*", "", line) for line in lines]
    assert sorted(project["dependencies"]) == sorted(p for p in pins if p)
    module, function = project["scripts"]["flash-jax"].split(":")
    assert module == "flash_jax.main" and getattr(main, function) is main.console
