"""The testbed teacher's judge alignment against training steps, trained on one accelerator.

  python -m benchmarks.teacher_curve --config configs/shapes/teacher.py:gpu --seconds 1e9 \
      --eval-steps 1000,2000,3000,5000,7500,10000,12200   # H100: the shipped teacher, ~8 min
  python -m benchmarks.teacher_curve --seconds 100 --eval-steps 20,40 --num-images 50 \
      --pool 512 --workers 2                               # CPU smoke test, ~2 min

On the lent GPU machines (no ml_collections there): carry its wheel, install it with
`pip install --no-index --target /tmp/site .whl/*.whl` and add /tmp/site to PYTHONPATH.

Trains `configs/shapes/teacher.py[:variant]` (plus `--set key=value` overrides) on a frozen
stage-1 autoencoder (`--autoencoder`, default the shipped assets/shapes/autoencoder.msgpack) with
the generic compiled step (`loop.place`). At each of `--eval-steps`, and when `--seconds` of wall
time run out, it samples `--num-images` eval prompts with the teacher's 25-step CFG sampler from
its EMA params and scores them with the shipped judge (`scoring.score`: alignment per category,
FD-judge, colour statistics; the "real" row is the ceiling). At the end it scores the last EMA
params at every `--guidance` scale. `--init` starts from exported params (fresh optimizer);
`--resume` continues exactly from the `teacher_state.msgpack` of an earlier run (parameters,
optimizer, EMA, step keys and batch order), for a recipe longer than one device session:
  python -m benchmarks.teacher_curve --config configs/shapes/teacher.py:gpu,f2 \
      --autoencoder assets/shapes/autoencoder_f2.msgpack --seconds 420   # then, next session:
  python -m benchmarks.teacher_curve ... --resume PREVIOUS_OUT/teacher_state.msgpack

No Grain or TFDS: the train split's first `--pool` records are rendered once in `--workers`
processes and batches are gathered on the device from a fixed-seed reshuffle per epoch (the same
records and epoch structure as the Grain pipeline, not its exact order).

Writes teacher_curve.json after every evaluation, the EMA params at `--save-steps` (and the last)
as `teacher_step{N}.msgpack` (loadable wherever a teacher workdir is: `--config.teacher_workdir=`),
the whole train state after every evaluation as `teacher_state.msgpack.0`, `.1`, ... (parts of at
most 15 MiB, small enough for size-capped artifact transfers; `--resume` takes the name without the
part number), and a grid of real images vs the last teacher's samples, into $OUT if set, else --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from flash_jax import config as flash_config
from flash_jax import parallel, sampling
from flash_jax.data import shapes
from flash_jax.eval import generation, judge, reporting, scoring
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "shapes"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/shapes/teacher.py", help="path[:variant]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    p.add_argument("--seconds", type=float, default=480.0, help="wall budget of the training")
    p.add_argument(
        "--eval-steps",
        default="1000,2000,3000,5000,7500,10000,15000,20000,30000,40000,50000,60000,80000,100000",
    )
    p.add_argument("--save-steps", default="3000,10000,30000", help="export the EMA params here")
    p.add_argument("--guidance", default="2,4,7.5", help="CFG scales scored at the end")
    p.add_argument("--num-images", type=int, default=500, help="eval prompts per evaluation")
    p.add_argument("--pool", type=int, default=50_000, help="train records rendered")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--autoencoder", default=str(ASSETS / "autoencoder.msgpack"), help="frozen VAE (.msgpack)"
    )
    p.add_argument("--init", default="", help="start from these params (.msgpack), fresh optimizer")
    p.add_argument("--resume", default="", help="continue exactly from a teacher_state.msgpack")
    p.add_argument("--out", default=str(common.RESULTS / "teacher_curve"))
    return p.parse_args(argv)


def _render(index: int, seed: int, image_size: int) -> tuple[np.ndarray, str]:
    example = shapes.make_example(seed, "train", index, image_size)
    return example["image"], example["caption"]


def render_pool(n: int, seed: int, image_size: int, workers: int) -> tuple[np.ndarray, list[str]]:
    """Images `(n, H, W, 3)` uint8 and captions of train records 0..n−1."""
    fn = functools.partial(_render, seed=seed, image_size=image_size)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            records = pool.map(fn, range(n), chunksize=256)
    else:
        records = [fn(i) for i in range(n)]
    return np.stack([r[0] for r in records]), [r[1] for r in records]


def epoch_indices(n: int, batch_size: int, seed: int):
    """Batches of record indices: a fresh permutation of 0..n−1 per epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def make_scorer(model: T2I, vae: Any, num_images: int, image_size: int):
    """`(params, sampler) -> (metrics row, images)` on the first `num_images` eval prompts, and
    the real images with their row (the ceiling) and captions."""
    judge_params, judge_config = judge.load_judge(ASSETS / "judge.msgpack")
    real, labels = judge.real_examples("eval", num_images, 0, image_size)
    captions = [str(c) for c in labels["caption"]]
    tokens = model.tokenizer()(captions)
    empty = model.tokenizer()([""])[0]
    real_features = judge.predict(judge_params, real, judge_config)["features"]
    real_row = scoring.score(real, labels, judge_params, judge_config, real_features)
    latent_shape = model.latent_shape(1, image_size)[1:]

    @functools.partial(jax.jit, static_argnums=0)
    def run(sampler, params, tok, x_T, rng):
        uncond = jnp.broadcast_to(empty, tok.shape)
        return model.generate(params, vae, tok, uncond, x_T, sampler, rng)

    def score(params, sampler: sampling.SamplerConfig):
        fn = functools.partial(run, sampler)
        images = generation.generate_batched(
            fn, params, tokens, latent_shape, seed=0, batch_size=250
        )
        return scoring.score(images, labels, judge_params, judge_config, real_features), images

    return score, (real, real_row, captions)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    config = flash_config.load_config_file(args.config)
    flash_config.apply_overrides(config, args.set)
    flash_config.set_dotted(config, "autoencoder_workdir", args.autoencoder)
    image_size, batch_size = config.data.image_size, config.batch_size

    if args.init and args.resume:
        raise ValueError("--init and --resume: pick one")
    placement = loop.place(config, parallel.make_mesh(config.mesh))
    state = placement.init_state()
    if args.resume:
        state = load_state(args.resume, state, placement.abstract_state)
    if args.init:
        loaded = checkpoint.load_params(args.init)

        def put():  # two separate buffers: the step donates both trees
            target = placement.abstract_state.params
            return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), loaded, target)

        state = state.replace(params=put(), ema_params=put())

    t1 = time.perf_counter()
    images, captions = render_pool(args.pool, config.data.seed, image_size, args.workers)
    t_pool = time.perf_counter() - t1
    model = T2I.from_config(config)
    tokens = model.tokenizer()(captions)
    pool = jax.device_put({"image": images, "tokens": tokens})
    gather = jax.jit(
        lambda pool, idx: jax.tree.map(lambda a: a[idx], pool),
        out_shardings=placement.batch_sharding,
    )
    score, (real, real_row, eval_captions) = make_scorer(
        model, placement.frozen["vae"], args.num_images, image_size
    )
    sampler = sampling.SamplerConfig(**config.sample.to_dict())

    step = int(state.step)
    eval_steps = sorted(s for s in (int(s) for s in args.eval_steps.split(",")) if s >= step)
    if not eval_steps:
        raise ValueError(f"--eval-steps {args.eval_steps}: none at or after step {step}")
    save_steps = {int(s) for s in args.save_steps.split(",") if s}
    result: dict[str, Any] = {
        **common.platform_info(),
        "config": args.config,
        "init": args.init,
        "resume": args.resume,
        "start_step": step,
        "overrides": args.set,
        "batch_size": batch_size,
        "pool": args.pool,
        "num_images": args.num_images,
        "sampler": dataclasses.asdict(sampler),
        "pool_seconds": t_pool,
        "real": real_row,
        "curve": [],
    }
    print(f"rendered {args.pool} records in {t_pool:.1f}s; real: {_brief(real_row)}", flush=True)

    def export(step: int, params: Any) -> None:
        blob = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
        (out / f"teacher_step{step}.msgpack").write_bytes(blob)

    batches = epoch_indices(args.pool, batch_size, config.data.shuffle_seed)
    for _ in range(step):  # the batches a resumed state has already seen
        next(batches)
    t_train, images_last, metrics = 0.0, None, {"loss": float("nan")}
    deadline = t0 + args.seconds
    for target in eval_steps:
        t1 = time.perf_counter()
        while step < target and (step % 100 or time.perf_counter() < deadline):
            state, metrics = placement.step(state, placement.frozen, gather(pool, next(batches)))
            step += 1
        loss = float(metrics["loss"])  # also waits for the last step
        t_train += time.perf_counter() - t1
        ema = jax.device_get(state.ema_params)
        row, images_last = score(ema, sampler)
        result["curve"].append(
            {"step": step, "train_seconds": t_train, "loss": loss, "wall": _wall(t0), **row}
        )
        common.write_json(result, "teacher_curve.json", str(out / "teacher_curve.json"))
        print(f"step {step:6d} {t_train:7.1f}s loss {loss:.4f}  {_brief(row)}", flush=True)
        if step in save_steps:
            export(step, ema)
        write_parts(
            out / "teacher_state.msgpack", flax.serialization.to_bytes(jax.device_get(state))
        )
        if time.perf_counter() > deadline:
            break
    if step not in save_steps:
        export(step, ema)

    result["guidance"] = {}
    for scale in (float(s) for s in args.guidance.split(",") if s):
        row, _ = score(ema, dataclasses.replace(sampler, guidance_scale=scale))
        result["guidance"][str(scale)] = row
        print(f"guidance {scale:4}: {_brief(row)}", flush=True)
    result["steps_per_second"] = (step - result["start_step"]) / t_train
    result["wall_seconds"] = _wall(t0)
    common.write_json(result, "teacher_curve.json", str(out / "teacher_curve.json"))
    grid = reporting.sample_grid({"real": real, f"teacher {step}": images_last}, eval_captions, 12)
    grid.save(out / "teacher_curve_grid.png")


CATEGORIES = shapes.CATEGORIES


PART_BYTES = 15 * 2**20


def write_parts(path: Path, blob: bytes) -> None:
    """`blob` as `path.0`, `path.1`, ... of at most PART_BYTES each (stale higher parts removed)."""
    count = max(1, -(-len(blob) // PART_BYTES))
    for i in range(count):
        Path(f"{path}.{i}").write_bytes(blob[i * PART_BYTES : (i + 1) * PART_BYTES])
    while Path(f"{path}.{count}").exists():
        Path(f"{path}.{count}").unlink()
        count += 1


def read_parts(path: str) -> bytes:
    """The bytes `write_parts(path, ...)` wrote."""
    parts = []
    while Path(f"{path}.{len(parts)}").is_file():
        parts.append(Path(f"{path}.{len(parts)}").read_bytes())
    if not parts:
        raise FileNotFoundError(f"--resume {path}: no {path}.0")
    return b"".join(parts)


def load_state(path: str, fresh: Any, abstract: Any) -> Any:
    """The TrainState saved as `path.0`, `path.1`, ... by an earlier run, placed like `abstract`;
    `fresh` (this config's initial state) gives the structure, so a state of another config is an
    error."""
    host = flax.serialization.from_bytes(jax.device_get(fresh), read_parts(path))
    mismatched = [
        jax.tree_util.keystr(k)
        for (k, a), b in zip(
            jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(fresh), strict=True
        )
        if np.shape(a) != np.shape(b)
    ]
    if mismatched:
        raise ValueError(f"--resume {path}: shapes differ from this config at {mismatched[:5]}")
    return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), host, abstract)


def _brief(row: dict[str, Any]) -> str:
    acc = " ".join(f"{c[:5]} {row[c]:.3f}" for c in CATEGORIES if c in row)
    return f"{acc}  fd {row['fd_judge']:.2f}"


def _wall(t0: float) -> float:
    return round(time.perf_counter() - t0, 1)


if __name__ == "__main__":
    main()
