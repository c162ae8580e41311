"""Devices, meshes and shardings: the same program on 1 device, 8 fake CPU devices, a TPU pod slice
(several slices) or a multi-node GPU cluster.

Mesh axes `("data", "fsdp", "tensor")`. The batch is split over `data × fsdp`; parameters, optimizer
state and frozen models are sharded by LOGICAL axis rules: the models name the dimensions of their
kernels (`("embed", "mlp")`, `("conv_h", "conv_w", "conv_in", "conv_out")`, ...; see
`models/layers.py`) and `config.sharding_rules` maps those names to mesh axes. Parameters without
names that hold at least `config.fsdp_min_size` elements have their largest dimension divisible
by the `fsdp` axis sharded over it; everything else is replicated. Activations carry the same
logical names (`nn.with_logical_constraint`), which `with_rules` turns into sharding constraints.

Config (defaults in configs/run.py `training()`):
  mesh.{data, fsdp, tensor}: sizes inside one slice / node (ICI); one of them may be -1 (the rest).
  mesh.dcn_{data, fsdp, tensor}: sizes across TPU slices (multislice, DCN); one may be -1. With
    one slice (every GPU cluster, a single pod slice) they multiply to 1 and the ICI sizes cover
    all devices: jax.devices() is process-major, so the outermost axis (data) spans hosts.
  sharding_rules: ordered `(logical name, mesh axes)` pairs; the first rule whose mesh axes are
    free and divide the dimension wins (flax's priority semantics).
Meshes use Auto axis types (`jax.make_mesh`'s Explicit default breaks flax.linen convolutions).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

PyTree = Any
AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
Rules = tuple[tuple[str, tuple[str, ...]], ...]


# ----------------------------------------------------------------------------------- processes


def _multi_process_env() -> str | None:
    """The launcher that started several processes of this job, from its environment, or None."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # an srun step, not the batch script
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len(hosts.split(",")) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU pod"
    return None


def initialize_distributed(mode: str = "auto") -> bool:
    """Calls `jax.distributed.initialize()` once per process, before anything touches a device.

    mode "auto": only when the environment shows a multi-process launch (an srun of several tasks,
    Open MPI, a TPU pod's worker list, or `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` /
    `JAX_PROCESS_ID`); a single process is left alone. "on": always (a Cloud TPU VM pod is found
    through its metadata server, which has no environment variable). "off": never.
    Returns whether the distributed runtime is initialised.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed={mode!r}: use 'auto', 'on' or 'off'")
    if jax.distributed.is_initialized():
        return True
    launcher = _multi_process_env()
    if mode == "off" or (mode == "auto" and launcher is None):
        return False
    kwargs = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d (%s)",
        jax.process_index(),
        jax.process_count(),
        launcher or "forced",
    )
    return True


# ----------------------------------------------------------------------------------------- mesh


def _fill(sizes: dict[str, int], total: int, keys: dict[str, str]) -> dict[str, int]:
    """Replaces the one -1 in `sizes` so that they multiply to `total`; errors name `keys`."""
    bad = [keys[a] for a, n in sizes.items() if n == 0 or n < -1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: sizes must be positive or -1 (fill), got {sizes}")
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"only one of {', '.join(keys[a] for a in free)} may be -1")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if free:
        if total % fixed:
            raise ValueError(
                f"{' × '.join(f'{keys[a]}={n}' for a, n in sizes.items() if n != -1)} = {fixed} "
                f"does not divide the {total} devices to fill {keys[free[0]]}=-1"
            )
        sizes = {**sizes, free[0]: total // fixed}
    elif fixed != total:
        raise ValueError(
            f"{' × '.join(f'{keys[a]}={n}' for a, n in sizes.items())} = {fixed}, but there are "
            f"{total} devices"
        )
    return sizes


def mesh_sizes(
    config: Mapping[str, int], num_devices: int, num_slices: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`(per-slice sizes, across-slice sizes)` of the axes `AXES` from `config.mesh`."""
    per_slice, remainder = divmod(num_devices, num_slices)
    if remainder:
        raise ValueError(f"{num_devices} devices do not split evenly into {num_slices} slices")
    ici = _fill({a: int(config[a]) for a in AXES}, per_slice, {a: f"mesh.{a}" for a in AXES})
    dcn = _fill(
        {a: int(config.get(f"dcn_{a}", 1)) for a in AXES},
        num_slices,
        {a: f"mesh.dcn_{a}" for a in AXES},
    )
    return tuple(ici.values()), tuple(dcn.values())


def device_grid(config: Mapping[str, int], devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged `(data, fsdp, tensor)`: topology-aware inside each slice, slices
    outermost along the DCN sizes (`mesh_utils.create_hybrid_device_mesh`)."""
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_sizes(config, len(devices), num_slices)
    if num_slices == 1:
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def make_mesh(config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """The `("data", "fsdp", "tensor")` mesh of `config.mesh` over `devices` (default: all)."""
    grid = device_grid(config, list(devices if devices is not None else jax.devices()))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def local_batch_mesh(batch: int, devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D `("data",)` mesh over the most of this process's devices (default: all local ones)
    that divide `batch`: where sampling and evaluation split a batch, one slice per device."""
    devices = list(devices if devices is not None else jax.local_devices())
    count = max(n for n in range(1, len(devices) + 1) if batch % n == 0)
    return Mesh(np.array(devices[:count]), ("data",), axis_types=(AxisType.Auto,))


def _without_conv_in_batch_axes(rules: Rules, mesh: Mesh) -> Rules:
    """`rules` with the batch axes taken off `conv_in` (conv kernels' input channels) when the
    mesh also has `tensor` > 1; unchanged otherwise.

    Works around wrong gradients from XLA's SPMD partitioner (jax 0.10.2, CPU; Shardy and GSPMD
    propagation alike): on a (data, fsdp, tensor) = (2, 2, 2) mesh, with conv kernels sharded
    `(None, None, "fsdp", "tensor")` and the batch over `("data", "fsdp")`, the tiny Imagine
    Flash generator's gradients differ from 1 device in 253 of 286 UNet leaves (global norm 69.1
    instead of 48.0; worst `conv_in` and the `conv_shortcut` kernels) while the loss agrees to
    1e-7. Without the `conv_in` rule they agree to float32 rounding (norm 47.98841 vs 47.98843);
    moving only the activation `channels` rule did not help. (2, 4, 1) is exact with the rule,
    so it stays where `tensor` == 1. A lone conv, a conv + resnet + concat stack, and dx/dK of
    one conv on the same shardings are all exact: only the whole step triggers it.
    """
    if "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return rules
    out = []
    for name, axes in rules:
        if name == "conv_in" and set(axes) & set(BATCH_AXES):
            log.warning(
                "sharding rule (conv_in, %s) dropped on a mesh with tensor > 1 (XLA workaround, "
                "see parallel._without_conv_in_batch_axes)",
                axes,
            )
            axes = tuple(a for a in axes if a not in BATCH_AXES)
            if not axes:
                continue
        out.append((name, axes))
    return tuple(out)


def rules_from_config(rules: Sequence[Sequence[Any]], mesh: Mesh) -> Rules:
    """Validated `config.sharding_rules`: `(name, mesh axes)` pairs, axes a name, a sequence of
    names, or None (replicated), normalised to tuples; on meshes with `tensor` > 1 without the
    batch axes on `conv_in` (an XLA workaround, `_without_conv_in_batch_axes`)."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.sharding_rules[{i}]={rule!r}: need (logical name, mesh axes)")
        name, axes = rule
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"config.sharding_rules[{i}]={rule!r}: mesh axes {unknown} are not in "
                f"{mesh.axis_names}"
            )
        out.append((name, axes))
    return _without_conv_in_batch_axes(tuple(out), mesh)


def flax_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """`rules` in flax's `nn.logical_axis_rules` format (a name, a tuple, or None per rule)."""
    return tuple((n, a[0] if len(a) == 1 else (a or None)) for n, a in rules)


# ------------------------------------------------------------------------------------ shardings


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Mesh PartitionSpec of an array with logical dimension `names`: rules in priority order,
    each taken if its mesh axes are unused by earlier dimensions and divide the dimension."""
    assigned: list[tuple[str, ...] | None] = [None] * len(shape)
    used: set[str] = set()
    for name, axes in rules:
        if name not in names or not axes:
            continue
        dim = list(names).index(name)
        size = math.prod(mesh.shape[a] for a in axes)
        if assigned[dim] is None and not used & set(axes) and shape[dim] % size == 0:
            assigned[dim] = axes
            used |= set(axes)
    return P(*(a if a is None or len(a) > 1 else a[0] for a in assigned))


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int) -> P:
    """The size fallback: the largest dimension divisible by the `fsdp` axis, over `fsdp`, for
    arrays of at least `min_size` elements; replicated otherwise."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < min_size:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % n == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda i: shape[i])
    return P(*(("fsdp" if i == dim else None) for i in range(len(shape))))


def _path_key(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def annotation_table(annotated: PyTree) -> dict[tuple[str, ...], tuple[tuple[int, ...], tuple]]:
    """`{path: (shape, logical names)}` of the boxed leaves (`nn.LogicallyPartitioned`) of
    `annotated`, e.g. `jax.eval_shape` of a flax `init` (see `t2i.T2I.logical_axes`)."""
    table = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(annotated, is_leaf=_is_box)[0]:
        if _is_box(leaf):
            table[_path_key(path)] = (tuple(leaf.value.shape), tuple(leaf.names))
    return table


def tree_shardings(
    tree: PyTree,
    mesh: Mesh,
    rules: Rules,
    annotations: PyTree = None,
    fsdp_min_size: int = 2**20,
) -> PyTree:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs; boxed leaves keep
    their box, holding the sharding).

    A leaf's logical names come from its own box, else from `annotations` (`annotation_table`): the
    entry whose path is the longest suffix of the leaf's path, with the leaf's shape. So a
    `{"unet": ...}` annotation covers `params/unet/...`, `ema_params/unet/...`, the optimizer's
    `mu/unet/...` and a frozen `teacher/unet/...` alike. Leaves without names: `fsdp_spec`.
    """
    table = annotation_table(annotations) if annotations is not None else {}

    def names_for(path: tuple[str, ...], shape: tuple[int, ...]):
        for start in range(len(path)):
            entry = table.get(path[start:])
            if entry is not None:
                return entry[1] if entry[0] == shape else None
        return None

    def one(path, leaf):
        value = leaf.value if _is_box(leaf) else leaf
        shape = tuple(np.shape(value))
        names = tuple(leaf.names) if _is_box(leaf) else names_for(_path_key(path), shape)
        if names is not None and len(names) == len(shape):
            spec = logical_spec(names, shape, mesh, rules)
        else:
            spec = fsdp_spec(shape, mesh, fsdp_min_size)
        sharding = NamedSharding(mesh, spec)
        return leaf.replace_boxed(sharding) if _is_box(leaf) else sharding

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying `shardings`: restore targets (Orbax places arrays like this)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over `data × fsdp`, replicated over `tensor`."""
    return NamedSharding(mesh, P(BATCH_AXES))


def host_batch_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """`(shard index, shard count)` of the batch rows this process feeds: the contiguous block its
    devices hold. Processes holding the same rows (a `tensor` group spanning hosts) get the same
    index and must read the same data."""
    rows = sorted(
        {
            (idx[0].start or 0, idx[0].stop or global_batch)
            for idx in sharding.addressable_devices_indices_map((global_batch,)).values()
        }
    )
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(
            f"this process's devices hold batch rows {rows}, not one contiguous block; use a "
            "mesh whose data×fsdp groups are whole processes"
        )
    return start // (stop - start), global_batch // (stop - start)


def global_batch(local: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local arrays (this process's rows, see `host_batch_shard`) → global jax.Arrays."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Host arrays (the same full values on every process, e.g. weights read from disk) → global
    arrays in `shardings`; each device receives only its shard."""

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def cast_floats(tree: PyTree, dtype: str) -> PyTree:
    """Floating-point leaves (host or device) cast to `dtype` ("float32", "bfloat16", ...)."""
    dtype = jnp.dtype(dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)

    return jax.tree.map(one, tree)


def init_sharded(fn: Callable[..., PyTree], shardings: PyTree, *args: Any) -> PyTree:
    """`fn(*args)` created directly in `shardings`: a computed result (a random init) by
    `jit(fn, out_shardings=shardings)`, so it never exists unsharded; a result that `fn` only
    returns from host memory (weights read from disk) is copied into its shards with `put`
    instead of being compiled into the program as constants."""
    if not jax.make_jaxpr(fn)(*args).eqns:
        return put(fn(*args), shardings)
    return jax.jit(fn, out_shardings=shardings)(*args)


def with_rules(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """`fn` with the models' logical activation constraints active (they are no-ops otherwise):
    traced under `mesh`'s abstract mesh and `rules`, wherever it is traced."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with nn.logical_axis_rules(flax_rules(rules)):
                return fn(*args, **kwargs)

    return wrapped
