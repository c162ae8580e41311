"""Multi-device checks on 8 simulated CPU devices; run by tests/test_parallel.py in its own process
(`python -m tests.multidevice_parallel OUT_DIR TINY_ASSETS`), since the device count is fixed at jax
import. TINY_ASSETS is the `tiny_assets` fixture's directory: its random tiny teacher and
autoencoder are the frozen models (initialising them here would cost half a minute of compiles).

1. The tiny Imagine Flash step (`loop.place`: sharded init, frozen models, compiled step, global
   batches) on the mesh (data, fsdp, tensor) = (2,2,2) gives the loss, metrics, parameters, EMA,
   optimizer and discriminator state of the same two steps on 1 device. (One mesh with every axis
   > 1: each 8-device compile of the fused step takes minutes on 2 cores.)
2. With `frozen_dtype="bfloat16"` the frozen models are stored in bfloat16 and the loss stays
   within a few percent (on 1 device).
3. A checkpoint written on (2,2,2) restores onto (1,8,1) and onto 1 device with identical values,
   in the target shardings (and, in the calling 1-device process, through `load_params`).
4. `generation.generate_batched` splits 14 prompts in batches of 8 over 8 devices, then 6 over 6,
   and samples what one device gives one image at a time.
Prints one `CHECK <name> <max abs diff>` line per comparison, then `ALL OK`.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs.shapes import imagine_flash as if_config
from flash_jax import parallel, sampling
from flash_jax.data import shapes
from flash_jax.eval import generation
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop

MESHES = ((2, 2, 2),)  # data, fsdp and tensor parallel at once (each mesh costs minutes here)
RTOL, ATOL = 2e-5, 1e-7  # float32 with other reduction orders (sums split 2-, 4- or 8-way)
BATCH = 8
STEPS = 2


def tiny_config(assets: Path):
    """Tiny Imagine Flash with random frozen models; lr > 0 from the second step (warm-up 1).

    Adam's ε is raised to 1e-3: with the default 1e-8, parameters whose gradient is exactly zero
    in exact arithmetic (a bias before a GroupNorm) but float noise (~1e-10) in practice move by
    ±lr·noise/(|noise| + ε), i.e. by noise-dependent amounts up to ~lr, on any two devices
    counts. With ε ≫ noise each update is a smooth function of the gradient, so updated
    parameters compare at float32 tolerance like the gradients themselves."""
    config = if_config.get_config("tiny")
    with config.unlocked():
        config.teacher_workdir = str(assets / "teacher.msgpack")
        config.autoencoder_workdir = str(assets / "autoencoder.msgpack")
        config.batch_size = BATCH
        for opt in (config.optimizer, config.disc_optimizer):
            opt.warmup_steps, opt.eps = 1, 1e-3
        config.fsdp_min_size = 64  # the size fallback shards the unannotated leaves too
        # The bounds below are calibrated on the uniform x̂0 loss; the normalized default divides by
        # per-step batch means and its 8-device opt_state differs by 2.7x the bound (open).
        config.imagine_flash.loss_weighting = "uniform"
    return config


def mesh_of(config, sizes, devices):
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    return parallel.make_mesh(config.mesh, devices)


def run(config, mesh, batches):
    """`STEPS` steps on `mesh`: (final state on host, per-step metrics, the device state)."""
    placement = loop.place(config, mesh)
    state = placement.init_state()
    metrics = []
    for raw in batches:
        batch = parallel.global_batch(placement.method.prepare_batch(raw), placement.batch_sharding)
        state, m = placement.step(state, placement.frozen, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, state


def max_diff(a, b) -> float:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


FAILURES = []


def assert_close(name, got, expected, rtol=RTOL, atol=ATOL):
    """Every leaf within `atol + rtol·|expected|`; prints the worst leaf's ratio to that bound
    (failures are collected, so one run reports every comparison)."""
    worst, worst_path = 0.0, ""
    flat_expected = dict(jax.tree.leaves_with_path(expected))
    for path, x in jax.tree.leaves_with_path(got):
        x, y = np.asarray(x, np.float64), np.asarray(flat_expected[path], np.float64)
        ratio = float(np.max(np.abs(x - y) / (atol + rtol * np.abs(y)), initial=0.0))
        if ratio > worst:
            worst, worst_path = ratio, jax.tree_util.keystr(path)
    print(
        f"CHECK {name} max|diff| {max_diff(got, expected):.3g} worst/bound {worst:.3g} at {worst_path}",
        flush=True,
    )
    if worst > 1.0:
        FAILURES.append(name)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def sharded_leaves(state) -> int:
    return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))


def check_generate_batched(config, assets: Path) -> None:
    """The tiny teacher's 2-step samples (latents) of 14 prompts: batches of 8 and 6 split over
    8 and 6 devices against batches of 1 on one device."""
    model = T2I.from_config(config)
    params = checkpoint.load_params(assets / "teacher.msgpack")
    captions = [f"a {c} {s}" for c in shapes.COLORS[:7] for s in ("circle", "square")]
    tokens = model.tokenizer()(captions)
    sampler = sampling.SamplerConfig(num_steps=2, noise_correction=True)
    devices_used = []

    @jax.jit
    def sample(params, tok, x_T):
        cond = model.encode_text(params["text"], tok)
        return sampling.sample(
            model.apply_unet, params["unet"], x_T, model.schedule, sampler, cond=cond
        )

    def generate_fn(params, tok, x_T, rng):
        del rng  # a deterministic sampler
        devices_used.append(len(x_T.sharding.device_set))
        return sample(params, tok, x_T)

    shape = model.latent_shape(1, config.data.image_size)[1:]
    got = generation.generate_batched(generate_fn, params, tokens, shape, seed=3, batch_size=8)
    assert devices_used == [8, 6], devices_used
    expected = generation.generate_batched(generate_fn, params, tokens, shape, seed=3, batch_size=1)
    assert set(devices_used[2:]) == {1}, devices_used
    assert_close("generate_batched on 8 and 6 devices", got, expected)


def main(out: Path, assets: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(assets)
    data = loop.make_data(config.data, BATCH)
    batches = [next(data) for _ in range(STEPS)]

    expected, expected_metrics, _ = run(
        config, mesh_of(config, (1, 1, 1), jax.devices()[:1]), batches
    )
    written = None
    for sizes in MESHES:
        mesh = mesh_of(config, sizes, jax.devices())
        got, metrics, device_state = run(config, mesh, batches)
        print(f"MESH {sizes}: {sharded_leaves(device_state)} sharded leaves", flush=True)
        assert sharded_leaves(device_state) > 0
        for i, (m, e) in enumerate(zip(metrics, expected_metrics, strict=True)):
            assert_close(f"{sizes} metrics step {i + 1}", m, e)
        assert_close(f"{sizes} params", got.params, expected.params)
        assert_close(f"{sizes} ema", got.ema_params, expected.ema_params)
        assert_close(f"{sizes} opt_state", got.opt_state, expected.opt_state)
        assert_close(
            f"{sizes} disc",
            (got.disc_params, got.disc_opt_state),
            (
                expected.disc_params,
                expected.disc_opt_state,
            ),
        )
        if sizes == (2, 2, 2):
            written = got
            manager = checkpoint.make_manager(out / "checkpoints", async_save=False)
            checkpoint.save(manager, device_state, {"step": STEPS})
            manager.close()
            np.savez(out / "written_params.npz", **flat(got.params))

    # Frozen models in bfloat16 (config.frozen_dtype): stored so, and the loss stays close. On one
    # device: the dtype path does not depend on the mesh, and an 8-device compile costs minutes.
    with config.unlocked():
        config.frozen_dtype = "bfloat16"
    one_device = mesh_of(config, (1, 1, 1), jax.devices()[:1])
    placement = loop.place(config, one_device)
    # Compared as np.dtype objects: `dtype('bfloat16') == jnp.bfloat16` holds, but the two hash
    # differently, so a set of leaf dtypes is never equal to `{jnp.bfloat16}`.
    frozen_dtypes = {leaf.dtype for leaf in jax.tree.leaves(placement.frozen)}
    assert frozen_dtypes == {jnp.dtype(jnp.bfloat16)}, frozen_dtypes
    _, metrics, _ = run(config, one_device, batches[:1])
    rel = abs(metrics[0]["srl"] - expected_metrics[0]["srl"]) / expected_metrics[0]["srl"]
    assert rel < 0.05, (metrics[0], expected_metrics[0])
    print(f"CHECK bfloat16 frozen srl relative {rel:.3g}", flush=True)
    with config.unlocked():
        config.frozen_dtype = "float32"

    for sizes, devices in (((1, 8, 1), jax.devices()), ((1, 1, 1), jax.devices()[:1])):
        placement = loop.place(config, mesh_of(config, sizes, devices))
        manager = checkpoint.make_manager(out / "checkpoints", async_save=False)
        restored, extra = checkpoint.restore_latest(manager, placement.abstract_state)
        manager.close()
        assert extra == {"step": STEPS}
        targets = jax.tree.leaves(placement.abstract_state)
        for leaf, target in zip(jax.tree.leaves(restored), targets, strict=True):
            assert leaf.sharding == target.sharding, (leaf.sharding, target.sharding)
        diff = max_diff(jax.device_get(restored), written)
        assert diff == 0.0, diff
        print(f"CHECK restore (2, 2, 2) -> {sizes} {diff:.3g}", flush=True)
    check_generate_batched(config, assets)
    assert not FAILURES, FAILURES
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
