"""The persistent compilation cache flash_jax.main turns on (WORKDIR/compilation_cache): a second
start of a run finds its train step there instead of compiling it again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(workdir: Path, steps: int, *flags: str) -> None:
    cmd = [sys.executable, "-m", "flash_jax.main", "--config=configs/shapes/autoencoder.py:tiny",
           f"--workdir={workdir}", f"--config.total_steps={steps}", *flags]  # fmt: skip
    # Every program is cached, however fast it compiles (JAX's default skips those under 1 s).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # two starts of a tiny run (~80 s, then ~10 s here)
def test_a_resumed_run_does_not_recompile_the_train_step(tmp_path):
    run = tmp_path / "run"
    train(run, 2)
    cache = run / "compilation_cache"
    first = sorted(p.name for p in cache.iterdir())
    assert [n for n in first if n.startswith("jit_step-")], first  # the train step was cached
    train(run, 4)  # resumes from step 2
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # A recompiled program would have been written under a new key: every one was found.
    assert sorted(p.name for p in cache.iterdir()) == first

    train(tmp_path / "off", 1, "--compilation_cache=none")
    assert not (tmp_path / "off" / "compilation_cache").exists()
