"""Expands a config's `get_hyper` into one job per point and runs or submits them with a launcher.

  python launch/sweep.py --config configs/shapes/imagine_flash.py[:VARIANTS] \
      --workdir runs/sweep --launcher local|slurm|tpu_pod [--dry-run] [-- --config.key=value ...]

A config file opts in with `get_hyper(h)`, returning a list of points built from the `h` helpers
(big_vision's convention):

  def get_hyper(h):
      return h.product([h.sweep("config.imagine_flash.gamma_a", [0.5, 0.75]),
                        h.sweep("config.optimizer.learning_rate", [1e-4, 3e-4])])

Each point becomes `--config.<key>=<value>` flags and its own workdir, `WORKDIR/<key>=<value>,...`.
Every key and value is applied to the config before anything runs (an unknown key or a value of
the wrong type is an error naming the point). `h.arg` is the config's variant string.

A point may also set job fields (keys without the `config.` prefix), for a sweep over several
config files with dependencies (configs/shapes/comparison.py):
  name     the job's name (default: from its config keys)
  config   config file[:variants] the job runs (default: --config); its keys are checked against it
  workdir  the job's --workdir (default: WORKDIR/<name>)
  mode     flash_jax.main --mode (default: train)
  after    names of earlier jobs that must have finished first (slurm: --dependency=afterok;
           the other launchers run the jobs in order)
`{workdir}` in a string value (a job field or a config value) is replaced by WORKDIR. Launchers:
  local    launch/local.sh, one job after another
  slurm    sbatch launch/slurm.sbatch, one submission per job
  tpu_pod  launch/tpu_pod.sh run, one job after another on the slice
`--dry-run` prints the commands. Arguments after `--` are added to every job; their `--config.*`
overrides are parsed against every job's config as flash_jax.main parses them (an unknown key or a
value of the wrong type stops the sweep before any job starts).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Point = dict[str, Any]


JOB_FIELDS = ("name", "config", "workdir", "mode", "after")


class Hyper:
    """The helpers `get_hyper` receives: each returns a list of points (dicts key -> value);
    `arg` is the config's variant string (what follows `:` in --config)."""

    def __init__(self, arg: str = ""):
        self.arg = arg

    @staticmethod
    def sweep(key: str, values: Sequence[Any]) -> list[Point]:
        return [{key: v} for v in values]

    @staticmethod
    def fixed(key: str, value: Any) -> list[Point]:
        return [{key: value}]

    @staticmethod
    def product(lists: Sequence[list[Point]]) -> list[Point]:
        return [{k: v for p in combo for k, v in p.items()} for combo in itertools.product(*lists)]

    @staticmethod
    def zipit(lists: Sequence[list[Point]]) -> list[Point]:
        if len({len(points) for points in lists}) > 1:
            raise ValueError(f"zipit: lists of different lengths {[len(p) for p in lists]}")
        return [{k: v for p in combo for k, v in p.items()} for combo in zip(*lists, strict=True)]

    @staticmethod
    def chainit(lists: Sequence[list[Point]]) -> list[Point]:
        return [p for points in lists for p in points]


def load_config_module(path: str):
    """The config file as a module (the checkout's root on sys.path, like flash_jax.main)."""
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("sweep_config", ROOT / path)
    if spec is None or not (ROOT / path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file under {ROOT}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def format_value(value: Any) -> str:
    """A flag value ml_collections' config flags parse back to `value`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return (
            "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        )
    return str(value)


def check_point(config: Any, point: Point) -> None:
    """Applies `point` to a copy of `config`: unknown keys and wrong types raise before any run."""
    from flash_jax import config as flash_config  # the checkout's root is on sys.path by now

    config = config.copy_and_resolve_references()
    for key, value in point.items():
        if not key.startswith("config."):
            raise ValueError(f"sweep key {key!r} must start with 'config.'")
        try:
            flash_config.set_dotted(config, key.removeprefix("config."), value)
        except flash_config.ConfigError as e:
            raise ValueError(f"sweep point {point}: {e}") from None


def check_overrides(spec: str, extra: Sequence[str]) -> None:
    """Applies the `--config.*` flags of `extra` (`--config.key=value` or `--config.key value`)
    to config file `spec` exactly as flash_jax.main does (flash_jax/config.py); other flags are
    left to the job.

    Raises:
      ValueError: an unknown key or a value the field cannot take, naming the flag.
    """
    sys.path.insert(0, str(ROOT))
    from flash_jax import config as flash_config

    try:
        rest, overrides = flash_config.split_overrides(extra)
    except flash_config.ConfigError as e:
        raise ValueError(f"after --: {e}") from None
    for arg in rest:
        if re.match(r"--config(=|$)", arg):
            raise ValueError(f"after --: {arg}: each job has its own --config")
    path, _, variant = spec.partition(":")
    config = flash_config.load_config_file(
        f"{ROOT / path}:{variant}" if variant else str(ROOT / path)
    )
    for override in overrides:
        try:
            flash_config.apply_overrides(config, [override])
        except flash_config.ConfigError as e:
            raise ValueError(f"after --: --config.{override}: {e}") from None


def job_name(point: Point) -> str:
    if "name" in point:
        return str(point["name"])
    short = lambda k: k.removeprefix("config.").split(".")[-1]  # noqa: E731
    keys = [k for k in point if k not in JOB_FIELDS]
    return ",".join(f"{short(k)}={format_value(point[k])}" for k in keys) or "default"


def split_point(point: Point, config: str, workdir: str) -> tuple[dict[str, Any], Point]:
    """`(job fields with their defaults, config keys)` of a point, `{workdir}` substituted."""
    unknown = [k for k in point if k not in JOB_FIELDS and not k.startswith("config.")]
    if unknown:
        raise ValueError(
            f"sweep point {point}: keys {unknown} are neither config.* nor {JOB_FIELDS}"
        )
    root = workdir.rstrip("/")
    fill = lambda v: v.replace("{workdir}", root) if isinstance(v, str) else v  # noqa: E731
    name = job_name(point)
    job = dict(name=name, config=config, workdir=f"{root}/{name}", mode="train", after=())
    job |= {k: fill(v) for k, v in point.items() if k in JOB_FIELDS}
    job["after"] = tuple(job["after"])
    return job, {k: fill(v) for k, v in point.items() if k.startswith("config.")}


def commands(
    config: str, workdir: str, launcher: str, points: list[Point], extra: Sequence[str]
) -> list[tuple[dict[str, Any], list[str]]]:
    """`(job fields, argv)` of every job; `after` must name earlier jobs. A slurm job's dependency
    flag holds the names of the jobs it waits for; `main` swaps in their job ids on submission."""
    out = []
    for point in points:
        job, keys = split_point(point, config, workdir)
        earlier = {j["name"] for j, _ in out}
        if not set(job["after"]) <= earlier:
            missing = sorted(set(job["after"]) - earlier)
            raise ValueError(f"job {job['name']!r}: after={missing} are not earlier jobs")
        flags = [f"--{k}={format_value(v)}" for k, v in keys.items()]
        if job["mode"] != "train":
            flags.append(f"--mode={job['mode']}")
        flags += list(extra)
        args = [job["config"], job["workdir"], *flags]
        if launcher == "local":
            out.append((job, ["launch/local.sh", *args]))
        elif launcher == "slurm":
            head = ["sbatch", f"--job-name=flash-jax-{job['name']}"]
            if job["after"]:
                head.append("--dependency=afterok:" + ":".join(job["after"]))
            out.append((job, [*head, "launch/slurm.sbatch", *args]))
        elif launcher == "tpu_pod":
            out.append((job, ["launch/tpu_pod.sh", "run", *args]))
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
    return out


def check_jobs(
    modules: dict[str, Any], jobs: list[tuple[dict[str, Any], Point]], extra: Sequence[str] = ()
) -> None:
    """Every job's config keys, applied to the config it runs, and the flags after `--` parsed
    against it (`check_overrides`). `modules`: config files already loaded, by path (more are
    loaded as jobs name them)."""
    configs = {}
    for job, keys in jobs:
        spec = job["config"]
        if spec not in configs:
            path, _, variant = spec.partition(":")
            if path not in modules:
                modules[path] = load_config_module(path)
            configs[spec] = modules[path].get_config(variant)
            check_overrides(spec, extra)
        check_point(configs[spec], keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file[:variants] with get_hyper")
    parser.add_argument("--workdir", required=True, help="root of the jobs' workdirs")
    parser.add_argument("--launcher", choices=("local", "slurm", "tpu_pod"), default="local")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs="*", help="after --: flags added to every job")
    args = parser.parse_args(argv)

    path, _, variant = args.config.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "get_hyper"):
        raise SystemExit(f"{path} has no get_hyper(h): nothing to sweep")
    points = module.get_hyper(Hyper(variant))
    jobs = commands(args.config, args.workdir, args.launcher, points, args.extra)
    try:
        check_jobs(
            {path: module}, [split_point(p, args.config, args.workdir) for p in points], args.extra
        )
    except ValueError as e:
        raise SystemExit(f"sweep.py: {e}") from None
    print(f"# {len(jobs)} jobs ({args.launcher})", file=sys.stderr)
    ids: dict[str, str] = {}
    for job, argv in jobs:
        if not args.dry_run and job["after"] and args.launcher == "slurm":
            deps = "--dependency=afterok:" + ":".join(ids[n] for n in job["after"])
            argv = [deps if a.startswith("--dependency=") else a for a in argv]
        print(shlex.join(argv))
        if args.dry_run:
            continue
        if args.launcher == "slurm":  # sbatch prints "Submitted batch job <id>"
            done = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
            print(done.stdout, end="")
            ids[job["name"]] = done.stdout.split()[-1]
        else:
            subprocess.run(argv, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
