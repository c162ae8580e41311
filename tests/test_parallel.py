"""flash_jax.parallel: mesh sizes, logical axis rules, the FSDP size fallback, placement; and the
8-device equivalence / re-sharded restore checks (tests/multidevice_parallel.py, own process)."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from configs import run
from configs.shapes import imagine_flash as if_config
from flash_jax import parallel
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
RULES = parallel.rules_from_config(run.SHARDING_RULES, parallel.make_mesh(run.mesh()))


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), parallel.AXES, axis_types=(AxisType.Auto,) * 3)


def test_mesh_sizes_fill_and_refuse():
    config = run.mesh(data=-1, fsdp=4, tensor=2)
    assert parallel.mesh_sizes(config, 16) == ((2, 4, 2), (1, 1, 1))
    with pytest.raises(ValueError, match=r"mesh.fsdp=4 × mesh.tensor=2 = 8 does not divide the 12"):
        parallel.mesh_sizes(config, 12)
    with pytest.raises(ValueError, match=r"only one of mesh.data, mesh.fsdp may be -1"):
        parallel.mesh_sizes(run.mesh(data=-1, fsdp=-1), 8)
    with pytest.raises(ValueError, match=r"= 4, but there are 8 devices"):
        parallel.mesh_sizes(run.mesh(data=2, fsdp=2), 8)
    # Multislice: per-slice sizes fill each slice, the DCN -1 fills the slice count.
    assert parallel.mesh_sizes(run.mesh(fsdp=2), 16, num_slices=4) == ((2, 2, 1), (4, 1, 1))


class FakeDevice:
    def __init__(self, i, slice_index):
        self.id, self.slice_index, self.process_index = i, slice_index, slice_index
        self.platform = self.device_kind = "cpu"


def test_multislice_grid_puts_slices_outermost_on_data():
    devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4
    grid = parallel.device_grid(run.mesh(fsdp=2), devices)
    assert grid.shape == (4, 2, 1)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    np.testing.assert_array_equal(slices[:, :, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_logical_spec_priority_divisibility_and_free_axes():
    mesh = abstract_mesh(2, 4, 2)
    # Dense kernel: in features over fsdp, out features over tensor.
    assert parallel.logical_spec(("embed", "mlp"), (64, 128), mesh, RULES) == P("fsdp", "tensor")
    # 6 is not divisible by fsdp=4: that dimension stays whole.
    assert parallel.logical_spec(("embed", "mlp"), (6, 128), mesh, RULES) == P(None, "tensor")
    # Activations: batch takes data×fsdp first, so embed (→ fsdp) finds fsdp taken.
    spec = parallel.logical_spec(("batch", "length", "embed"), (16, 8, 64), mesh, RULES)
    assert spec == P(("data", "fsdp"), None, None)
    conv = parallel.logical_spec(
        ("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 32, 64), mesh, RULES
    )
    assert conv == P(None, None, "fsdp", "tensor")


def test_fsdp_fallback_by_size():
    mesh = abstract_mesh(1, 4, 1)
    assert parallel.fsdp_spec((1024, 6), mesh, 1000) == P("fsdp", None)
    assert parallel.fsdp_spec((6, 1024), mesh, 1000) == P(None, "fsdp")
    assert parallel.fsdp_spec((1024,), mesh, 2000) == P()  # below the size threshold
    assert parallel.fsdp_spec((1023, 3), mesh, 10) == P()  # nothing divisible
    assert parallel.fsdp_spec((64, 64), abstract_mesh(4, 1, 1), 1) == P()  # no fsdp axis


def test_annotations_reach_ema_optimizer_state_and_frozen_copies():
    """One `{"unet": ...}` annotation shards params, EMA, Adam moments and a frozen teacher's unet
    alike; unannotated leaves (norms, biases, Adam's count) fall back to the size rule."""
    model = T2I.from_config(if_config.get_config("tiny"))
    annotations = model.logical_axes()
    params = {"unet": jax.eval_shape(model.init, jax.random.PRNGKey(0))["unet"]}
    opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
    tree = {
        "params": params,
        "ema": params,
        "opt": opt_state,
        "frozen": {"teacher": params},
    }
    mesh = abstract_mesh(1, 2, 2)
    shardings = parallel.tree_shardings(tree, mesh, RULES, annotations, fsdp_min_size=10**9)
    kernel = (
        "unet",
        "conv_in",
        "kernel",
    )  # (3, 3, 4, 16): conv_in=4 over fsdp, conv_out over tensor
    expected = P(None, None, "fsdp", "tensor")

    def at(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    assert at(shardings["params"], kernel).spec == expected
    assert at(shardings["ema"], kernel).spec == expected
    assert at(shardings["frozen"]["teacher"], kernel).spec == expected
    assert at(shardings["opt"][0].mu, kernel).spec == expected
    assert at(shardings["opt"][0].nu, kernel).spec == expected
    assert shardings["opt"][0].count.spec == P()
    assert at(shardings["params"], ("unet", "conv_in", "bias")).spec == P()
    # With a small threshold the bias (16 elements) is sharded over fsdp by size.
    small = parallel.tree_shardings(tree, mesh, RULES, annotations, fsdp_min_size=8)
    assert at(small["params"], ("unet", "conv_in", "bias")).spec == P("fsdp")


def test_boxed_leaves_keep_their_box():
    """The discriminator's params are boxed (nn.LogicallyPartitioned) in the TrainState; their
    shardings come from the box itself and keep the box so the trees match."""
    box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 16), jnp.float32), ("embed", "mlp"))
    out = parallel.tree_shardings({"d": box}, abstract_mesh(1, 2, 2), RULES)
    assert isinstance(out["d"], nn.LogicallyPartitioned)
    assert out["d"].value.spec == P("fsdp", "tensor")


def test_rules_name_the_bad_entry():
    mesh = parallel.make_mesh(run.mesh())
    with pytest.raises(ValueError, match=r"sharding_rules\[1\].*\['model'\] are not in"):
        parallel.rules_from_config((("batch", "data"), ("embed", "model")), mesh)
    with pytest.raises(ValueError, match=r"sharding_rules\[0\].*need \(logical name, mesh axes\)"):
        parallel.rules_from_config((("batch",),), mesh)


def test_conv_in_loses_batch_axes_only_with_tensor_parallelism():
    """The XLA workaround: conv kernels keep input channels over fsdp unless tensor > 1."""
    assert dict(parallel.rules_from_config(run.SHARDING_RULES, abstract_mesh(2, 4, 1)))[
        "conv_in"
    ] == ("fsdp",)
    rules = parallel.rules_from_config(run.SHARDING_RULES, abstract_mesh(2, 2, 2))
    assert "conv_in" not in dict(rules)
    assert [r for r in rules] == [
        r
        for r in parallel.rules_from_config(run.SHARDING_RULES, abstract_mesh(2, 4, 1))
        if r[0] != "conv_in"
    ]
    kernel = ("conv_h", "conv_w", "conv_in", "conv_out")
    mesh = abstract_mesh(2, 2, 2)
    assert parallel.logical_spec(kernel, (3, 3, 32, 64), mesh, rules) == P(
        None, None, None, "tensor"
    )
    mixed = parallel.rules_from_config((("conv_in", ("fsdp", "tensor")),), mesh)
    assert mixed == (("conv_in", ("tensor",)),)


def test_single_device_placement_helpers():
    mesh = parallel.make_mesh(run.mesh(), jax.devices()[:1])
    sharding = parallel.batch_sharding(mesh)
    assert parallel.host_batch_shard(sharding, 8) == (0, 1)
    batch = parallel.global_batch({"x": np.arange(8.0)}, sharding)
    np.testing.assert_array_equal(batch["x"], np.arange(8.0))

    host = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    shardings = jax.tree.map(lambda _: sharding, host)
    # Returned from host memory: copied, not compiled; computed: jit with out_shardings.
    placed = parallel.init_sharded(lambda key: host, shardings, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(placed["w"], host["w"])
    computed = parallel.init_sharded(
        lambda key: {"w": jax.random.normal(key, (2, 3))}, shardings, jax.random.PRNGKey(0)
    )
    np.testing.assert_array_equal(computed["w"], jax.random.normal(jax.random.PRNGKey(0), (2, 3)))

    cast = parallel.cast_floats({"w": host["w"], "ids": np.arange(3)}, "bfloat16")
    assert cast["w"].dtype == jnp.bfloat16 and cast["ids"].dtype == np.arange(3).dtype


def test_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_STEP_NUM_TASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one srun task: nothing to coordinate
    assert parallel.initialize_distributed("auto") is False
    assert parallel.initialize_distributed("off") is False
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert parallel._multi_process_env() == "SLURM"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    assert parallel._multi_process_env() == "TPU pod"
    with pytest.raises(ValueError, match="distributed='maybe'"):
        parallel.initialize_distributed("maybe")


@pytest.mark.slow
@pytest.mark.multidevice
def test_eight_devices_match_one_and_checkpoints_reshard(tmp_path, tiny_assets):
    """Imagine Flash steps on the mesh (2,2,2) equal 1 device; a checkpoint of (2,2,2) restores
    on (1,8,1) and 1 device; evaluation batches split over 8 and 6 devices sample what 1 device
    does (tests/multidevice_parallel.py)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_parallel", str(tmp_path), str(tiny_assets)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ALL OK"
    checks = [line for line in lines if line.startswith("CHECK")]
    assert len(checks) == MESHES_CHECKED * (STEPS_CHECKED + 4) + 1 + 2 + 1, lines

    # This process has one device: the 8-device checkpoint still loads, as host arrays.
    assert jax.device_count() == 1
    loaded = checkpoint.load_params(tmp_path, "params")
    written = np.load(tmp_path / "written_params.npz")
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree.leaves_with_path(loaded)}
    assert sorted(flat) == sorted(written.files)
    for name, value in flat.items():
        np.testing.assert_array_equal(value, written[name], err_msg=name)


STEPS_CHECKED = 2  # tests/multidevice_parallel.py STEPS: one metrics CHECK per step and mesh
MESHES_CHECKED = 1  # len(tests/multidevice_parallel.py MESHES)
