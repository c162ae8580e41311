"""Device memory of the compiled Imagine Flash step, testbed and SD1.5 size: what remat and bf16 change.

  python -m benchmarks.memory [--sizes testbed,sd15] [--batch-testbed 16] [--batch-sd15 8]

No weights exist: the fused training step (flash_jax/train/step.py on methods/imagine_flash.py) is
lowered on abstract inputs, `jax.ShapeDtypeStruct`s from `jax.eval_shape` of the method's own
`init` / `init_discriminator` / `load_frozen` and the optimizer's init, then compiled for this
machine's backend, and `compiled.memory_analysis()` read: arguments (train state + frozen models +
batch), outputs, temporaries (activations kept for the backward pass, workspace) and the donated
bytes aliased between state in and state out. `total` = arguments + outputs + temporaries −
aliased is the device memory the step needs. XLA's buffer assignment differs between backends:
CPU numbers show what remat and bf16 change, not a GPU's exact footprint (benchmarks/gpu.py reads
the same analysis on the accelerator). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from flash_jax.methods import imagine_flash as ifl
from flash_jax.pipeline import T2I
from flash_jax.train import loop
from flash_jax.train import step as step_lib

# precision -> (compute dtype, UNet/VAE parameter dtype)
VARIANTS = {
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "float32"),
    "bf16p": ("bfloat16", "bfloat16"),
}


def testbed_config(dtype: str, param_dtype: str, remat: bool, batch: int) -> common.Config:
    """configs/shapes/imagine_flash.py (variant 3) with the compute dtype, the UNet's parameter
    dtype and remat set."""
    from configs.shapes import imagine_flash as if_config  # ml_collections: testbed only

    config = common.Config(if_config.get_config("3").to_dict())
    config["model"] |= dict(dtype=dtype, remat=remat)
    config["model"]["unet"]["param_dtype"] = jnp.dtype(param_dtype)
    config["batch_size"] = batch
    return config


def nbytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def step_memory(config: common.Config, cached: bool = False) -> dict[str, Any]:
    """Lowers and compiles the fused step on abstract inputs; its memory analysis in bytes."""
    model = T2I.from_config(config)
    method = ifl.make(config)
    tx = loop.make_optimizer(config.optimizer)
    disc_tx = loop.make_optimizer(config.disc_optimizer)
    key = jax.random.PRNGKey(0)
    teacher = jax.eval_shape(model.init, key)
    vae = jax.eval_shape(functools.partial(common.init_autoencoder, model), key)
    build = functools.partial(common.imagine_flash_state, config, tx, disc_tx)
    state = jax.eval_shape(build, key, teacher, vae)
    frozen = jax.eval_shape(functools.partial(common.imagine_flash_frozen, config), teacher, vae)
    raw = common.imagine_flash_batch(
        method, model, config.batch_size, config.data.image_size, cached=cached
    )
    batch = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), raw)
    step = step_lib.make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    start = time.perf_counter()
    compiled = step_lib.compile_train_step(step).lower(state, frozen, batch).compile()
    return {
        "compile_s": time.perf_counter() - start,
        "state_bytes": nbytes(state),
        "frozen_bytes": nbytes(frozen),
        "unet_params": int(sum(x.size for x in jax.tree.leaves(teacher["unet"]))),
        **common.memory_of(compiled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="testbed,sd15")
    parser.add_argument("--batch-testbed", type=int, default=16)
    parser.add_argument("--batch-sd15", type=int, default=8)
    parser.add_argument(
        "--variants",
        default="fp32,fp32+remat,bf16,bf16+remat,bf16p+remat",
        help="fp32 | bf16 (bf16 compute, fp32 params) | bf16p (bf16 params too), each [+remat]",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"args": vars(args), "platform": common.platform_info(), "rows": {}}
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            precision, _, remat = variant.partition("+")
            if precision not in VARIANTS or remat not in ("", "remat"):
                raise ValueError(
                    f"--variants: {variant!r} is not one of {sorted(VARIANTS)}[+remat]"
                )
            dtype, param_dtype = VARIANTS[precision]
            if size == "testbed":
                config = testbed_config(dtype, param_dtype, bool(remat), args.batch_testbed)
            elif size == "sd15":
                config = common.sd15_config(
                    dtype=dtype,
                    param_dtype=param_dtype,
                    remat=bool(remat),
                    batch_size=args.batch_sd15,
                )
            else:
                raise ValueError(f"--sizes: unknown size {size!r} (testbed, sd15)")
            name = f"{size} {variant} batch {config.batch_size}"
            print(name, "...", flush=True)
            try:
                results["rows"][name] = step_memory(config, cached=size == "sd15")
            except Exception as e:  # record and go on to the next variant
                results["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
            path = common.write_json(results, "memory.json", args.out)
    rows = []
    gib = lambda v: v / 2**30  # noqa: E731
    for name, r in results["rows"].items():
        if "error" in r:
            rows.append([name, r["error"], "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                gib(r["state_bytes"]),
                gib(r["frozen_bytes"]),
                gib(r["temp_bytes"]),
                gib(r["alias_bytes"]),
                gib(r["total_bytes"]),
                r["compile_s"],
            ]
        )
    print(f"\nFused Imagine Flash step memory, {results['platform']['devices']} (GiB)")
    header = ["config", "train state", "frozen", "temporaries", "aliased", "total", "compile s"]
    print(common.table(rows, header))
    print("wrote", path)


if __name__ == "__main__":
    main()
