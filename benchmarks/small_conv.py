"""Convs on maps smaller than their kernel, and the fixed cost of a testbed UNet call (CPU).

  python -m benchmarks.small_conv [--iters 10] [--out FILE]

Three tables (docs/performance.md, "Convs on maps smaller than their kernel"):
1. One 3×3 conv, jitted alone: `lax.conv_general_dilated` against the patch matmul of
   `flash_jax.models.layers.conv_general_dilated`, at the testbed's map sizes.
2. The testbed samplers (student 3 steps, teacher 25 CFG steps, batch 16) built with either conv,
   compiled side by side in one process and timed in interleaved rounds.
3. One bare testbed UNet call at batch 1, 16 and 32 (interleaved): its fixed cost per call is what
   keeps the student's speedup under the ratio of network evaluations.
Random weights. Prints the tables and writes JSON (benchmarks/results/small_conv.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from flash_jax import sampling
from flash_jax.models import layers
from flash_jax.t2i import T2I

CONV_SHAPES = ((16, 2, 2, 64, 64), (16, 2, 2, 128, 64), (32, 2, 2, 128, 64), (16, 4, 4, 64, 64))
CONV_SHAPES += ((16, 8, 8, 32, 32),)  # (B, H, W, C_in, C_out)
IMPLEMENTATIONS = {"lax": jax.lax.conv_general_dilated, "patches": layers.conv_general_dilated}


def forced_patches(lhs, rhs, window_strides, padding, dimension_numbers):
    """The patch matmul at every map size (`layers.conv` takes it only below the kernel size)."""
    del window_strides, dimension_numbers  # stride 1, NHWC / HWIO: the only case benchmarked
    return layers.patch_conv(lhs, rhs, padding)


def conv_table(iters: int) -> list[dict]:
    rows = []
    for b, h, w, c_in, c_out in CONV_SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (b, h, w, c_in))
        kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, c_out))
        dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        calls = {}
        for name, conv in (("lax", jax.lax.conv_general_dilated), ("patches", forced_patches)):
            static = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=dims)
            calls[name] = functools.partial(jax.jit(functools.partial(conv, **static)), x, kernel)
            common.first_call_s(calls[name])
        times = common.interleaved(calls, iters=iters)
        row = {"shape": [b, h, w, c_in, c_out]}
        row |= {f"{name}_us": common.summary(t)["median_ms"] * 1e3 for name, t in times.items()}
        rows.append(row)
    return rows


def sampler_table(model: T2I, params: dict, iters: int, batch: int = 16) -> dict:
    """Student 3 / teacher 25 CFG with each conv implementation; `layers.conv` reads the module
    global at trace time, so each program is traced with one implementation in place."""
    x_T = jax.random.normal(jax.random.PRNGKey(2), model.latent_shape(batch, 32))
    tokenizer = model.tokenizer()
    cond, uncond = (
        jax.jit(model.encode_text)(params["text"], jnp.asarray(tokenizer([prompt] * batch)))
        for prompt in ("a red circle and a blue square", "")
    )
    samplers = {
        "student 3": sampling.SamplerConfig(num_steps=3, noise_correction=True),
        "teacher 25 CFG": sampling.SamplerConfig(num_steps=25, guidance_scale=4.0),
    }
    patched = layers.conv_general_dilated
    calls = {}
    try:
        for impl, conv in IMPLEMENTATIONS.items():
            layers.conv_general_dilated = conv
            for name, config in samplers.items():
                steps = dataclasses.asdict(sampling.plan(model.schedule, config))
                guided = config.guidance_scale != 1

                def run(p, x, c, u, steps=steps, config=config):
                    pred = model.schedule.prediction_type
                    return sampling.run_plan(model.apply_unet, p, x, steps, c, u, config, pred)[0]

                fn = jax.jit(run)
                key = f"{name}, {impl}"
                calls[key] = functools.partial(
                    fn, params["unet"], x_T, cond, uncond if guided else None
                )
                common.first_call_s(calls[key])  # traced (and compiled) with `conv` in place
    finally:
        layers.conv_general_dilated = patched
    times = common.interleaved(calls, iters=iters)
    return {name: common.summary(t)["median_ms"] for name, t in times.items()}


def call_table(model: T2I, params: dict, iters: int) -> dict:
    apply = jax.jit(model.apply_unet)
    calls = {}
    for b in (1, 16, 32):
        x = jax.random.normal(jax.random.PRNGKey(3), model.latent_shape(b, 32))
        context = jnp.zeros((b, model.max_length, model.unet.cross_attention_dim[0]))
        calls[f"batch {b}"] = functools.partial(
            apply, params["unet"], x, jnp.full((b,), 500.0), context
        )
        common.first_call_s(calls[f"batch {b}"])
    times = common.interleaved(calls, iters=iters)
    return {name: common.summary(t)["median_ms"] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from configs.shapes import teacher as teacher_config  # ml_collections: testbed only

    model = T2I.from_config(teacher_config.get_config())
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    convs = conv_table(max(args.iters, 50))
    samplers = sampler_table(model, params, args.iters)
    unet_calls = call_table(model, params, args.iters)

    print(f"\nOne 3×3 conv, {common.platform_info()['devices']}")
    header = ["input (B, H, W, C_in) → C_out", "lax µs", "patch matmul µs"]
    rows = [
        [f"{tuple(r['shape'][:4])} → {r['shape'][4]}", r["lax_us"], r["patches_us"]] for r in convs
    ]
    print(common.table(rows, header))
    print("\nSamplers, batch 16 (median ms, interleaved)")
    print(common.table([[k, v] for k, v in samplers.items()], ["program", "ms"]))
    for impl in IMPLEMENTATIONS:
        ratio = samplers[f"teacher 25 CFG, {impl}"] / samplers[f"student 3, {impl}"]
        print(f"speedup with {impl}: {ratio:.1f}×")
    print("\nBare UNet call (median ms, interleaved)")
    print(common.table([[k, v] for k, v in unet_calls.items()], ["call", "ms"]))
    per_latent = (unet_calls["batch 32"] - unet_calls["batch 16"]) / 16
    fixed = unet_calls["batch 16"] - 16 * per_latent
    print(f"fixed cost per call ≈ {fixed:.1f} ms + {per_latent:.2f} ms per latent")
    result = {
        "args": vars(args),
        "platform": common.platform_info(),
        "convs": convs,
        "samplers_ms": samplers,
        "unet_call_ms": unet_calls,
        "fixed_ms": fixed,
        "per_latent_ms": per_latent,
    }
    print("wrote", common.write_json(result, "small_conv.json", args.out))


if __name__ == "__main__":
    main()
