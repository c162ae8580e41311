"""Cost of the fused Imagine Flash training step against its parts, on the Shapes testbed config.

  python -m benchmarks.imagine_flash_step [--variant 3] [--batch 32] [--iters 5] [--out FILE]

Random weights (teacher = student at init, random VAE): timing does not depend on training. Parts,
each jitted alone: the student rollout (no grad), the student forward+backward on x̂0, the teacher
k-step CFG solve, the discriminator update (its own side only: the generator's adversarial pass and
the optimizer/EMA updates are not yet timed separately, so the parts undercount the step).
Prints a table (ms per call, share of the sum) and the number of compiled executables of the fused
step after several calls (must be 1), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from configs.shapes import imagine_flash as if_config
from flash_jax.methods import imagine_flash as ifl
from flash_jax.models import autoencoder
from flash_jax.pipeline import T2I
from flash_jax.train import loop
from flash_jax.train import state as state_lib
from flash_jax.train import step as step_lib


def timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    start = time.perf_counter()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3", help="configs/shapes/imagine_flash.py variant")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/imagine_flash_step.json")
    args = parser.parse_args()

    config = if_config.get_config(args.variant)
    model = T2I.from_config(config)
    teacher = model.init(jax.random.PRNGKey(0))
    vae = autoencoder.init_params(model.autoencoder, jax.random.PRNGKey(1))
    tmp = Path(tempfile.mkdtemp())
    for name, tree in (("teacher", teacher), ("vae", vae)):
        (tmp / f"{name}.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
    with config.unlocked():
        config.teacher_workdir = str(tmp / "teacher.msgpack")
        config.autoencoder_workdir = str(tmp / "vae.msgpack")
        config.batch_size = args.batch

    method = ifl.make(config)
    ifc = ifl.ImagineFlashConfig(**config.imagine_flash.to_dict())
    tx = loop.make_optimizer(config.optimizer)
    disc_tx = loop.make_optimizer(config.disc_optimizer)
    rng = jax.random.PRNGKey(2)
    disc = method.init_discriminator(rng) if method.init_discriminator else None
    state = state_lib.init_state(method.init(rng), tx, rng, disc, disc_tx)
    frozen = method.load_frozen()
    size = config.data.image_size
    raw = {
        "image": np.zeros((args.batch, size, size, 3), np.uint8),
        "caption": ["a red circle and a blue square"] * args.batch,
    }
    batch = method.prepare_batch(raw)
    fused = step_lib.compile_train_step(
        step_lib.make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    )

    def fused_call(s, f, b):
        return fused(jax.tree.map(jnp.copy, s), f, b)  # the step donates its state

    rows = {}
    rows["fused step"] = timed(fused_call, state, frozen, batch, iters=args.iters)
    for _ in range(2):
        fused_call(state, frozen, batch)
    executables = fused._cache_size()

    # Parts, each alone.
    context = model.encode_text(teacher["text"], batch["tokens"])
    uncond = model.encode_text(teacher["text"], jnp.zeros_like(batch["tokens"]))
    steps = tuple(ifc.student_steps)
    plans, ts = ifl.student_plans(model.schedule, steps, ifc.rollout_noise_correction)
    x_T = jax.random.normal(rng, model.latent_shape(args.batch, size))
    which = jnp.zeros((args.batch,), jnp.int32)
    depth = jnp.full((args.batch,), max(steps) - 1)
    t = jnp.asarray(ts)[which, depth]
    rows["rollout (no grad)"] = timed(
        jax.jit(lambda p: ifl.rollout(model, p, x_T, plans, which, depth, context, True)),
        state.params["unet"],
        iters=args.iters,
    )

    def student_loss(p):
        return jnp.mean(ifl.student_estimate(model, p, x_T, t, context) ** 2)

    rows["student fwd+bwd"] = timed(
        jax.jit(jax.grad(student_loss)), state.params["unet"], iters=args.iters
    )
    rows["teacher k-step CFG solve"] = timed(
        jax.jit(lambda p: ifl.srl_target(model, ifc, p, x_T, x_T, t, context, uncond, rng)[0]),
        teacher["unet"],
        iters=args.iters,
    )
    if method.discriminator_loss is not None:
        rows["discriminator update (D side)"] = timed(
            jax.jit(jax.grad(lambda d: method.discriminator_loss(d, x_T, frozen, batch, rng)[0])),
            state.disc_params,
            iters=args.iters,
        )
    parts = sum(v for k, v in rows.items() if k != "fused step")
    print(
        f"\nImagine Flash step, variant {args.variant!r}, batch {args.batch}, {jax.devices()[0].platform}"
    )
    print("| part | ms | share of parts |\n|---|---|---|")
    for k, v in rows.items():
        share = "" if k == "fused step" else f"{v / parts:.0%}"
        print(f"| {k} | {v:.1f} | {share} |")
    ratio = rows["fused step"] / parts
    print(
        f"| sum of parts | {parts:.1f} | |\nfused / sum of parts = {ratio:.2f}; "
        f"compiled executables of the fused step after 3 calls: {executables}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                variant=args.variant,
                batch=args.batch,
                device=str(jax.devices()[0]),
                ms=rows,
                sum_of_parts_ms=parts,
                fused_over_parts=ratio,
                executables=executables,
            ),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
