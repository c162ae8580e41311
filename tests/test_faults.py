"""Faults injected the way a user meets them (docs/faults.md): damaged checkpoints (truncated files,
overwritten bytes), a second process on the workdir, a checkpoint folder that cannot be written, a
half-written metrics line, SIGTERM during start-up, out-of-range config values, a changed model or
method on an existing run. Each is either survived exactly or refused before compute, naming the
file or key."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.shapes import comparison
from configs.shapes import teacher as teacher_config
from flash_jax import config as flash_config
from flash_jax import export, weights
from flash_jax.eval import evaluate, judge
from flash_jax.train import checkpoint, lock, loop, preemption

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import assert_trees_identical, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 6-step tiny autoencoder run with checkpoints at steps 3 and 6, and its final state."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, loop.train(tiny_config(), workdir)


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    return dst


def _state_files(workdir: Path, step: int) -> list[Path]:
    files = [f for f in (workdir / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()]
    return sorted(files, key=lambda f: f.stat().st_size, reverse=True)


def _metrics_steps(workdir: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


def test_keep_checkpoints_0_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(
        flash_config.ConfigError, match="keep_checkpoints=0 must be an integer >= 1"
    ):
        loop.train(tiny_config(keep_checkpoints=0), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_truncated_latest_checkpoint_is_moved_aside_and_the_rerun_is_bit_identical(
    finished, tmp_path, caplog
):
    """The probe: truncate every file of checkpoints/6/state, rerun the same command."""
    source, expected = finished
    workdir = _copy_run(source, tmp_path / "run")
    for f in _state_files(workdir, 6):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    state = loop.train(tiny_config(), workdir)
    assert int(state.step) == 6
    assert_trees_identical(state, expected)
    assert "checkpoints/6 cannot be used" in caplog.text
    assert (workdir / "checkpoints" / "6.corrupt").is_dir()
    manager = checkpoint.make_manager(workdir / "checkpoints", async_save=False)
    assert manager.all_steps() == [3, 6]
    restored, _ = checkpoint.restore_latest(manager, checkpoint.abstract_like(expected))
    assert_trees_identical(restored, expected)  # the rewritten step 6
    assert _metrics_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_sample_and_eval_loading_falls_back_past_a_damaged_checkpoint(finished, tmp_path, caplog):
    source, _ = finished
    only_3 = _copy_run(source, tmp_path / "only_3")
    shutil.rmtree(only_3 / "checkpoints" / "6")
    damaged = _copy_run(source, tmp_path / "damaged")
    for f in _state_files(damaged, 6):
        f.write_bytes(b"")
    assert_trees_identical(checkpoint.load_params(damaged), checkpoint.load_params(only_3))
    assert f"{damaged}/checkpoints/6 cannot be used" in caplog.text
    assert (damaged / "checkpoints" / "6").is_dir()  # loading for sampling never moves files


def test_overwritten_bytes_that_still_decode_are_caught_by_the_digests(finished, tmp_path, caplog):
    """The probe: 64 garbage bytes into the middle of the largest data file of checkpoint 6."""
    source, expected = finished
    workdir = _copy_run(source, tmp_path / "run")
    # The largest array-data file (OCDBT's d/ folder), not _METADATA: a tiny model's JSON metadata
    # can outweigh its data files, and Orbax does report a damaged one.
    target = next(f for f in _state_files(workdir, 6) if f.parent.name == "d")
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = b"\x7f" * 64
    target.write_bytes(bytes(data))
    abstract = checkpoint.abstract_like(expected)
    manager = checkpoint.make_manager(workdir / "checkpoints", async_save=False)
    # Orbax alone restores the damaged step without complaint: the fault is silent without digests.
    silent = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    leaves = zip(jax.tree.leaves(silent["state"]), jax.tree.leaves(expected), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)

    state, extra = checkpoint.restore_latest(manager, abstract)
    assert int(state.step) == 3 and extra["step"] == 3
    assert "checkpoint 6: arrays differ from the digests saved with them" in caplog.text
    assert (workdir / "checkpoints" / "6.corrupt").is_dir()


def test_a_model_change_is_reported_briefly_and_no_checkpoint_is_moved(finished, tmp_path):
    source, _ = finished
    workdir = _copy_run(source, tmp_path / "run")
    config = tiny_config()
    config.model.autoencoder.block_out_channels = [8, 8]
    with pytest.raises(checkpoint.CheckpointError, match="restores with this config") as e:
        loop.train(config, workdir)
    assert len(str(e.value)) < 1500
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_a_second_process_on_the_workdir_is_refused_at_once(tmp_path):
    """The probe: two runs on one workdir. The first holds the lock from another process."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom flash_jax.train import lock\n"
         "with lock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)",
         str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(lock.WorkdirBusy, match=f"in use by host .* pid {holder.pid}"):
            loop.train(tiny_config(), workdir)
        assert time.monotonic() - start < 5  # refused before anything is built or compiled
        assert sorted(p.name for p in workdir.iterdir()) == ["lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.hold(workdir):  # the dead holder's lock is stale: taken over
        assert f"pid {os.getpid()}" in (workdir / "lock").read_text()


def test_a_half_written_metrics_line_is_truncated_on_resume(tmp_path, caplog):
    """The probe: a crash mid-write leaves the last line of metrics.jsonl incomplete."""
    loop.train(tiny_config(total_steps=3), tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.12')
    loop.train(tiny_config(), tmp_path)
    assert _metrics_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert f"{tmp_path / 'metrics.jsonl'}: line 4 is not a complete record" in caplog.text


def test_an_unwritable_checkpoint_folder_stops_the_run_before_compute(tmp_path):
    """The probe: a file where the checkpoint folder should be."""
    (tmp_path / "checkpoints").write_text("not a folder")
    start = time.monotonic()
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot write checkpoints to .*checkp"):
        loop.train(tiny_config(), tmp_path)
    assert time.monotonic() - start < 5 and not (tmp_path / "metrics.jsonl").exists()


def test_a_failed_checkpoint_write_stops_the_run_at_once(tmp_path):
    """The probe: a file put where the checkpoint folder is, while the run trains. The next save
    fails and the run stops there, naming the path, instead of training on."""
    folder = tmp_path / "checkpoints"

    def replace_folder():
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.01)
        shutil.rmtree(folder)
        folder.write_text("in the way")

    swap = threading.Thread(target=replace_folder, daemon=True)
    swap.start()
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint \d+ to .*checkpoints failed"):
        loop.train(tiny_config(total_steps=12, checkpoint_every=3), tmp_path)
    swap.join()
    assert _metrics_steps(tmp_path)[-1] <= 6  # stopped at the first failed save (step 3 or 6)


def test_another_method_on_a_run_is_refused_naming_both(finished, tmp_path):
    source, _ = finished
    config = teacher_config.get_config("tiny")
    with pytest.raises(flash_config.ConfigError, match=r"holds a 'autoencoder' run .*'denoising'"):
        loop.train(config, source)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"method": "autoenc')
    with pytest.raises(flash_config.ConfigError, match=f"{bad / 'config.json'}: not a JSON config"):
        loop.check_recorded_method(config, bad)
    with pytest.raises(flash_config.ConfigError, match=f"{bad / 'config.json'}: not valid JSON"):
        export.run_config(bad)  # --mode sample without --config


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75(tmp_path):
    """The probe: SIGTERM while the run loads and compiles (the workdir is locked from the start)."""
    cmd = [sys.executable, "-m", "flash_jax.main", f"--workdir={tmp_path}",
           "--config=configs/shapes/autoencoder.py:tiny"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not (tmp_path / "lock").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == preemption.EXIT_CODE, err[-3000:]
    assert "SIGTERM during start-up: stopped before step 1" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def _main(workdir: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flash_jax.main", f"--workdir={workdir}",
           "--config=configs/shapes/autoencoder.py:tiny", *flags]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (its /proc status `SigCgt` mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize(
    "signum, code",
    [(signal.SIGTERM, preemption.EXIT_CODE), (signal.SIGINT, preemption.INTERRUPTED_EXIT_CODE)],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_while_the_entry_module_imports_exits_with_its_code(tmp_path, signum, code):
    """The signal lands as soon as the entry module's first statement installed its handlers
    (seen in /proc), while JAX, Orbax and TFDS are still being imported (seconds; no JAX library
    is loaded yet): before main() has run, so no workdir exists."""
    proc = _main(tmp_path / "run")
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "no handler installed"
            time.sleep(0.001)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "jaxlib" not in maps, "the handlers were installed only after JAX was imported"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sigint_finishes_the_checkpoint_in_flight_then_exits_130(finished, tmp_path, caplog):
    """The probe: Ctrl-C while a run saves every 2 steps (asynchronously, so a save is usually in
    flight when the signal lands). The run stops at the next step boundary once that save is
    complete: no traceback, no partial checkpoint, the newest checkpoint is the last multiple of 2
    reached and it restores, matching its digests."""
    proc = _main(
        tmp_path,
        "--config.total_steps=400",
        "--config.checkpoint_every=2",
        "--config.sample_every=1000",
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "2").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == preemption.INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "finishing the checkpoint in flight" in err
    stopped = _metrics_steps(tmp_path)[-1]
    assert 2 <= stopped < 400
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.isdigit()] == []
    manager = checkpoint.make_manager(tmp_path / "checkpoints", async_save=False)
    _, expected = finished
    state, extra = checkpoint.restore_latest(manager, checkpoint.abstract_like(expected))
    assert extra["step"] == int(state.step) == stopped - stopped % 2
    assert "cannot be used" not in caplog.text


def _weights_folder(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text('{"in_channels": 4}')
    tensors = {"a.weight": np.ones((8, 8), np.float32), "b.bias": np.zeros(16, np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_damaged_safetensors_bytes_are_refused_naming_the_tensor(tmp_path):
    """The probe: bytes of a weight file overwritten (here with 0xff: NaN as float32)."""
    folder = _weights_folder(tmp_path)
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-64:] = b"\xff" * 64  # the last tensor's data: 16 float32 values
    file.write_bytes(bytes(data))
    with pytest.raises(weights.WeightsError, match=r"model\.safetensors: tensor 'b\.bias' has 16"):
        weights.load_safetensors_dir(folder)
    _, state = weights.load_safetensors_dir(folder, allow_non_finite=True)
    assert np.isnan(state["b.bias"]).all() and (state["a.weight"] == 1).all()


@pytest.mark.parametrize("fault", ["truncated", "empty", "bad config.json"])
def test_unreadable_weight_files_are_named(tmp_path, fault):
    folder = _weights_folder(tmp_path)
    file = folder / ("config.json" if fault == "bad config.json" else "model.safetensors")
    file.write_bytes({"truncated": file.read_bytes()[:100], "empty": b""}.get(fault, b'{"in_'))
    with pytest.raises(weights.WeightsError, match=re.escape(str(file))):
        weights.load_safetensors_dir(folder)


def _eval_config(assets: Path, judge_file: Path):
    """The tiny evaluation (16 px images) of the tiny teacher, scored by `judge_file`."""
    config = comparison.get_config(f"tiny,assets={assets}")
    with config.unlocked():
        config.judge = str(judge_file)
        config.prompt_sets, config.reference, config.teacher_reference = ("eval",), "", ""
        config.runs = [
            dict(label="Teacher", name="teacher", config="configs/shapes/teacher.py:tiny",
                 workdir=str(assets / "teacher.msgpack"), steps=[1],
                 overrides={"autoencoder_workdir": str(assets / "autoencoder.msgpack")})
        ]  # fmt: skip
    return config


def _no_compute(*args, **kwargs):
    raise AssertionError("computed before the refusal")


def test_a_judge_of_another_image_size_is_refused_before_compute(
    tiny_assets, tmp_path, monkeypatch
):
    """The probe: the shipped 32 px judge scoring 16 px images (alignment 5 % instead of 98 %)."""
    shipped = ROOT / "assets" / "shapes" / "judge.msgpack"
    assert judge.judge_image_size(shipped) == 32
    message = (
        f"the judge {shipped} was trained on 32px images, but the evaluation's images are 16px"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        judge.check_judge_size(shipped, 16)

    judge_file = tmp_path / "judge.msgpack"  # the tiny judge, said to be a 32 px one
    shutil.copy(tiny_assets / "judge.msgpack", judge_file)
    (tmp_path / "judge.json").write_text('{"image_size": 32}')
    monkeypatch.setattr(evaluate.judge, "predict", _no_compute)
    config = _eval_config(tiny_assets, judge_file)
    with pytest.raises(ValueError, match=r"trained on 32px images, .* images are 16px"):
        evaluate.run_evaluation(config, tmp_path / "eval")
    assert not (tmp_path / "eval" / config.out_dir).exists()
    run = tmp_path / "judge_run"  # a judge run directory: the size in its config.json
    run.mkdir()
    (run / "config.json").write_text('{"data": {"image_size": 16}}')
    assert judge.judge_image_size(run) == 16
    (run / "config.json").write_text('{"data": {"image_si')
    with pytest.raises(
        flash_config.ConfigError, match=re.escape(f"{run / 'config.json'}: not valid")
    ):
        judge.judge_image_size(run)


def test_a_truncated_results_json_is_named_and_left_as_it_is(tiny_assets, tmp_path, monkeypatch):
    """The probe: resuming an evaluation whose results.json was cut short."""
    config = _eval_config(tiny_assets, tiny_assets / "judge.msgpack")
    results = tmp_path / config.out_dir / "results.json"
    results.parent.mkdir(parents=True)
    text = '{"rows": {"real|0|eval": {"fd_judge": 1.'
    results.write_text(text)
    monkeypatch.setattr(evaluate.judge, "predict", _no_compute)
    with pytest.raises(flash_config.ConfigError, match=re.escape(f"{results}: not valid JSON")):
        evaluate.run_evaluation(config, tmp_path)
    assert results.read_text() == text


@pytest.mark.parametrize("fault", ["truncated", "emptied", "deleted"])
def test_a_damaged_dataset_record_file_is_named(tmp_path, fault):
    """The probe: a prepared Shapes dataset whose train `array_record` file is cut in half (or
    emptied, or deleted)."""
    from flash_jax.data import datasets, sources

    prepared = sources.build_shapes_tfds(
        tmp_path, image_size=16, num_records={"train": 32, "eval": 8, "heldout": 8}
    )
    (file,) = prepared.glob("*-train.array_record-*")
    data = file.read_bytes()
    if fault == "deleted":
        file.unlink()
    else:
        file.write_bytes(data[: len(data) // 2] if fault == "truncated" else b"")
    if fault == "truncated":  # the reader alone returns an empty record, without an error
        reader = tfds.builder_from_directory(str(prepared)).as_data_source("train").data_source
        assert reader[0] == b""
    with pytest.raises(ValueError, match=re.escape(f"{file}: cannot be read (missing, truncated")):
        sources.make_shapes_dataset(prepared, "train", batch_size=4, seed=0)
    (eval_file,) = prepared.glob("*-eval.array_record-*")  # the other splits still read
    assert (
        len(datasets.tfds_source(prepared, "eval", sources.ShapesBuilder.name)) == 8
        and eval_file.is_file()
    )


def test_a_truncated_image_caption_record_file_is_named(tmp_path):
    """The same fault in a dataset built from a user's folder of images and captions."""
    from flash_jax.data import captions

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    prepared = captions.build_image_caption_tfds(folder, tmp_path / "tfds")
    (file,) = prepared.glob("*-train.array_record-*")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{file}: cannot be read")):
        captions.make_caption_dataset(prepared, "train", batch_size=2, seed=0, image_size=8)


def _sample(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flash_jax.main", "--mode=sample", f"--workdir={workdir}", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance=nan"], "--guidance nan: must be finite and >= 0"),
        (["--guidance=-2"], "--guidance -2.0: must be finite and >= 0"),
        (["--steps=0"], "--steps 0: must be >= 1"),
        (["--prompts=@no_such_prompts.txt"], "--prompts @no_such_prompts.txt: no such file"),
        (
            ["--config=configs/shapes/imagine_flash.py:tiny"],
            "holds a 'denoising' run (RUN/config.json) but the config's method is 'imagine_flash'",
        ),
    ],
    ids=["guidance nan", "negative guidance", "steps 0", "missing prompts file", "method"],
)
def test_sample_refuses_bad_flags_before_compute(tmp_path, flags, message):
    """The probes of `--mode sample`; the run holds a teacher's config.json and no checkpoint,
    so anything past the checks would fail on the missing checkpoint instead."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(teacher_config.get_config("tiny").to_json())
    done = _sample(run, "--prompts=a red circle", "--config=configs/shapes/teacher.py:tiny", *flags)
    assert done.returncode != 0
    assert message.replace("RUN", str(run)) in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (run / "samples").exists()


def test_sample_from_a_params_file_without_out_writes_beside_it(tiny_assets, tmp_path):
    """The probe: `--mode sample` on a `.msgpack` without `--out` (the grid went under the file)."""
    params = tmp_path / "teacher.msgpack"
    shutil.copy(tiny_assets / "teacher.msgpack", params)
    done = _sample(
        params,
        "--prompts=a red circle",
        "--steps=1",
        "--config=configs/shapes/teacher.py:tiny",
        f"--config.autoencoder_workdir={tiny_assets / 'autoencoder.msgpack'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "teacher.msgpack", "teacher_sample.png", "teacher_sample_0.png"
    ]  # fmt: skip
