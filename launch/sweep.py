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
the wrong type is an error naming the point). Launchers:
  local    launch/local.sh, one job after another
  slurm    sbatch launch/slurm.sbatch, one submission per job
  tpu_pod  launch/tpu_pod.sh run, one job after another on the slice
`--dry-run` prints the commands. Arguments after `--` are added to every job.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Point = dict[str, Any]


class Hyper:
    """The helpers `get_hyper` receives: each returns a list of points (dicts key -> value)."""

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
    config = config.copy_and_resolve_references()
    for key, value in point.items():
        if not key.startswith("config."):
            raise ValueError(f"sweep key {key!r} must start with 'config.'")
        *path, leaf = key.removeprefix("config.").split(".")
        node = config
        for part in path:
            if part not in node:
                raise ValueError(f"sweep key {key!r}: the config has no {part!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"sweep key {key!r}: the config has no {leaf!r}")
        if isinstance(node[leaf], list):
            raise ValueError(
                f"sweep key {key!r}: list fields cannot be set from the command line "
                "(ml_collections); make the field a tuple in the config"
            )
        try:
            setattr(node, leaf, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"sweep point {point}: {key}={value!r}: {e}") from None


def job_name(point: Point) -> str:
    short = lambda k: k.removeprefix("config.").split(".")[-1]  # noqa: E731
    return ",".join(f"{short(k)}={format_value(v)}" for k, v in point.items()) or "default"


def commands(
    config: str, workdir: str, launcher: str, points: list[Point], extra: Sequence[str]
) -> list[list[str]]:
    """The command of every job (argv lists)."""
    out = []
    for point in points:
        flags = [f"--{k}={format_value(v)}" for k, v in point.items()] + list(extra)
        run_dir = f"{workdir.rstrip('/')}/{job_name(point)}"
        if launcher == "local":
            out.append(["launch/local.sh", config, run_dir, *flags])
        elif launcher == "slurm":
            name = f"--job-name=flash-jax-{job_name(point)}"
            out.append(["sbatch", name, "launch/slurm.sbatch", config, run_dir, *flags])
        elif launcher == "tpu_pod":
            out.append(["launch/tpu_pod.sh", "run", config, run_dir, *flags])
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
    return out


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
    points = module.get_hyper(Hyper())
    config = module.get_config(variant)
    for point in points:
        check_point(config, point)
    jobs = commands(args.config, args.workdir, args.launcher, points, args.extra)
    print(f"# {len(jobs)} jobs ({args.launcher})", file=sys.stderr)
    for job in jobs:
        print(shlex.join(job))
        if not args.dry_run:
            subprocess.run(job, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
