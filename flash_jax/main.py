"""Command-line entry point.

  python -m flash_jax.main --config configs/shapes/teacher.py[:variant] --workdir DIR \
      [--config.key=value ...] [--mode train]

Configs are ml_collections files whose `get_config(arg)` returns a LOCKED ConfigDict: an unknown
`--config.key` or a value of the wrong type is an error before anything is built or compiled.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from flash_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "what to do")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax is chatty at INFO
    if _MODE.value == "train":
        loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
