"""Sampling speed: the few-step student against the CFG teacher, same model, same code path.

  python -m benchmarks.sampling [--batch 16] [--iters 5] [--repeats 3] [--teacher-steps 25,50]
  python -m benchmarks.sampling --cpu-devices 2 --out benchmarks/results/sampling_2cpu.json

Testbed model (configs/shapes/teacher.py, 8×8×4 latents), random weights: speed does not depend on
training. Every sampler is `flash_jax.sampling.sample` (one compiled `lax.scan`): the student's
N-step DDIM with noise correction, unguided (what the Imagine Flash student runs), against the
teacher's DDIM with CFG (conditional and unconditional halves in one batched call per step).
Latency is per batch: the median of --repeats × --iters rounds that call every program once in
turn, after a compiling call each. "speedup" is the teacher's latency over the student's, also
per block of --iters rounds (its median and range over the --repeats blocks), and "ideal" the
ratio of UNet evaluations per image (CFG counts 2). Text encoding and VAE decoding are timed in the same
rounds and added for the end-to-end figures.
The batch is split over the local devices that divide it (`parallel.local_batch_mesh`), as
evaluation splits it; `--cpu-devices N` makes the CPU N devices (`jax_num_cpu_devices`).
Prints a table and writes JSON (benchmarks/results/sampling.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import common
from flash_jax import parallel, sampling
from flash_jax.t2i import T2I

PROMPT = "a red circle and a blue square"


@dataclasses.dataclass(frozen=True)
class Job:
    """One timed program: a sampler (`config` set, `unet_evals` per image) or a text encode / VAE
    decode of the whole batch (`config` None)."""

    call: Callable[[], jax.Array]
    config: sampling.SamplerConfig | None = None
    unet_evals: int = 0


def make_jobs(
    model: T2I,
    params: dict[str, Any],
    vae_params: Any,
    x_T: jax.Array,
    student_steps: tuple[int, ...],
    teacher_steps: tuple[int, ...],
    guidance_scale: float,
) -> dict[str, Job]:
    """The student samplers, the CFG teacher samplers, text encoding and VAE decoding of a batch
    of `x_T.shape[0]` images; `params` = `{"unet", "text"}` (the student has the teacher's shape).
    The batch is split over `parallel.local_batch_mesh`, the weights replicated."""
    b = x_T.shape[0]
    mesh = parallel.local_batch_mesh(b)
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params, vae_params = jax.device_put((params, vae_params), replicated)
    tokenizer = model.tokenizer()
    x_T, tokens, empty = jax.device_put(
        (x_T, jnp.asarray(tokenizer([PROMPT] * b)), jnp.asarray(tokenizer([""] * b))), rows
    )
    encode = jax.jit(model.encode_text)
    decode = jax.jit(model.to_images)
    cond = encode(params["text"], tokens)
    uncond = encode(params["text"], empty)
    configs = {
        f"student {n}": sampling.SamplerConfig(num_steps=n, noise_correction=True)
        for n in student_steps
    }
    for n in teacher_steps:
        configs[f"teacher {n} CFG"] = sampling.SamplerConfig(
            num_steps=n, guidance_scale=guidance_scale
        )
    # Encode and decode first: cheap, and the end-to-end figures need them.
    jobs = {
        "text encode": Job(functools.partial(encode, params["text"], tokens)),
        "vae decode": Job(functools.partial(decode, vae_params, x_T)),
    }
    for name, cfg in configs.items():
        guided = cfg.guidance_scale != 1
        call = functools.partial(
            sampling.sample,
            model.apply_unet,
            params["unet"],
            x_T,
            model.schedule,
            cfg,
            cond=cond,
            uncond=uncond if guided else None,
        )
        jobs[name] = Job(call, cfg, cfg.num_steps * (2 if guided else 1))
    return jobs


def unet_forward_args(model: T2I, unet_params: Any, x: jax.Array) -> tuple:
    """Arguments of `model.apply_unet` for one evaluation on the batch `x` (zero text context)."""
    b = x.shape[0]
    context = jnp.zeros((b, model.max_length, model.unet.cross_attention_dim[0]))
    return unet_params, x, jnp.full((b,), 500.0), context


def unet_flops(model: T2I, unet_params: Any, x: jax.Array) -> float:
    """FLOPs of one UNet evaluation on the batch `x` (XLA cost analysis of the compiled program:
    some backends count nothing before compilation)."""
    args = unet_forward_args(model, unet_params, x)
    return common.flops_of(jax.jit(model.apply_unet).lower(*args).compile())


def measure(
    jobs: dict[str, Job],
    *,
    batch: int,
    iters: int,
    repeats: int = 1,
    flops_per_eval: float,
    peak_tflops: float | None = None,
    ready: Callable[[str], Any] = lambda name: None,
    over_budget: Callable[[], bool] = lambda: False,
) -> dict[str, dict[str, Any]]:
    """Times every job: a first call each (it compiles unless `ready(name)` already waited for a
    compile elsewhere), then `repeats` blocks of `iters` interleaved rounds
    (`common.interleaved_repeats`), so that the speedups compare programs timed under the same
    conditions. Rows with latency (median over every round), images/s, TFLOP/s, utilisation,
    end-to-end and speedups; `speedup_vs_<teacher>_spread` is the speedup per block (median,
    range, values)."""
    out: dict[str, dict[str, Any]] = {}
    first_s: dict[str, float] = {}
    for name, job in jobs.items():
        if over_budget():
            out[name] = {"skipped": "over the time budget"}
            continue
        try:
            ready(name)
            first_s[name] = common.first_call_s(job.call)
        except Exception as e:  # one program failing keeps the others
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    calls = {name: jobs[name].call for name in first_s}
    blocks = common.interleaved_repeats(calls, iters=iters, repeats=repeats, stop=over_budget)
    for name, times in common.merged(blocks).items():
        stats = common.summary(times)
        job = jobs[name]
        row: dict[str, Any] = {
            "latency_ms": stats["median_ms"],
            "min_ms": stats["min_ms"],
            "first_call_s": first_s[name],
            "iters": stats["iters"],
        }
        if job.config is not None:
            tflops = job.unet_evals * flops_per_eval / (stats["median_ms"] * 1e-3) / 1e12
            row |= {
                "steps": job.config.num_steps,
                "unet_evals_per_image": job.unet_evals,
                "images_per_s": batch / (stats["median_ms"] * 1e-3),
                "tflops": tflops,
                "utilisation": tflops / peak_tflops if peak_tflops else None,
            }
        out[name] = row
    out = {name: out[name] for name in jobs}  # the jobs' order
    encode, decode = out.get("text encode", {}), out.get("vae decode", {})
    for row in out.values():
        if "steps" in row and "latency_ms" in encode and "latency_ms" in decode:
            encodes = 2 if row["unet_evals_per_image"] > row["steps"] else 1  # CFG: + uncond
            row["end_to_end_ms"] = (
                row["latency_ms"] + encodes * encode["latency_ms"] + decode["latency_ms"]
            )
            row["end_to_end_images_per_s"] = batch / (row["end_to_end_ms"] * 1e-3)
    teachers = {k: v for k, v in out.items() if k.startswith("teacher") and "steps" in v}
    for name, row in out.items():
        if not (name.startswith("student") and "steps" in row):
            continue
        for t_name, t_row in teachers.items():
            key = t_name.removeprefix("teacher ").replace(" ", "_")
            row[f"speedup_vs_{key}"] = t_row["latency_ms"] / row["latency_ms"]
            row[f"speedup_vs_{key}_spread"] = common.ratio_spread(blocks, [t_name], [name])
            row[f"ideal_vs_{key}"] = t_row["unet_evals_per_image"] / row["unet_evals_per_image"]
            if "end_to_end_ms" in row and "end_to_end_ms" in t_row:
                row[f"end_to_end_speedup_vs_{key}"] = t_row["end_to_end_ms"] / row["end_to_end_ms"]
    return out


def print_table(out: dict[str, dict[str, Any]], teacher_key: str) -> None:
    """The markdown table of `measure`'s rows; speedups against the teacher `teacher_key`."""
    rows = []
    for name, row in out.items():
        if "steps" in row:
            util = row["utilisation"]
            rows.append(
                [
                    name,
                    row["unet_evals_per_image"],
                    row["latency_ms"],
                    row["images_per_s"],
                    row.get("end_to_end_images_per_s", ""),
                    row.get(f"speedup_vs_{teacher_key}", ""),
                    row.get(f"ideal_vs_{teacher_key}", ""),
                    row.get(f"end_to_end_speedup_vs_{teacher_key}", ""),
                    f"{util:.1%}" if util is not None else "",
                ]
            )
        elif "latency_ms" in row:
            rows.append([name, "", row["latency_ms"], "", "", "", "", "", ""])
        else:
            rows.append([name, next(iter(row.values()))] + [""] * 7)
    header = ["program", "UNet evals/img", "ms/batch", "img/s", "img/s e2e"]
    header += [f"speedup vs {teacher_key}", "ideal", "e2e speedup", "utilisation"]
    print(common.table(rows, header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5, help="interleaved rounds per repeat")
    parser.add_argument(
        "--repeats", type=int, default=3, help="blocks the speedups are measured in"
    )
    parser.add_argument("--student-steps", default="1,2,3")
    parser.add_argument("--teacher-steps", default="25,50")
    parser.add_argument("--guidance", type=float, default=4.0, help="testbed teacher's CFG")
    parser.add_argument("--peak-n", type=int, default=1024, help="fp32 matmul side for the peak")
    parser.add_argument("--cpu-devices", type=int, default=0, help="CPU devices (0: JAX's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the backend starts
    from configs.shapes import teacher as teacher_config  # ml_collections: testbed only

    config = teacher_config.get_config()
    model = T2I.from_config(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    vae = common.init_autoencoder(model, jax.random.PRNGKey(1))
    x_T = jax.random.normal(
        jax.random.PRNGKey(2), model.latent_shape(args.batch, config.data.image_size)
    )
    peak = common.matmul_peak(args.peak_n, iters=10, dtype=jnp.float32)
    jobs = make_jobs(
        model,
        params,
        vae,
        x_T,
        tuple(int(n) for n in args.student_steps.split(",")),
        tuple(int(n) for n in args.teacher_steps.split(",")),
        args.guidance,
    )
    flops = unet_flops(model, params["unet"], x_T)
    out = measure(
        jobs,
        batch=args.batch,
        iters=args.iters,
        repeats=args.repeats,
        flops_per_eval=flops,
        peak_tflops=peak["tflops"],
    )
    devices = common.platform_info()["devices"]
    print(f"\nSampling, testbed UNet, batch {args.batch} over {len(devices)} device(s) {devices}")
    print(f"fp32 matmul peak {peak['tflops'] * 1e3:.1f} GFLOP/s; UNet eval {flops / 1e9:.2f} GFLOP")
    first_teacher = next(k for k in out if k.startswith("teacher")).removeprefix("teacher ")
    print_table(out, first_teacher.replace(" ", "_"))
    result = {
        "args": vars(args),
        "platform": common.platform_info(),
        "peak": peak,
        "unet_flops_per_eval_batch": flops,
        "samplers": out,
    }
    print("wrote", common.write_json(result, "sampling.json", args.out))


if __name__ == "__main__":
    main()
