"""launch/: shellcheck, and the dry runs of every launcher and of sweep.py (nothing is started)."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/local.sh", "launch/tpu_pod.sh", "launch/slurm.sbatch"]


def run(args, env=None, check=True):
    return subprocess.run(
        args, cwd=ROOT, env={**os.environ, "DRY_RUN": "1", **(env or {})}, check=check,
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_local_dry_run():
    out = run(["bash", "launch/local.sh", "configs/shapes/teacher.py:quick", "runs/t",
               "--config.seed=3"], env={"PYTHON": "py"}).stdout.splitlines()  # fmt: skip
    assert out[0] == f"cd {shlex.quote(str(ROOT))}"
    assert shlex.split(out[1]) == [
        "py", "-m", "flash_jax.main", "--config", "configs/shapes/teacher.py:quick",
        "--workdir", "runs/t", "--config.seed=3",
    ]  # fmt: skip
    usage = run(["bash", "launch/local.sh", "only-one"], check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_tpu_pod_dry_run():
    env = {"TPU_NAME": "pod", "ZONE": "z1", "ACCELERATOR_TYPE": "v5litepod-16", "SPOT": "1"}
    create = shlex.split(run(["bash", "launch/tpu_pod.sh", "create"], env).stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"pod", "--spot"} <= set(create) and create[create.index("--zone") + 1] == "z1"
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-16"

    setup = run(["bash", "launch/tpu_pod.sh", "setup"], env).stdout.splitlines()
    assert setup[0].startswith("# archive") and "scp" in setup[1] and "--worker=all" in setup[1]
    install = shlex.split(setup[3])
    assert "--worker=all" in install
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("jax["))  # fmt: skip
    version = pin.split("==")[1].split()[0]
    assert f"'jax[tpu]=={version}'" in install[-1] and "uv venv" in install[-1]

    lines = run(["bash", "launch/tpu_pod.sh", "run", "configs/sd/sd15_imagine_flash.py:tpu_v5e_8",
                 "gs://b/run", "--config.data.data_dir=gs://b/cache dir"], env).stdout.splitlines()  # fmt: skip
    assert "scp" in lines[1]  # the working tree is shipped before every run
    cmd = shlex.split(lines[-1])
    assert (
        cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in cmd
    )
    remote = shlex.split(cmd[cmd.index("--command") + 1])
    assert remote[:3] == ["cd", "flash-jax", "&&"]
    job = shlex.split(remote[remote.index("-c") + 1])
    assert job[: job.index(";")] == [
        ".venv/bin/python", "-m", "flash_jax.main",
        "--config", "configs/sd/sd15_imagine_flash.py:tpu_v5e_8", "--workdir", "gs://b/run",
        "--config.data.data_dir=gs://b/cache dir",
    ]  # fmt: skip
    follow = shlex.split(run(["bash", "launch/tpu_pod.sh", "logs"], {**env, "WORKER": "3"}).stdout)
    assert "--worker=3" in follow and follow[-1] == "tail -n +1 -F flash-jax/logs/latest.log"
    delete = shlex.split(run(["bash", "launch/tpu_pod.sh", "delete"], env).stdout)
    assert delete[4:6] == ["delete", "pod"] and "--quiet" in delete


def remote_command(action_args, env):
    """The command `launch/tpu_pod.sh` would send to the workers last, from its dry run."""
    out = run(["bash", "launch/tpu_pod.sh", *action_args], env).stdout.splitlines()
    cmd = shlex.split(out[-1])
    return cmd[cmd.index("--command") + 1]


def test_tpu_pod_run_is_detached_with_a_log_per_host_and_stops_on_sigterm(tmp_path):
    """The worker side of `run` and `stop`, executed here: a fake trainer records its arguments,
    waits for SIGTERM and exits 75 as flash_jax.main does after checkpointing."""
    remote = tmp_path / "remote"
    (remote / ".venv" / "bin").mkdir(parents=True)
    trainer = remote / ".venv" / "bin" / "python"
    trainer.write_text('#!/usr/bin/env bash\nprintf "<%s>" "$@"; echo\n'
                       'trap \'echo SIGTERM; exit 75\' TERM\nsleep 60 & wait\n')  # fmt: skip
    trainer.chmod(0o755)
    env = {"TPU_NAME": "pod", "REMOTE_DIR": str(remote)}
    start = remote_command(["run", "configs/x.py:a", "gs://b/my run", "--config.s=a b"], env)
    started = subprocess.run(["bash", "-c", start], cwd=tmp_path, capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    assert started.returncode == 0 and "started, log" in started.stdout  # returned at once
    log = remote / "logs" / "my_run.log"
    assert (remote / "logs" / "latest.log").resolve() == log
    deadline = time.time() + 30
    while "<" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.1)
    stop = remote_command(["stop"], env)
    subprocess.run(["bash", "-c", stop], cwd=tmp_path, check=True, timeout=30)
    while "exit status" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    assert lines[0] == ("<-m><flash_jax.main><--config><configs/x.py:a><--workdir><gs://b/my run>"
                        "<--config.s=a b>")  # fmt: skip
    assert lines[1] == "SIGTERM" and lines[2].startswith("[tpu_pod.sh] exit status 75 on ")


def test_tpu_pod_ships_the_working_tree(tmp_path):
    """Uncommitted changes and new files reach the workers; git-ignored ones do not."""
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "tpu_pod.sh", repo / "launch")
    (repo / "requirements.txt").write_text("jax[cpu]==0.0.1\n")
    (repo / ".gitignore").write_text(".venv/\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "requirements.txt").write_text("jax[cpu]==0.0.2\n")  # modified, not committed
    (repo / "configs").mkdir()
    (repo / "configs" / "mine.py").write_text("# not committed\n")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "big").write_text("ignored")
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "sync"], cwd=repo, capture_output=True,
                         text=True, check=True, env={**os.environ, "DRY_RUN": "1"}).stdout  # fmt: skip
    archive = out.splitlines()[0].split()[2]
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile("requirements.txt").read() == b"jax[cpu]==0.0.2\n"
    os.unlink(archive)
    assert names == [".gitignore", "configs/mine.py", "launch/tpu_pod.sh", "requirements.txt"]


@pytest.fixture
def fake_slurm(tmp_path):
    """A fake `scontrol` on PATH (hostname expansion) and the env sbatch gives a 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && '
                        'printf "gpu-017\\ngpu-018\\n"\n')  # fmt: skip
    scontrol.chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-[017-018]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }


def test_slurm_dry_run(fake_slurm):
    args = ["bash", "launch/slurm.sbatch", "configs/sd/sdxl_imagine_flash.py:gpu_8xh100",
            "/shared/run", "--config.model.pretrained=/models/sdxl"]  # fmt: skip
    out = run(args, fake_slurm).stdout.splitlines()
    assert "coordinator gpu-017:24242" in out[0]  # 20000 + 4242 % 20000
    srun = shlex.split(out[1])
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--chdir", str(ROOT)]
    assert srun[4:] == [
        f"{ROOT}/.venv/bin/python", "-m", "flash_jax.main",
        "--config", "configs/sd/sdxl_imagine_flash.py:gpu_8xh100", "--workdir", "/shared/run",
        "--config.model.pretrained=/models/sdxl",
    ]  # fmt: skip
    header = (ROOT / "launch/slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@300" in header and "#SBATCH --requeue" in header

    # SIGTERM (time limit / preemption): forward to the job steps, then requeue.
    stopped = run(args, {**fake_slurm, "DRY_RUN_SIGNAL": "1"}).stdout
    assert "scancel --signal=TERM 4242" in stopped and "scontrol requeue 4242" in stopped

    outside = run(args, {k: "" for k in fake_slurm if k.startswith("SLURM")}, check=False)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def sweep(*args):
    return run([sys.executable, "launch/sweep.py", *args])


def test_sweep_dry_run_expands_get_hyper():
    result = sweep("--config", "configs/shapes/imagine_flash.py:quick", "--workdir", "runs/sw",
                   "--launcher", "slurm", "--dry-run", "--", "--config.seed=1")  # fmt: skip
    jobs = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(jobs) == 6 and "# 6 jobs (slurm)" in result.stderr
    assert jobs[0] == [
        "sbatch", "--job-name=flash-jax-gamma_a=0.5,adv_weight=0.0", "launch/slurm.sbatch",
        "configs/shapes/imagine_flash.py:quick", "runs/sw/gamma_a=0.5,adv_weight=0.0",
        "--config.imagine_flash.gamma_a=0.5", "--config.imagine_flash.adv_weight=0.0",
        "--config.seed=1",
    ]  # fmt: skip
    grid = {(j[-3], j[-2]) for j in jobs}
    assert len(grid) == 6  # every (γ slope, λ_adv) pair once

    local = sweep("--config", "configs/sd/sd15_imagine_flash.py", "--workdir", "r", "--dry-run")
    assert all(line.startswith("launch/local.sh configs/sd/sd15_imagine_flash.py r/")
               for line in local.stdout.splitlines())  # fmt: skip
    tpu = sweep("--config", "configs/sd/sdxl_imagine_flash.py:tpu_v5e_8", "--workdir", "gs://b",
                "--launcher", "tpu_pod", "--dry-run")  # fmt: skip
    assert tpu.stdout.splitlines()[0].startswith("launch/tpu_pod.sh run configs/sd/sdxl")


def test_sweep_points_are_checked_against_the_config(tmp_path):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import sweep as sweep_lib
    finally:
        sys.path.pop(0)
    from configs.shapes import imagine_flash

    config = imagine_flash.get_config()
    sweep_lib.check_point(config, {"config.imagine_flash.gamma_a": 0.5})
    with pytest.raises(ValueError, match=r"unknown config key 'imagine_flash\.gama_a'; nearest: "):
        sweep_lib.check_point(config, {"config.imagine_flash.gama_a": 0.5})
    with pytest.raises(ValueError, match=r"'imagine_flash\.gamma_a': cannot set 'high'"):
        sweep_lib.check_point(config, {"config.imagine_flash.gamma_a": "high"})
    sweep_lib.check_point(config, {"config.imagine_flash.student_steps": (1, 2)})  # a list knob
    h = sweep_lib.Hyper()
    assert h.zipit([h.sweep("config.a", [1, 2]), h.sweep("config.b", [3, 4])]) == [
        {"config.a": 1, "config.b": 3},
        {"config.a": 2, "config.b": 4},
    ]
    assert sweep_lib.format_value((3,)) == "(3,)" and sweep_lib.format_value(True) == "true"
    no_hyper = run([sys.executable, "launch/sweep.py", "--config", "configs/shapes/teacher.py",
                    "--workdir", "r", "--dry-run"], check=False)  # fmt: skip
    assert no_hyper.returncode != 0 and "has no get_hyper" in no_hyper.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--config.sed=1"],
            "--config.sed=1: unknown config key 'sed'; nearest: seed",
        ),
        (
            ["--config.batch_size", "four"],
            "--config.batch_size=four: config key 'batch_size': expected int, got 'four'",
        ),
        (["--config=configs/shapes/teacher.py"], "each job has its own --config"),
    ],
    ids=["unknown key", "wrong type", "another config"],
)
def test_sweep_refuses_a_bad_override_after_the_separator(extra, message):
    args = ["--config", "configs/shapes/imagine_flash.py:quick", "--workdir", "r", "--dry-run"]
    bad = run([sys.executable, "launch/sweep.py", *args, "--", "--config.seed=2", *extra],
              check=False)  # fmt: skip
    assert bad.returncode != 0 and message in bad.stderr and not bad.stdout
    good = sweep(*args, "--", "--config.seed=2", "--config.data.data_dir", "/d")
    assert all(line.endswith("--config.seed=2 --config.data.data_dir /d")
               for line in good.stdout.splitlines())  # fmt: skip
