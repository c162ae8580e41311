"""launch/: shellcheck, and the dry runs of every launcher and of sweep.py (nothing is started)."""

import os
import shlex
import shutil
import subprocess
import sys
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
    assert "archive" in setup[0] and "scp" in setup[1] and "--worker=all" in setup[1]
    install = shlex.split(setup[2])
    assert "--worker=all" in install
    pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("jax["))  # fmt: skip
    version = pin.split("==")[1].split()[0]
    assert f"'jax[tpu]=={version}'" in install[-1] and "uv venv" in install[-1]

    out = run(["bash", "launch/tpu_pod.sh", "run", "configs/sd/sd15_imagine_flash.py:tpu_v5e_8",
               "gs://b/run", "--config.data.data_dir=gs://b/cache dir"], env).stdout  # fmt: skip
    cmd = shlex.split(out)
    assert (
        cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in cmd
    )
    remote = shlex.split(cmd[cmd.index("--command") + 1])
    assert remote[:3] == ["cd", "flash-jax", "&&"]
    assert remote[3:] == [
        ".venv/bin/python", "-m", "flash_jax.main",
        "--config", "configs/sd/sd15_imagine_flash.py:tpu_v5e_8", "--workdir", "gs://b/run",
        "--config.data.data_dir=gs://b/cache dir",
    ]  # fmt: skip
    delete = shlex.split(run(["bash", "launch/tpu_pod.sh", "delete"], env).stdout)
    assert delete[4:6] == ["delete", "pod"] and "--quiet" in delete


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
    with pytest.raises(ValueError, match="has no 'gama_a'"):
        sweep_lib.check_point(config, {"config.imagine_flash.gama_a": 0.5})
    with pytest.raises(ValueError, match="gamma_a='high'"):
        sweep_lib.check_point(config, {"config.imagine_flash.gamma_a": "high"})
    with pytest.raises(ValueError, match="list fields cannot be set from the command line"):
        sweep_lib.check_point(config, {"config.imagine_flash.student_steps": (1, 2)})
    h = sweep_lib.Hyper()
    assert h.zipit([h.sweep("config.a", [1, 2]), h.sweep("config.b", [3, 4])]) == [
        {"config.a": 1, "config.b": 3},
        {"config.a": 2, "config.b": 4},
    ]
    assert sweep_lib.format_value((3,)) == "(3,)" and sweep_lib.format_value(True) == "true"
    no_hyper = run([sys.executable, "launch/sweep.py", "--config", "configs/shapes/teacher.py",
                    "--workdir", "r", "--dry-run"], check=False)  # fmt: skip
    assert no_hyper.returncode != 0 and "has no get_hyper" in no_hyper.stderr
