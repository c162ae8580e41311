"""The only module that talks to Orbax.

A checkpoint is one step directory holding `state` (the TrainState pytree) and `extra` (JSON: the
data iterator state and the run's config). Orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves no directory that could be mistaken for a good one.
Restore takes the newest readable checkpoint; an unreadable one is reported and skipped, and if
checkpoints exist but none can be read, the run stops instead of silently starting fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from flash_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def make_manager(
    directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """A manager over `directory` (created if missing), keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "extra")
    )


def save(manager: ocp.CheckpointManager, state: TrainState, extra: dict[str, Any]) -> None:
    """Saves `state` at its step (asynchronously if the manager is async) with JSON `extra`."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
        force=True,
    )


def abstract_like(state: TrainState) -> TrainState:
    """Shape/dtype/sharding skeleton of `state`: restore places arrays exactly like this."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: TrainState
) -> tuple[TrainState, dict[str, Any]] | None:
    """`(state, extra)` of the newest readable checkpoint, or None when there is none at all.

    Raises:
      CheckpointError: checkpoints exist but none of them can be read.
    """
    manager.wait_until_finished()
    steps = sorted(manager.all_steps(), reverse=True)
    errors = []
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            log.warning(
                "checkpoint at step %d in %s is unreadable (%s: %s); falling back to the previous one",
                step,
                manager.directory,
                type(e).__name__,
                e,
            )
            continue
        return restored["state"], restored["extra"]
    if steps:
        raise CheckpointError(
            f"no readable checkpoint in {manager.directory}:\n  " + "\n  ".join(errors)
        )
    return None


def load_params(workdir: str | Path, field: str = "ema_params") -> Any:
    """One field of the newest checkpoint in `workdir/checkpoints` (e.g. a trained VAE or teacher
    to freeze), as host numpy arrays, whatever mesh wrote it; no optimizer structure needs to be
    known. `workdir` may also be a
    `.msgpack` file written by `export_params` (the small trained models shipped in assets/).

    Raises:
      CheckpointError: there is no checkpoint, naming the directory.
    """
    if Path(workdir).suffix == ".msgpack":
        if not Path(workdir).is_file():
            raise CheckpointError(f"{workdir}: no such parameter file")
        return flax.serialization.msgpack_restore(Path(workdir).read_bytes())
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoints (train that stage first)")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "extra": ocp.JsonCheckpointHandler(),
        },
    )
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"{directory}: no complete checkpoint (train that stage first)")
    # Host arrays as the target: readable whatever mesh or device count wrote the checkpoint.
    host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(host)))
    manager.close()
    state = restored["state"]
    if field not in state:
        raise CheckpointError(f"{directory}/{step}: no field {field!r} (has {sorted(state)})")
    return jax.device_get(state[field])


def export_params(workdir: str | Path, path: str | Path, field: str = "ema_params") -> Path:
    """Writes one field of the newest checkpoint as a standalone msgpack file (for assets/)."""
    params = load_params(workdir, field)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
    return path
