"""pyproject.toml declares what requirements.txt pins, and the `flash-jax` console script."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_dependencies_are_the_runtime_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [re.sub(r"\s*#.*", "", line) for line in lines]
    assert sorted(project["dependencies"]) == sorted(p for p in pins if p)
    module, function = project["scripts"]["flash-jax"].split(":")
    assert module == "flash_jax.main" and function == "console"
    # In a fresh interpreter: flash_jax.main defines absl flags that other test modules
    # (flash_jax.demo) define too, so it is not imported into the test process.
    probe = f"import {module}; assert callable({module}.{function})"
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)
