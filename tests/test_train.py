"""The generic trainer: exact resume (also after SIGKILL), checkpoint fallback, refusals of bad input."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.shapes import autoencoder as ae_config
from flash_jax import methods, weights
from flash_jax.train import checkpoint, loop, preemption, tensorboard
from flash_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    config = ae_config.get_config("tiny")
    with config.unlocked():
        config.update(overrides)
    return config


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_identical(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step tiny autoencoder run with checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, loop.train(tiny_config(), workdir)


def test_run_writes_metrics_samples_and_checkpoints(uninterrupted):
    workdir, state = uninterrupted
    assert int(state.step) == 6
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"loss"' in lines[0]
    assert (workdir / "samples" / "step_0000006.png").is_file()
    (events,) = (workdir / "tensorboard").iterdir()
    records = tensorboard.read_events(events)
    assert [r["step"] for r in records if r.get("scalars")] == [1, 2, 3, 4, 5, 6]
    assert "samples" in records[-1]["images"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]


def test_resume_in_process_is_exact(uninterrupted, tmp_path):
    _, expected = uninterrupted
    loop.train(tiny_config(total_steps=3), tmp_path)
    resumed = loop.train(tiny_config(), tmp_path)
    assert int(resumed.step) == 6
    assert_trees_identical(resumed, expected)


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path, caplog):
    workdir, _ = uninterrupted
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    manager = checkpoint.make_manager(tmp_path / "checkpoints", async_save=False)
    abstract = checkpoint.abstract_like(loop.train(tiny_config(total_steps=0), tmp_path / "fresh"))
    state, extra = checkpoint.restore_latest(manager, abstract)
    assert int(state.step) == 3 and extra["step"] == 3
    assert "checkpoints/6 cannot be used" in caplog.text
    assert (tmp_path / "checkpoints" / "6.corrupt").is_dir()  # moved aside: step 6 can be rewritten

    for f in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* restores"):
        checkpoint.restore_latest(manager, abstract)


def test_frozen_encoder_keeps_the_latent_space_and_trains_the_decoder(uninterrupted, tmp_path):
    """`init_from` + `freeze_encoder`: the encoder side keeps the loaded values bit for bit, in the
    parameters and the EMA that consumers load, while the decoder trains."""
    start_dir, _ = uninterrupted
    start = checkpoint.load_params(start_dir)
    config = tiny_config(init_from=str(start_dir), freeze_encoder=True, ema_decay=0.0)
    state = jax.device_get(loop.train(config, tmp_path))
    for trained in (state.params, state.ema_params, checkpoint.load_params(tmp_path)):
        for part in ("encoder", "quant_conv"):
            assert_trees_identical(trained[part], start[part])
        moved = [
            not np.array_equal(x, y)
            for x, y in zip(_leaves(trained["decoder"]), _leaves(start["decoder"]), strict=True)
        ]
        assert sum(moved) > len(moved) // 2, f"{sum(moved)} of {len(moved)} decoder leaves moved"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"freeze_encoder": True}, "freeze_encoder=True needs config.init_from"),
        (
            {"freeze_encoder": True, "init_from": "assets/shapes/autoencoder.msgpack"},
            "needs config.ema_decay=0, got 0.99",
        ),
    ],
    ids=["no init_from", "EMA on"],
)
def test_frozen_encoder_refuses_incomplete_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        methods.get("autoencoder")(tiny_config(**overrides))


def test_init_from_another_architecture_names_the_file_and_the_shapes(tmp_path):
    config = tiny_config(init_from="assets/shapes/autoencoder.msgpack")  # "base", not "tiny"
    with pytest.raises(weights.WeightsError, match=r"config.init_from=assets/shapes/autoencoder"):
        loop.train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nan_stops_without_checkpoint(tmp_path):
    config = tiny_config(log_every=100)
    config.optimizer.learning_rate = 1e30  # (a NaN rate is refused before compute)
    with pytest.raises(loop.NonFiniteError, match="non-finite loss or gradient at step 3"):
        loop.train(config, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


def _main(workdir, *flags, **kwargs):
    cmd = [sys.executable, "-m", "flash_jax.main", f"--workdir={workdir}", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} | kwargs.pop("env", {})
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **kwargs)


@pytest.mark.parametrize(
    "flag, env, message",
    [
        ("--config.no_such_key=1", {}, "no_such_key"),
        ("--config.batch_size=four", {}, "batch_size"),
        (
            "--config.batch_size=6",
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
            "batch_size=6 is not divisible by the 4",
        ),
    ],
    ids=["unknown key", "wrong type", "batch not divisible by devices"],
)
def test_bad_config_is_refused_before_anything_runs(tmp_path, flag, env, message):
    proc = _main(
        tmp_path / "run",
        "--config=configs/shapes/autoencoder.py:tiny",
        flag,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigkill_then_restart_is_bit_identical(uninterrupted, tmp_path):
    """Kill -9 right after step 4 is logged (checkpoint 3 may still be in flight), restart."""
    _, expected = uninterrupted
    flags = ["--config=configs/shapes/autoencoder.py:tiny"]
    proc = _main(tmp_path, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"

    restart = _main(tmp_path, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = restart.communicate(timeout=300)
    assert restart.returncode == 0, err
    manager = checkpoint.make_manager(tmp_path / "checkpoints", async_save=False)
    restored, _ = checkpoint.restore_latest(manager, checkpoint.abstract_like(expected))
    assert int(restored.step) == 6
    assert_trees_identical(restored, expected)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines logged after the last checkpoint were dropped


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path):
    """SIGTERM once step 1 is logged: the run checkpoints the step it reaches next, exits with
    preemption.EXIT_CODE; that checkpoint equals an uninterrupted run of as many steps, and the
    rerun resumes from it and finishes."""
    total = 100  # far more steps than can pass between the signal and the next step boundary
    flags = [
        "--config=configs/shapes/autoencoder.py:tiny",
        f"--config.total_steps={total}",
        "--config.checkpoint_every=1000",  # only SIGTERM and the end checkpoint
        "--config.sample_every=1000",
    ]
    proc = _main(tmp_path, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail(f"no step logged before the run ended or 300 s passed: {proc.wait()}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == preemption.EXIT_CODE, err[-3000:]
    assert "SIGTERM: stopped after checkpointing step" in err

    stopped = len(metrics.read_text().splitlines())
    assert 1 <= stopped < total
    assert [int(p.name) for p in (tmp_path / "checkpoints").iterdir()] == [stopped]
    expected = loop.train(
        tiny_config(total_steps=stopped, checkpoint_every=1000, sample_every=1000),
        tmp_path / "reference",
    )
    manager = checkpoint.make_manager(tmp_path / "checkpoints", async_save=False)
    restored, extra = checkpoint.restore_latest(manager, checkpoint.abstract_like(expected))
    assert extra["step"] == stopped
    assert_trees_identical(restored, expected)

    rerun = _main(tmp_path, *flags, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, total + 1))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [stopped, total]
    # The stopped-and-resumed run ends where an uninterrupted one does, bit for bit.
    expected = loop.train(
        tiny_config(total_steps=total, checkpoint_every=1000, sample_every=1000),
        tmp_path / "reference_full",
    )
    manager = checkpoint.make_manager(tmp_path / "checkpoints", async_save=False)
    restored, extra = checkpoint.restore_latest(manager, checkpoint.abstract_like(expected))
    assert extra["step"] == total
    assert_trees_identical(restored, expected)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_weight_left_on_the_starting_parameters(warmup):
    """EMA of params held at 1 from an EMA that starts at 0: after n updates its value is 1 minus
    the weight left on the start, ∏ decay_t: 0.99^150 ≈ 22 % without the warm-up, ∏ (1+t)/(10+t)
    = 150!·9!/159! with it."""
    ema, ones = {"w": jax.numpy.zeros(())}, {"w": jax.numpy.ones(())}
    for t in range(150):
        ema = step_lib._ema(ema, ones, step_lib.ema_decay_at(t, 0.99, warmup))
    left = 1.0 - float(ema["w"])
    want = math.factorial(150) * math.factorial(9) / math.factorial(159) if warmup else 0.99**150
    assert left == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert (left < 1e-6) == warmup
