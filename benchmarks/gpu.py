"""SD1.5-size sampling and Imagine Flash training step on one accelerator: images/s, MFU, memory.

  python3 -m benchmarks.gpu              # H100/H200
  python3 -m benchmarks.gpu --tiny       # toy widths, CPU smoke test

Needs only jax, flax, optax, orbax and numpy (what the GPU machines have; no ml_collections,
grain, TFDS or diffusers). SD1.5's UNet, CLIP ViT-L/14 text encoder and VAE (common.sd15_config)
with random N(0, 0.02²) weights drawn on the host (compiling the models' own init costs minutes on
a GPU; the values do not change any cost), bf16 compute and parameters (--param-dtype float32 for
the SD configs' mixed precision), remat on. Sections, each guarded (an error is recorded in the
JSON and the rest still runs; the JSON is rewritten after every section):

  peak          n×n matmul rate in the compute dtype (median of --peak-iters), copy bandwidth;
  unet forward  one UNet evaluation at --batch: latency and the FLOP count (XLA cost analysis of
                the compiled program) that the sampler and step FLOPs are built from;
  sampling      flash_jax.sampling's compiled loop: the student's 1/2/3-step DDIM (unguided, noise
                correction) against the teacher's 25-step CFG DDIM (cond and uncond batched), at
                --batch; text encoding and VAE decoding timed alone and added for the end-to-end
                figure; speedup against the ideal ratio of UNet evaluations per image;
  train         the fused Imagine Flash step (flash_jax.train.step on methods/imagine_flash:
                student rollout, student fwd/bwd, k-step teacher CFG solve, adversarial pass,
                discriminator update, AdamW, EMA), student = teacher architecture, on what the
                latent cache feeds an SD run (latents and prompt embeddings; --images encodes
                512² images in the step instead): ms/step, lower and compile time, FLOPs (cost
                analysis, corrected for scan bodies counted once), MFU against the measured peak,
                compiled memory analysis and the allocator's peak.

Every program compiles on a thread pool as soon as it is known (XLA compiles release the GIL).
No timing runs while a compile shares the host: each section waits for every compile submitted so
far, and the training step's compile starts after the sampling timings (--overlap-compiles times
while compiles run, faster but noisier; each row records in `compiling` what was still compiling).
Timings use a fixed number of calls; sampling speedups are measured in --repeats blocks. Compiled programs go to a persistent
cache (--cache-dir), so a rerun on the same machine skips compiling. Writes $OUT/gpu.json when
$OUT is set, else benchmarks/results/gpu.json (or --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import sampling as sampling_bench
from flash_jax.methods import imagine_flash as ifl
from flash_jax.t2i import T2I
from flash_jax.train import loop
from flash_jax.train import step as step_lib


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy widths and sizes: CPU smoke test")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 8; tiny 2)")
    p.add_argument("--student-steps", default="1,2,3", help="student sampler step counts")
    p.add_argument("--teacher-steps", type=int, default=25, help="teacher sampler steps (CFG)")
    p.add_argument("--guidance", type=float, default=7.5, help="teacher CFG scale")
    p.add_argument("--train-student-steps", default="3", help="imagine_flash.student_steps")
    p.add_argument("--k", type=int, default=2, help="imagine_flash.teacher_steps (solve steps)")
    p.add_argument("--no-remat", action="store_true", help="train without rematerialisation")
    p.add_argument("--dtype", default=None, help="compute dtype (bfloat16; tiny float32)")
    p.add_argument("--param-dtype", default=None, help="UNet/VAE parameters (default: --dtype)")
    p.add_argument("--images", action="store_true", help="train on images, not cached latents")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 5; tiny 2)")
    p.add_argument(
        "--repeats", type=int, default=3, help="blocks the sampling speedups are timed in"
    )
    p.add_argument(
        "--overlap-compiles",
        action="store_true",
        help="time while other programs still compile (the timings then share the host)",
    )
    p.add_argument("--peak-n", type=int, default=None, help="matmul side (default 8192)")
    p.add_argument("--peak-iters", type=int, default=10)
    p.add_argument("--copy-mib", type=int, default=None, help="copy benchmark size (def. 1024)")
    p.add_argument("--matmul-precision", default="tensorfloat32", help="for the fp32 parts")
    p.add_argument("--compile-threads", type=int, default=8, help="1 compiles one at a time")
    p.add_argument("--cache-dir", default="/tmp/flash_jax_xla_cache", help="'' disables")
    p.add_argument("--sections", default="peak,sampling,train")
    p.add_argument("--budget-s", type=float, default=None, help="skip timings after (def. 330)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json)")
    args = p.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    # XLA:CPU emulates bf16 and compiles it slowly: the CPU smoke test runs fp32 unless asked.
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.iters = args.iters or (2 if args.tiny else 5)
    args.peak_n = args.peak_n or (512 if args.tiny else 8192)
    args.copy_mib = args.copy_mib or (16 if args.tiny else 1024)
    args.budget_s = args.budget_s or (float("inf") if args.tiny else 330.0)
    args.student_steps = tuple(int(n) for n in args.student_steps.split(","))
    args.train_student_steps = tuple(int(n) for n in args.train_student_steps.split(","))
    args.sections = set(args.sections.split(","))
    return args


class Run:
    """The results dict, written after every section; sections are guarded and budgeted."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {
            "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
            "platform": common.platform_info(),
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def section(self, name: str, fn: Callable[[], dict]) -> dict | None:
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        try:
            self.results[name] = fn()
        except Exception as e:  # record it and go on to the next section
            traceback.print_exc()
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
        self.save()
        return self.results[name]

    def save(self) -> None:
        self.results["wall_s"] = self.elapsed()
        self.path = common.write_json(self.results, "gpu.json", self.args.out)


def peak_section(args: argparse.Namespace) -> dict:
    return {
        # In the model's dtype: MFU compares like with like (bf16 on GPU; the fp32 CPU smoke test).
        "matmul": common.matmul_peak(args.peak_n, args.peak_iters, jnp.dtype(args.dtype)),
        "copy": common.copy_bandwidth(args.copy_mib << 20, args.peak_iters),
    }


class Compiles:
    """First calls and AOT compiles on a thread pool (XLA compiles release the GIL), each started
    as soon as its program is known; `result(name)` waits for one and records its seconds."""

    def __init__(self, threads: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max(threads, 1))
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.seconds: dict[str, float] = {}

    def submit(self, name: str, fn: Callable[[], Any]) -> None:
        def call():
            start = time.perf_counter()
            value = jax.block_until_ready(fn())
            return time.perf_counter() - start, value

        self.futures[name] = self.pool.submit(call)

    def result(self, name: str) -> Any:
        seconds, value = self.futures[name].result()
        self.seconds[name] = seconds
        return value

    def running(self) -> list[str]:
        return [name for name, f in self.futures.items() if not f.done()]

    def wait_all(self) -> None:
        """Blocks until every compile submitted so far has finished (failed ones included)."""
        concurrent.futures.wait(list(self.futures.values()))


def main() -> None:
    args = parse_args()
    jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    cached_programs = 0
    if args.cache_dir:  # a rerun on the same machine loads its programs instead of compiling
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        cache = Path(args.cache_dir)
        cached_programs = len(list(cache.iterdir())) if cache.is_dir() else 0
    print(jax.devices())
    run = Run(args)
    run.results["compilation_cache"] = {"dir": args.cache_dir, "entries_at_start": cached_programs}
    if "peak" in args.sections:
        run.section("peak", lambda: peak_section(args))
    peak_tflops = (run.results.get("peak", {}).get("matmul") or {}).get("tflops")

    config = common.sd15_config(
        tiny=args.tiny,
        dtype=args.dtype,
        param_dtype=args.param_dtype or args.dtype,
        remat=not args.no_remat,
        batch_size=args.batch,
        student_steps=args.train_student_steps,
        teacher_steps=args.k,
        guidance_scale=args.guidance,
    )
    ctx: dict[str, Any] = {"config": config}
    if "error" in run.section("setup", lambda: setup(args, ctx)):
        return

    compiles = Compiles(args.compile_threads)
    model, teacher = ctx["model"], ctx["teacher"]
    forward = sampling_bench.unet_forward_args(model, teacher["unet"], ctx["x_T"])
    compiles.submit("unet forward", lambda: jax.jit(model.apply_unet).lower(*forward).compile())
    jobs: dict[str, sampling_bench.Job] = {}
    if "sampling" in args.sections:
        jobs = sampling_bench.make_jobs(
            model,
            teacher,
            ctx["vae"],
            ctx["x_T"],
            args.student_steps,
            (args.teacher_steps,),
            args.guidance,
        )
        for name, job in jobs.items():
            compiles.submit(name, job.call)
    if "train" in args.sections:
        # Traced here while the sampling programs compile on the pool.
        run.section("train setup", lambda: prepare_train(args, config, ctx))
        if "lowered" in ctx and args.overlap_compiles:
            compiles.submit("train step", ctx.pop("lowered").compile)

    run.section("unet forward", lambda: forward_section(run, compiles, forward, peak_tflops, ctx))
    if "sampling" in args.sections:
        run.section("sampling", lambda: sampling_section(run, jobs, compiles, peak_tflops, ctx))
    if "lowered" in ctx:  # compiled only now, so that no sampling timing shares the host with it
        compiles.submit("train step", ctx.pop("lowered").compile)
    if "train step" in compiles.futures:
        run.section("train", lambda: train_section(run, compiles, peak_tflops, ctx))
    run.results["compile_s"] = compiles.seconds
    run.save()
    compiles.pool.shutdown(wait=False, cancel_futures=True)

    print_summary(run.results)
    print(f"\nwrote {run.path} ({run.elapsed():.0f} s)")


def setup(args: argparse.Namespace, ctx: dict) -> dict:
    """The model, random teacher (UNet + text encoder) and VAE weights, the initial noise."""
    config = ctx["config"]
    model = T2I.from_config(config)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    teacher = common.random_like(jax.eval_shape(model.init, key), seed=0)
    vae = common.random_like(
        jax.eval_shape(functools.partial(common.init_autoencoder, model), key), seed=1
    )
    jax.block_until_ready((teacher, vae))
    init_s = time.perf_counter() - start
    x_T = jax.random.normal(key, model.latent_shape(args.batch, config.data.image_size))
    ctx.update(model=model, teacher=teacher, vae=vae, x_T=x_T, key=key)
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "init_s": init_s,
        "unet_params": count(teacher["unet"]),
        "text_params": count(teacher["text"]),
        "vae_params": count(vae),
        "unet_param_dtype": jnp.dtype(model.unet.param_dtype).name,
        "unet_compute_dtype": jnp.dtype(model.unet.dtype).name,
        "latent_shape": list(x_T.shape),
        "scan_body_counted_once": common.loops_counted_once(),
    }


def prepare_train(args: argparse.Namespace, config: common.Config, ctx: dict) -> dict:
    """The Imagine Flash method, state, frozen models and batch; lowers the fused step."""
    teacher, vae, model = ctx["teacher"], ctx["vae"], ctx["model"]
    method = ifl.make(config)
    tx = loop.make_optimizer(config.optimizer)
    disc_tx = loop.make_optimizer(config.disc_optimizer)
    start = time.perf_counter()
    state = common.imagine_flash_state(config, tx, disc_tx, ctx["key"], teacher, vae)
    jax.block_until_ready(state)
    state_s = time.perf_counter() - start
    frozen = common.imagine_flash_frozen(config, teacher, vae)
    size = config.data.image_size
    raw = common.imagine_flash_batch(method, model, args.batch, size, cached=not args.images)
    batch = jax.device_put(raw)
    step = step_lib.make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    start = time.perf_counter()
    lowered = step_lib.compile_train_step(step).lower(state, frozen, batch)
    lower_s = time.perf_counter() - start
    ctx.update(state=state, frozen=frozen, batch=batch, lowered=lowered, lower_s=lower_s)
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "state_s": state_s,
        "lower_s": lower_s,
        "disc_params": count(state.disc_params),
        "batch_keys": sorted(batch),
    }


def forward_section(
    run: Run, compiles: Compiles, forward: tuple, peak_tflops: float | None, ctx: dict
) -> dict:
    """One UNet evaluation at --batch: its FLOPs (XLA cost analysis of the compiled program) are
    the unit of the samplers' and the step's FLOP counts."""
    compiled = compiles.result("unet forward")
    ctx["unet_flops"] = common.flops_of(compiled)
    if not run.args.overlap_compiles:
        compiles.wait_all()
    stats = common.timed(compiled, *forward, iters=run.args.iters)
    tflops = ctx["unet_flops"] / (stats["median_ms"] * 1e-3) / 1e12
    return {
        "batch": run.args.batch,
        "compiling": compiles.running(),
        "gflops": ctx["unet_flops"] / 1e9,
        "latency_ms": stats["median_ms"],
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }


def sampling_section(
    run: Run, jobs: dict, compiles: Compiles, peak_tflops: float | None, ctx: dict
) -> dict:
    if not run.args.overlap_compiles:
        compiles.wait_all()
    out = sampling_bench.measure(
        jobs,
        batch=run.args.batch,
        iters=run.args.iters,
        repeats=run.args.repeats,
        flops_per_eval=ctx.get("unet_flops", 0.0),
        peak_tflops=peak_tflops,
        ready=compiles.result,
        over_budget=run.over_budget,
    )
    still_compiling = compiles.running()  # these shared the host with the timed rounds
    for row in out.values():
        row["compiling"] = still_compiling
    return out


def train_section(run: Run, compiles: Compiles, peak_tflops: float | None, ctx: dict) -> dict:
    args = run.args
    compiled = compiles.result("train step")
    if not args.overlap_compiles:
        compiles.wait_all()
    state, frozen, batch = ctx["state"], ctx["frozen"], ctx["batch"]
    raw_flops = common.flops_of(compiled)
    # Scans counted once: the rollout runs N_max − 1 student evaluations at batch B and the
    # teacher solve k evaluations at 2B (CFG); add the iterations the cost analysis missed.
    fwd = ctx.get("unet_flops", 0.0)
    loops = [(max(args.train_student_steps) - 1, fwd), (args.k, 2 * fwd)]
    missed = sum((trips - 1) * body for trips, body in loops)
    flops = raw_flops + (missed if run.results["setup"]["scan_body_counted_once"] else 0.0)
    memory = common.memory_of(compiled)
    times = []
    for i in range(args.iters + 2):  # two warm-up steps, then the timed ones
        if run.over_budget() and times:
            break
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    ms = float(np.median(times)) if times else float("nan")
    tflops = flops / (ms * 1e-3) / 1e12
    return {
        "batch": args.batch,
        "cached_latents_and_embeddings": not args.images,
        "student_steps": list(args.train_student_steps),
        "teacher_solve_steps": args.k,
        "remat": not args.no_remat,
        "ms_per_step": ms,
        "min_ms": min(times) if times else None,
        "timed_steps": len(times),
        "images_per_s": args.batch / (ms * 1e-3),
        "lower_s": ctx["lower_s"],
        "compile_s": compiles.seconds["train step"],
        "xla_flops_raw": raw_flops,
        "flops_per_step": flops,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "memory_analysis": memory,
        "allocator_peak_bytes": common.device_peak_bytes(),
        "loss_finite": bool(metrics["finite"]),
    }


def print_summary(results: dict) -> None:
    print("\n" + str(results["platform"]["devices"]))
    peak = results.get("peak", {})
    if "matmul" in peak:
        m, c = peak["matmul"], peak["copy"]
        print(
            f"matmul peak {m['tflops']:.3g} TFLOP/s ({m['dtype']} {m['n']}³), copy {c['gb_per_s']:.0f} GB/s"
        )
    if "sampling" in results and "error" not in results["sampling"]:
        teacher = next(k for k in results["sampling"] if k.startswith("teacher"))
        sampling_bench.print_table(
            results["sampling"], teacher.removeprefix("teacher ").replace(" ", "_")
        )
    train = results.get("train", {})
    if "ms_per_step" in train:
        mem = train["memory_analysis"].get("total_bytes", 0) / 2**30
        print(
            common.table(
                [
                    [
                        train["batch"],
                        train["ms_per_step"],
                        train["compile_s"],
                        train["flops_per_step"] / 1e12,
                        train["tflops"],
                        train["mfu"] if train["mfu"] is not None else "",
                        mem,
                    ]
                ],
                ["IF step batch", "ms", "compile s", "TFLOP/step", "TFLOP/s", "MFU", "GiB (XLA)"],
            )
        )
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value:
            print(f"{name}: ERROR {value['error']}")


if __name__ == "__main__":
    main()
