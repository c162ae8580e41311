"""The run: restore or init, data, the compiled step, periodic metrics / samples / checkpoints.

Outputs under `workdir`: `checkpoints/<step>/` (Orbax), `metrics.jsonl` (one JSON object per logged
step), `tensorboard/` (the same scalars and the sample grids as TensorBoard event files),
`samples/step_<step>.png` (captioned grids from the EMA parameters), `config.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from flash_jax import methods
from flash_jax.data import shapes
from flash_jax.train import checkpoint, tensorboard
from flash_jax.train.state import TrainState, init_state
from flash_jax.train.step import compile_train_step, make_train_step

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; nothing was checkpointed from that state."""


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with linear warm-up to a constant rate and global-norm clipping."""
    schedule = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay),
    )


def make_data(config: ml_collections.ConfigDict, batch_size: int, split: str = "train"):
    """The per-host Grain iterator for `config.data` (see `sources.make_dataset`)."""
    from flash_jax.data import sources  # grain + TFDS: only the data path needs them

    return iter(sources.make_dataset(config, batch_size, split))


def _check_batch_size(batch_size: int) -> None:
    n = jax.local_device_count()
    if batch_size % n:
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by the {n} local devices"
        )


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records logged after `last_step` (by a run killed after its last checkpoint), so a
    resumed run's metrics have no duplicated steps."""
    if path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _raise_non_finite(step: int, metrics: dict[str, float]) -> None:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    raise NonFiniteError(
        f"non-finite loss or gradient at step {step} ({shown}); stopping without writing a "
        "checkpoint from this state. Try a lower optimizer.learning_rate or optimizer.grad_clip, "
        "and check the input data."
    )


def write_sample_grid(images: np.ndarray, captions: list[str], path: Path):
    """Saves uint8 images `(B, H, W, 3)` as a captioned PNG grid; returns the PIL image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = [{"image": im, "caption": c} for im, c in zip(images, captions, strict=True)]
    grid = shapes.grid_image(examples, cols=min(4, len(examples)))
    grid.save(path)
    return grid


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains `config.method` until `config.total_steps`, resuming from `workdir` if possible."""
    _check_batch_size(config.batch_size)
    method = methods.get(config.method)(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tx = make_optimizer(config.optimizer)
    disc_tx = make_optimizer(config.disc_optimizer) if method.init_discriminator else None

    rng = jax.random.PRNGKey(config.seed)
    init_rng, disc_rng, state_rng, sample_rng = jax.random.split(rng, 4)
    params = method.init(init_rng)
    disc_params = method.init_discriminator(disc_rng) if method.init_discriminator else None
    state = init_state(params, tx, state_rng, disc_params, disc_tx)

    data = make_data(config.data, config.batch_size // jax.process_count())
    manager = checkpoint.make_manager(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints, async_save=True
    )
    restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
    if restored is not None:
        state, extra = restored
        data.set_state(extra["data"])
        log.info("resumed from step %d", int(state.step))
    (workdir / "config.json").write_text(config.to_json(indent=2))

    frozen = method.load_frozen()
    step_fn = compile_train_step(
        make_train_step(method, tx, ema_decay=config.ema_decay, disc_tx=disc_tx)
    )
    raw_samples = next(make_data(config.data, config.num_samples, split="eval"))
    sample_captions = [str(c) for c in raw_samples["caption"]]
    sample_batch = method.prepare_batch(raw_samples)
    sample_fn = jax.jit(method.sample) if method.sample else None

    start = int(state.step)
    metrics_file = workdir / "metrics.jsonl"
    is_main = jax.process_index() == 0
    if is_main:
        _truncate_jsonl(metrics_file, start)
    writer = tensorboard.SummaryWriter(workdir / "tensorboard") if is_main else None
    all_finite = jnp.ones((), jnp.float32)
    progress = tqdm(
        range(start, config.total_steps),
        initial=start,
        total=config.total_steps,
        desc=config.method,
        disable=not is_main,
    )
    for step in progress:
        batch = method.prepare_batch(next(data))
        state, metrics = step_fn(state, frozen, batch)
        all_finite = jnp.minimum(all_finite, metrics["finite"])
        done = step + 1
        if done % config.log_every == 0 or done == config.total_steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if values["finite"] < 1.0:
                _raise_non_finite(done, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            if is_main:
                _write_jsonl(metrics_file, {"step": done, **values})
                writer.scalars(done, values)
        if done % config.checkpoint_every == 0 or done == config.total_steps:
            if float(all_finite) < 1.0:
                _raise_non_finite(done, {k: float(v) for k, v in jax.device_get(metrics).items()})
            checkpoint.save(manager, state, {"data": data.get_state(), "step": done})
        if sample_fn and (done % config.sample_every == 0 or done == config.total_steps):
            images = sample_fn(state.ema_params, frozen, sample_batch, sample_rng)
            if is_main:
                grid = write_sample_grid(
                    np.asarray(images),
                    sample_captions,
                    workdir / "samples" / f"step_{done:07d}.png",
                )
                writer.image(done, "samples", grid)
    if writer:
        writer.close()
    manager.wait_until_finished()
    manager.close()
    return state
