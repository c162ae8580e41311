"""Test-session setup: a persistent XLA compilation cache shared by every test process.

The trainer tests compile the same tiny programs in several processes (resume after SIGKILL, CLI
refusals); caching the executables keeps the suite within its time budget on 2 cores.
"""

import os
from pathlib import Path

import jax

CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
CACHE.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))  # inherited by subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
