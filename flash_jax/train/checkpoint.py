"""The only module that talks to Orbax.

A checkpoint is one step directory holding `state` (the TrainState pytree) and `extra` (JSON: the
data iterator state, the step and a digest of every array of `state`). Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves no directory that could be
mistaken for a good one. Restore takes the newest checkpoint that restores AND matches its digests
(damaged bytes that still decode are caught there); a bad one is reported and skipped, and once an
older one restores, the bad newer ones are moved aside to `<step>.corrupt` so the run can write
those steps again. If checkpoints exist but none restores (a damaged run, or a config whose model
differs from the one that wrote them), the run stops instead of silently starting fresh.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flash_jax.train.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def check_writable(directory: str | Path) -> None:
    """Creates `directory` and writes a probe file in it, so a checkpoint folder that cannot be
    written stops the run before compute, naming the path and the OS error."""
    directory = Path(directory)
    probe = directory / ".write_probe"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {e}") from None


def make_manager(
    directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """A manager over `directory` (created if missing), keeping the newest `max_to_keep` steps.
    Step directories are created before `save` returns, so a folder that cannot be written fails
    there, not in a background thread."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "extra")
    )


def _leaf_digest(x: jax.Array) -> jax.Array:
    """uint32 `(2,)`: the sum of the array's words and their position-weighted sum, mod 2**32
    (exact integer sums: the same on any mesh; any single changed word changes both)."""
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        words = words.astype(jnp.uint32)
    words = words.ravel()
    odd = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
    return jnp.stack([words.sum(dtype=jnp.uint32), (words * odd).sum(dtype=jnp.uint32)])


_digests = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def _path(keys: tuple[Any, ...]) -> str:
    """`params/unet/conv/kernel`: the same for a TrainState and the dicts it is saved as."""
    names = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in keys)
    return "/".join(str(n) for n in names)


def digests(tree: Any, prefix: str = "") -> dict[str, list[int]]:
    """`{prefix + leaf path: [sum, weighted sum]}` of every array in `tree` (`_leaf_digest`)."""
    values = jax.device_get(_digests(tree))
    flat, _ = jax.tree_util.tree_flatten_with_path(values)
    return {prefix + _path(path): [int(v) for v in d] for path, d in flat}


def _check_digests(
    tree: Any, expected: dict[str, list[int]] | None, where: str, prefix: str = ""
) -> None:
    """Raises `CheckpointError` unless `tree` (the part of the saved state under `prefix`) has
    the digests saved with it."""
    if expected is None:  # written before digests existed: cannot be verified
        return
    got = digests(tree, prefix)
    expected = {k: v for k, v in expected.items() if k.startswith(prefix)}
    bad = sorted(k for k in expected if got.get(k) != expected[k])
    if bad or set(got) != set(expected):
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{where}: arrays differ from the digests saved with them ({shown})")


def save(manager: ocp.CheckpointManager, state: TrainState, extra: dict[str, Any]) -> None:
    """Saves `state` at its step (asynchronously if the manager is async) with JSON `extra` and
    the digests of its arrays; a failed write (also of an earlier async save) raises
    `CheckpointError` naming the directory and the OS error."""
    step = int(jax.device_get(state.step))
    extra = {**extra, "digests": digests(state)}
    try:
        manager.check_for_errors()
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
            ),
            force=True,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"writing checkpoint {step} to {manager.directory} failed: {type(e).__name__}: {e}"
        ) from None


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises `CheckpointError` if an asynchronous save has failed (called every step)."""
    try:
        manager.check_for_errors()
    except Exception as e:  # whatever the writer thread raised
        raise CheckpointError(
            f"writing a checkpoint to {manager.directory} failed: {type(e).__name__}: {e}"
        ) from None


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


def move_aside(directory: str | Path, step: int) -> Path:
    """Renames `directory/<step>` to `<step>.corrupt` (`.corrupt.N` if taken); Orbax no longer
    sees it as a step, so that step can be written again."""
    src = Path(directory) / str(step)
    dst, n = src.with_name(f"{step}.corrupt"), 1
    while dst.exists():
        dst, n = src.with_name(f"{step}.corrupt.{n}"), n + 1
    src.rename(dst)
    return dst


def abstract_like(state: TrainState) -> TrainState:
    """Shape/dtype/sharding skeleton of `state`: restore places arrays exactly like this."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: TrainState, *, move_bad: bool = True
) -> tuple[TrainState, dict[str, Any]] | None:
    """`(state, extra)` of the newest checkpoint that restores and matches its digests, or None
    when there is none at all. Newer ones that failed are skipped with a warning naming them and,
    with `move_bad` (process 0 of a training run), moved aside (`move_aside`).

    Raises:
      CheckpointError: checkpoints exist but none of them restores.
    """
    manager.wait_until_finished()
    steps = sorted(manager.all_steps(), reverse=True)
    bad: list[int] = []
    errors = []
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()
                ),
            )
            extra = dict(restored["extra"])
            _check_digests(restored["state"], extra.pop("digests", None), f"checkpoint {step}")
        except Exception as e:  # any failure makes this step unusable
            errors.append(f"step {step}: {_short(e)}")
            log.warning(
                "checkpoint %s/%d cannot be used (%s); trying the previous one",
                manager.directory,
                step,
                _short(e),
            )
            bad.append(step)
            continue
        # An older one restores, so the newer failures are damage, not a model change.
        if bad and move_bad:
            if jax.process_index() == 0:
                for b in bad:
                    log.warning(
                        "moved the damaged checkpoint %d to %s", b, move_aside(manager.directory, b)
                    )
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("flash_jax: bad checkpoints moved aside")
            manager.reload()
        return restored["state"], extra
    if steps:
        raise CheckpointError(
            f"no checkpoint in {manager.directory} restores with this config (damaged files, or a "
            "config whose model differs from the one that wrote them):\n  " + "\n  ".join(errors)
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
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint (train that stage first)")
    errors = []
    for step in steps:  # the newest usable one, as a training run resumes
        try:
            # Host arrays as the target: readable whatever mesh or device count wrote it.
            host = jax.tree.map(
                lambda m: np.empty(m.shape, m.dtype), manager.item_metadata(step)["state"]
            )
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(host), extra=ocp.args.JsonRestore()
                ),
            )
            state = restored["state"]
            if field not in state:
                raise CheckpointError(f"no field {field!r} (has {sorted(state)})")
            saved = restored["extra"].get("digests")
            with jax.ensure_compile_time_eval():  # also when called while tracing (init_from)
                _check_digests(state[field], saved, f"{directory}/{step}", prefix=f"{field}/")
            break
        except Exception as e:  # any failure makes this step unusable
            errors.append(f"step {step}: {_short(e)}")
            log.warning(
                "checkpoint %s/%d cannot be used (%s); trying the previous one",
                directory,
                step,
                _short(e),
            )
    else:
        manager.close()
        raise CheckpointError(f"{directory}: no usable checkpoint:\n  " + "\n  ".join(errors))
    manager.close()
    return jax.device_get(state[field])


def export_params(workdir: str | Path, path: str | Path, field: str = "ema_params") -> Path:
    """Writes one field of the newest checkpoint as a standalone msgpack file (for assets/)."""
    params = load_params(workdir, field)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
    return path
