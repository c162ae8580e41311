"""The run: restore or init, data, the compiled step, periodic metrics / samples / checkpoints.

Outputs under `workdir`: `checkpoints/<step>/` (Orbax), `metrics.jsonl` (one JSON object per logged
step), `tensorboard/` (the same scalars and the sample grids as TensorBoard event files),
`samples/step_<step>.png` (captioned grids from the EMA parameters), `config.json`.

Placement (flash_jax/parallel.py): the state, the frozen models and each batch live on the
`config.mesh` mesh, sharded by `config.sharding_rules` (and by size, `config.fsdp_min_size`);
the frozen models are cast to `config.frozen_dtype`. One device is the 1×1×1 mesh.
A SIGTERM stops the run at the next step boundary once that step is checkpointed, or before the
first step if it arrives during start-up; a SIGINT (Ctrl-C) stops it at the next step boundary
once the checkpoint being written is complete, raising KeyboardInterrupt
(flash_jax/train/preemption.py). A rerun resumes from the last checkpoint, also on another mesh or
device count. A second run on the same workdir is refused
(flash_jax/train/lock.py); docs/faults.md lists the faults and what the run does about each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from flash_jax import config as flash_config
from flash_jax import methods, parallel
from flash_jax.data import shapes
from flash_jax.train import checkpoint, lock, preemption, tensorboard
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
        optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )


def make_data(
    config: ml_collections.ConfigDict,
    batch_size: int,
    split: str = "train",
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """The per-host Grain iterator for `config.data` (see `sources.make_dataset`); the shard
    defaults to this process's (`datasets.host_shard`)."""
    from flash_jax.data import sources  # grain + TFDS: only the data path needs them

    return iter(
        sources.make_dataset(
            config, batch_size, split, shard_index=shard_index, shard_count=shard_count
        )
    )


def _check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    data, fsdp = (mesh.shape[a] for a in parallel.BATCH_AXES)
    if batch_size % (data * fsdp):
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by the {data * fsdp} batch shards "
            f"of the mesh (mesh.data={data} × mesh.fsdp={fsdp}, all slices)"
        )


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records logged after `last_step` (by a run killed after its last checkpoint), so a
    resumed run's metrics have no duplicated steps; a line cut short by a crash mid-write ends the
    file there, with a warning."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s: line %d is not a complete record; truncated there", path, number)
            break
        if step <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def check_recorded_method(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Refuses a config whose method differs from the one recorded in `workdir/config.json`.

    Raises:
      flash_config.ConfigError: the methods differ, or config.json is not readable JSON.
    """
    path = Path(workdir) / "config.json"
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text()).get("method")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise flash_config.ConfigError(f"{path}: not a JSON config ({e})") from None
    if recorded is not None and recorded != config.method:
        raise flash_config.ConfigError(
            f"{workdir} holds a {recorded!r} run ({path}) but the config's method is "
            f"{config.method!r}: give that run's config, or another --workdir"
        )


def _remove_if_unused(workdir: Path) -> None:
    """Removes a workdir this run created when nothing but the lock and an empty checkpoints
    folder was written (the run failed before its first output)."""
    names = {p.name for p in workdir.iterdir()}
    ckpts = workdir / "checkpoints"
    if names <= {"lock", "checkpoints"} and not (ckpts.is_dir() and any(ckpts.iterdir())):
        shutil.rmtree(workdir)


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


def _keys(seed: int) -> tuple[jax.Array, ...]:
    """(init, discriminator init, state, sample-grid) keys of a run."""
    return tuple(jax.random.split(jax.random.PRNGKey(seed), 4))


@dataclasses.dataclass(frozen=True)
class Placement:
    """A run's program and data placement on one mesh: what `train` builds before its loop.

    Attributes:
      method: the configured method.
      abstract_state: the TrainState as ShapeDtypeStructs carrying their target shardings (what
        a checkpoint is restored onto, whatever mesh or device count wrote it).
      init_state: `() -> TrainState`, a fresh state created directly in its shards.
      frozen: the frozen models, cast to `config.frozen_dtype` and sharded.
      step: the compiled `(state, frozen, batch) -> (state, metrics)`; the state is donated.
      batch_sharding: where global batches live (`parallel.global_batch`).
    """

    method: methods.Method
    abstract_state: TrainState
    init_state: Callable[[], TrainState]
    frozen: Any
    step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    batch_sharding: jax.sharding.NamedSharding


def place(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Placement:
    """Builds `config.method` on `mesh`: shardings, sharded init, frozen models, compiled step."""
    rules = parallel.rules_from_config(config.sharding_rules, mesh)
    _check_batch_size(config.batch_size, mesh)
    method = methods.get(config.method)(config)
    tx = make_optimizer(config.optimizer)
    disc_tx = make_optimizer(config.disc_optimizer) if method.init_discriminator else None
    init_rng, disc_rng, state_rng, _ = _keys(config.seed)
    annotations = method.logical_axes() if method.logical_axes else None

    def shardings(tree: Any) -> Any:
        return parallel.tree_shardings(tree, mesh, rules, annotations, config.fsdp_min_size)

    def new_state(params, state_rng, disc_params):
        return init_state(params, tx, state_rng, disc_params, disc_tx)

    abstract_params = jax.eval_shape(method.init, init_rng)
    abstract_disc = (
        jax.eval_shape(method.init_discriminator, disc_rng) if method.init_discriminator else None
    )
    abstract_state = jax.eval_shape(new_state, abstract_params, state_rng, abstract_disc)
    state_sharding = shardings(abstract_state)

    def init_sharded_state() -> TrainState:
        params = parallel.init_sharded(method.init, state_sharding.params, init_rng)
        disc_params = (
            parallel.init_sharded(method.init_discriminator, state_sharding.disc_params, disc_rng)
            if method.init_discriminator
            else None
        )
        return jax.jit(new_state, out_shardings=state_sharding)(params, state_rng, disc_params)

    frozen = parallel.cast_floats(method.load_frozen(), config.frozen_dtype)
    frozen_sharding = shardings(frozen)
    batch_sharding = parallel.batch_sharding(mesh)
    step = make_train_step(
        method,
        tx,
        ema_decay=config.ema_decay,
        ema_warmup=config.get("ema_warmup", False),
        disc_tx=disc_tx,
    )
    return Placement(
        method=method,
        abstract_state=parallel.with_shardings(abstract_state, state_sharding),
        init_state=init_sharded_state,
        frozen=parallel.put(frozen, frozen_sharding),
        step=compile_train_step(
            parallel.with_rules(step, mesh, rules), state_sharding, frozen_sharding, batch_sharding
        ),
        batch_sharding=batch_sharding,
    )


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Trains `config.method` until `config.total_steps`, resuming from `workdir` if possible.

    Returns the final state; after a SIGTERM, the checkpointed state of an earlier step (its
    `step` is then below `config.total_steps`). Before anything is built: the config's values
    are checked, the workdir's recorded method must match, the workdir is locked and its
    checkpoint folder must be writable.
    """
    flash_config.check_training(config)
    workdir = Path(workdir)
    check_recorded_method(config, workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    try:
        with (
            preemption.watch_sigterm() as should_stop,
            preemption.defer_sigint() as interrupted,
            lock.hold(workdir) if is_main else contextlib.nullcontext(),
        ):
            checkpoint.check_writable(workdir / "checkpoints")
            return _train(config, workdir, should_stop, interrupted)
    except BaseException:
        if created and is_main:
            _remove_if_unused(workdir)
        raise


def _stop_interrupted(manager: Any, writer: Any, step: int) -> None:
    """After a SIGINT: waits for the checkpoint in flight, closes the outputs, raises
    KeyboardInterrupt."""
    log.warning("SIGINT at step %d: finishing the checkpoint in flight, then stopping", step)
    manager.wait_until_finished()
    manager.close()
    if writer:
        writer.close()
    log.warning("interrupted; the newest checkpoint is step %s", manager.latest_step())
    raise KeyboardInterrupt


def _train(
    config: ml_collections.ConfigDict,
    workdir: Path,
    should_stop: Callable[[int], bool],
    interrupted: Callable[[], bool] = lambda: False,
) -> TrainState:
    placement = place(config, parallel.make_mesh(config.mesh))
    method, step_fn, frozen = placement.method, placement.step, placement.frozen
    sample_rng = _keys(config.seed)[3]

    batch_sharding = placement.batch_sharding
    shard_index, shard_count = parallel.host_batch_shard(batch_sharding, config.batch_size)
    data = make_data(
        config.data,
        config.batch_size // shard_count,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    manager = checkpoint.make_manager(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints, async_save=True
    )
    restored = checkpoint.restore_latest(manager, placement.abstract_state)
    if restored is not None:
        state, extra = restored
        data.set_state(extra["data"])
        log.warning("resumed from step %d", int(state.step))
    else:
        state = placement.init_state()
    (workdir / "config.json").write_text(config.to_json(indent=2))

    raw_samples = next(make_data(config.data, config.num_samples, split="eval"))
    sample_captions = [str(c) for c in raw_samples["caption"]]
    sample_batch = method.prepare_batch(raw_samples)
    sample_fn = jax.jit(method.sample) if method.sample else None

    start = int(state.step)
    if interrupted():
        _stop_interrupted(manager, None, start)
    if should_stop(start):  # SIGTERM during start-up: nothing new to checkpoint
        log.warning("SIGTERM during start-up: stopped before step %d; rerun to resume", start + 1)
        manager.close()
        return state
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
        if interrupted():
            _stop_interrupted(manager, writer, step)
        checkpoint.check_saves(manager)
        batch = parallel.global_batch(method.prepare_batch(next(data)), batch_sharding)
        state, metrics = step_fn(state, frozen, batch)
        all_finite = jnp.minimum(all_finite, metrics["finite"])
        done = step + 1
        stop = should_stop(done)
        if done % config.log_every == 0 or done == config.total_steps:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if values["finite"] < 1.0:
                _raise_non_finite(done, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
            if is_main:
                _write_jsonl(metrics_file, {"step": done, **values})
                writer.scalars(done, values)
        if stop or done % config.checkpoint_every == 0 or done == config.total_steps:
            if float(all_finite) < 1.0:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _raise_non_finite(done, values)
            checkpoint.save(manager, state, {"data": data.get_state(), "step": done})
        if stop:
            log.warning("SIGTERM: stopped after checkpointing step %d; rerun to resume", done)
            break
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
