"""Cost of the fused Imagine Flash training step against its parts, on the Shapes testbed config.

  python -m benchmarks.imagine_flash_step [--variant 3] [--batch 16] [--iters 5] [--repeats 3]

Random weights (teacher = student at init, random VAE): timing does not depend on training. The
fused step is the trainer's one compiled program (flash_jax/train/step.py), run on a chained,
donated state. The parts, each jitted alone on the same inputs, are everything that program does:

  text conditioning        the frozen text encoder: prompt (context + pooled) and empty prompt
                           (methods/common.conditioning)
  rollout (no grad)        the student's own sampler from x_T to x_t (imagine_flash.rollout)
  student fwd+bwd          x̂0^Θ and its gradient w.r.t. the student UNet
  teacher k-step CFG solve the SRL target (imagine_flash.srl_target)
  adversarial pass (G)     D on the re-noised x̂0^Θ through the frozen teacher's features, fwd and
                           bwd to x̂0^Θ (methods/common.LatentDiscriminator.generator_loss)
  discriminator update     the method's discriminator loss and its gradient w.r.t. the heads (text
                           conditioning, VAE encoding of the real images, teacher features of
                           real and fake)
  optimizers + EMA         the same trainer step with zero-cost losses: AdamW on G and D, the EMA,
                           gradient norms and the finiteness check

FLOPs come from XLA's cost analysis of each compiled program, corrected for `lax.scan` bodies being
counted once (the rollout's and the teacher solve's trip counts are known); utilisation is against
the measured fp32 matmul rate of this machine. Compile time: the fused step's lower + compile, and
each part's first call. Every program is then timed in --repeats blocks of --iters interleaved
rounds (one call each in turn), so that the ratio compares programs timed under the same
conditions; `fused_over_parts` is that ratio per block (median, range, values). Also counts the
fused step's compiled executables after several calls (must be 1). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import sampling as sampling_bench
from configs.shapes import imagine_flash as if_config
from flash_jax.methods import common as methods_common
from flash_jax.methods import imagine_flash as ifl
from flash_jax.t2i import T2I
from flash_jax.train import loop
from flash_jax.train import step as step_lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="3", help="configs/shapes/imagine_flash.py variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5, help="interleaved rounds per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="blocks the ratio is measured in")
    parser.add_argument("--peak-n", type=int, default=1024, help="fp32 matmul side for the peak")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    config = if_config.get_config(args.variant)
    model = T2I.from_config(config)
    ifc = ifl.ImagineFlashConfig(**config.imagine_flash.to_dict())
    k_teacher, k_vae, k_state, k_parts = jax.random.split(jax.random.PRNGKey(0), 4)
    teacher = jax.jit(model.init)(k_teacher)
    vae = common.init_autoencoder(model, k_vae)
    method = ifl.make(config)
    tx = loop.make_optimizer(config.optimizer)
    disc_tx = loop.make_optimizer(config.disc_optimizer)
    state = common.imagine_flash_state(config, tx, disc_tx, k_state, teacher, vae)
    frozen = common.imagine_flash_frozen(config, teacher, vae)
    size = config.data.image_size
    batch = jax.device_put(common.imagine_flash_batch(method, model, args.batch, size))
    step = step_lib.make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    peak = common.matmul_peak(args.peak_n, iters=10, dtype=jnp.float32)
    counted_once = common.loops_counted_once()

    rows: dict[str, dict] = {}

    # The fused step: AOT lower + compile for its cost and memory analysis, then the jitted step
    # on a chained state (as the trainer runs it) for the timing and the executable count.
    fused = step_lib.compile_train_step(step)
    start = time.perf_counter()
    lowered = fused.lower(state, frozen, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    carry = {"state": state}

    def fused_call():
        carry["state"], metrics = fused(carry["state"], frozen, batch)
        return carry["state"], metrics

    b = args.batch
    x = jnp.zeros(model.latent_shape(b, config.data.image_size))
    fwd = sampling_bench.unet_flops(model, teacher["unet"], x)
    rollout_trips = max(ifc.student_steps) - 1
    scans = {"rollout": (rollout_trips, fwd), "solve": (ifc.teacher_steps, 2 * fwd)}
    calls = {"fused step": fused_call}
    rows["fused step"] = {
        "first_s": common.first_call_s(fused_call),
        "flops": corrected(common.flops_of(compiled), scans.values(), counted_once),
    }
    jax.block_until_ready(fused_call())  # a second warm-up call: the chained state is now donated

    fresh = common.imagine_flash_state(config, tx, disc_tx, k_state, teacher, vae)  # donated
    pieces = parts(
        model, ifc, method, tx, disc_tx, config, fresh, teacher, frozen, batch, k_parts, scans
    )
    for name, (fn, args_, loops) in pieces.items():
        jitted = jax.jit(fn)
        calls[name] = functools.partial(jitted, *args_)
        rows[name] = {"first_s": common.first_call_s(calls[name])}  # before the AOT compile below
        raw = common.flops_of(jitted.lower(*args_).compile())
        rows[name]["flops"] = corrected(raw, loops, counted_once)
    # Interleaved rounds: the ratio fused / sum of parts compares programs timed alike.
    blocks = common.interleaved_repeats(calls, iters=args.iters, repeats=args.repeats)
    for name, times in common.merged(blocks).items():
        rows[name] |= common.summary(times)
    executables = fused._cache_size()

    part_names = [k for k in rows if k != "fused step"]
    parts_ms = sum(rows[k]["median_ms"] for k in part_names)
    parts_flops = sum(rows[k]["flops"] for k in part_names)
    ratio = common.ratio_spread(blocks, ["fused step"], part_names)
    for r in rows.values():
        r["gflop_per_s"] = r["flops"] / (r["median_ms"] * 1e-3) / 1e9
        r["utilisation"] = r["gflop_per_s"] / (peak["tflops"] * 1e3)

    print(
        f"\nImagine Flash step, variant {args.variant!r}, batch {b}, "
        f"{common.platform_info()['devices']}; fp32 matmul peak {peak['tflops'] * 1e3:.1f} GFLOP/s"
    )
    table = []
    for k, r in rows.items():
        share = "" if k == "fused step" else f"{r['median_ms'] / parts_ms:.0%}"
        table.append(
            [
                k,
                r["median_ms"],
                share,
                r["flops"] / 1e9,
                r["gflop_per_s"],
                f"{r['utilisation']:.1%}",
                r["first_s"],
            ]
        )
    table.append(["sum of parts", parts_ms, "", parts_flops / 1e9, "", "", ""])
    header = ["part", "ms", "share of parts", "GFLOP", "GFLOP/s", "of peak", "first call s"]
    print(common.table(table, header))
    print(
        f"fused / sum of parts = {ratio['median']:.2f} (range {ratio['min']:.2f}-"
        f"{ratio['max']:.2f} over {ratio['repeats']} repeats); fused step lower {lower_s:.1f} s + "
        f"compile {compile_s:.1f} s; compiled executables of the fused step after "
        f"{args.repeats * args.iters + 2} calls: {executables}"
    )
    result = dict(
        variant=args.variant,
        batch=b,
        iters=args.iters,
        repeats=args.repeats,
        platform=common.platform_info(),
        peak=peak,
        scan_body_counted_once=counted_once,
        rows=rows,
        sum_of_parts_ms=parts_ms,
        sum_of_parts_flops=parts_flops,
        fused_over_parts=ratio,
        fused_lower_s=lower_s,
        fused_compile_s=compile_s,
        fused_memory=common.memory_of(compiled),
        executables=executables,
    )
    print("wrote", common.write_json(result, "imagine_flash_step.json", args.out))


def corrected(raw: float, loops, counted_once: bool) -> float:
    """`raw` cost-analysis FLOPs plus the scan iterations it missed: `loops` = (trips, body)."""
    return raw + (sum((trips - 1) * body for trips, body in loops) if counted_once else 0.0)


def parts(model, ifc, method, tx, disc_tx, config, state, teacher, frozen, batch, rng, scans):
    """name -> (function, arguments, scans inside it as (trips, FLOPs per trip)) for every piece
    of the fused step, on the inputs the fused step sees."""
    b = batch["tokens"].shape[0]
    empty = model.tokenizer()([""])[0]
    context, pooled, uncond = methods_common.conditioning(model, teacher["text"], batch, empty)
    steps = ifc.student_steps
    plans, ts = ifl.student_plans(model.schedule, steps, ifc.rollout_noise_correction)
    x_T = jax.random.normal(rng, model.latent_shape(b, config.data.image_size))
    which = jnp.zeros((b,), jnp.int32)
    depth = jnp.full((b,), max(steps) - 1)  # the deepest rollout: every step active
    t = jnp.asarray(ts)[which, depth]
    student = jax.tree.map(jnp.copy, teacher["unet"])
    out = {
        "text conditioning": (
            lambda text: methods_common.conditioning(model, text, batch, empty),
            (teacher["text"],),
            (),
        ),
        "rollout (no grad)": (
            lambda p: ifl.rollout(model, p, x_T, plans, which, depth, context, True),
            (student,),
            (scans["rollout"],),
        ),
        "student fwd+bwd": (
            jax.grad(
                lambda p: jnp.mean(
                    methods_common.predict_x0(model, model.apply_unet, p, x_T, t, context)[0] ** 2
                )
            ),
            (student,),
            (),
        ),
        "teacher k-step CFG solve": (
            lambda p: ifl.srl_target(model, ifc, p, x_T, x_T, t, context, uncond, rng)[0],
            (teacher["unet"],),
            (scans["solve"],),
        ),
    }
    if method.discriminator_loss is not None:
        disc = state.disc_params
        # The discriminator `ifl.make` builds: same heads, same re-noising range.
        discriminator = methods_common.LatentDiscriminator(model, ifc.disc_width, ifc.disc_t_max)

        def adversarial(x0, d, teacher_unet):
            return discriminator.generator_loss(d, teacher_unet, x0, context, pooled, rng)[0]

        out["adversarial pass (G)"] = (jax.grad(adversarial), (x_T, disc, teacher["unet"]), ())
        out["discriminator update"] = (
            jax.grad(lambda d, fr: method.discriminator_loss(d, x_T, fr, batch, rng)[0]),
            (disc, frozen),
            (),
        )
    # The trainer's own step with zero-cost losses: what remains is the optimizer updates, the
    # EMA, the gradient norms and the finiteness check.
    zero = lambda p: 0.0 * sum(jnp.sum(v) for v in jax.tree.leaves(p))  # noqa: E731
    updates_only = dataclasses.replace(
        method,
        generator_loss=lambda p, fr, bt, r, d=None: (zero(p), {"fake": x_T}),
        discriminator_loss=(
            (lambda d, fake, fr, bt, r: (zero(d), {})) if method.discriminator_loss else None
        ),
    )
    update_step = step_lib.make_train_step(
        updates_only, tx, ema_decay=config.ema_decay, disc_tx=disc_tx
    )
    out["optimizers + EMA"] = (update_step, (state, frozen, batch), ())
    return out


if __name__ == "__main__":
    main()
