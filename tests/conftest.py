"""Test-session setup: a persistent XLA compilation cache shared by every test process, and the
`tiny_assets` fixture (random-weight tiny models saved as parameter files, and the judge's image
size beside it, as in assets/shapes).

The trainer tests compile the same tiny programs in several processes (resume after SIGKILL, CLI
refusals); caching the executables keeps the suite within its time budget on 2 cores. So does
compiling at XLA's lowest backend optimization level: the tests run each program a few times on
tiny shapes, where LLVM's optimisation costs far more than it saves (about a third of the suite).
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (  # before jax starts its backend; inherited by subprocesses
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
CACHE.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))  # inherited by subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Random-weight tiny testbed models saved like the shipped assets/shapes/*.msgpack files:
    `teacher.msgpack` ({"unet", "text"}), `autoencoder.msgpack` and `judge.msgpack` (16x16
    images). The distillation methods and evaluation load them by path, as they load real ones."""
    import flax
    import numpy as np

    from configs.shapes import imagine_flash
    from flash_jax.eval import judge
    from flash_jax.models import autoencoder
    from flash_jax.t2i import T2I

    directory = tmp_path_factory.mktemp("tiny_assets")
    config = imagine_flash.get_config("tiny")
    model = T2I.from_config(config)
    judge_config = judge.JudgeConfig(stem=4, channels=(8, 8), features=16)
    trees = {  # jitted: one compile each instead of op-by-op initialisation
        "teacher": jax.jit(model.init)(jax.random.PRNGKey(0)),
        "autoencoder": jax.jit(lambda k: autoencoder.init_params(model.autoencoder, k))(
            jax.random.PRNGKey(1)
        ),
        "judge": jax.jit(lambda k: judge.init_params(judge_config, k, config.data.image_size))(
            jax.random.PRNGKey(2)
        ),
    }
    for name, tree in trees.items():
        data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
        (directory / f"{name}.msgpack").write_bytes(data)
    (directory / "judge.json").write_text(f'{{"image_size": {config.data.image_size}}}')
    return directory


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies trusted remote code to HF_MODULES_CACHE: a temporary one here."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
