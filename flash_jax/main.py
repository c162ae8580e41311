"""Command-line entry point.

  python -m flash_jax.main --config configs/shapes/teacher.py[:variant] --workdir DIR \
      [--config.key=value ...] [--mode train] [--distributed auto|on|off]
  python -m flash_jax.main --workdir DIR --mode sample --prompts "a red circle;two blue stars" \
      [--config ...] [--steps 3] [--guidance 1] [--noise_correction] [--out grid.png]
  python -m flash_jax.main --workdir DIR --mode export --out FOLDER [--params ema|raw] [--dtype fp32] \
      [--merge]
  python -m flash_jax.main --config configs/shapes/comparison.py --workdir RUNS --mode eval

Configs are ml_collections files whose `get_config(arg)` returns a ConfigDict; `--config.KEY=VALUE`
overrides a knob (flash_jax/config.py: lists as `1,2,3`), and an unknown key, a value of the wrong
type or out of range is a one-line error before anything is built or compiled.
`sample` draws a captioned grid and one PNG per prompt from the EMA parameters of the run in
`--workdir`, with the run's own config.json unless `--config` is given (a student of
`imagine_flash` uses its teacher's text encoder; a LoRA student, its factors merged onto the
teacher's UNet). `export` writes a student as a diffusers
pipeline folder (flash_jax/export.py, docs/stable_diffusion.md). `eval` evaluates the runs an
evaluation config lists (flash_jax/eval/evaluate.py, `run_evaluation`) and writes the tables, plots
and sample grids under WORKDIR; rerunning it skips the rows already computed.

Multi-process launches (SLURM, MPI, TPU pods) run the same command on every process; `--distributed`
decides `jax.distributed.initialize()` (flash_jax/parallel.py). Exit codes of `train`: 0 finished,
75 (`preemption.EXIT_CODE`) stopped by SIGTERM after checkpointing, or before the first step
(rerun to resume), 130 stopped by Ctrl-C once the checkpoint in flight was written, other = error.
Library logs (absl: Orbax, JAX) show from WARNING up; `--verbosity=0` shows their INFO lines too.
"""

from __future__ import annotations

from flash_jax.train import preemption

# First of all, before the imports below (JAX, Orbax, TFDS: seconds): a SIGTERM or Ctrl-C during
# start-up exits 75 / 130 instead of dying by the signal (143), so a requeue-on-75 job script also
# reruns a run preempted while it starts. Training replaces these handlers with its own.
preemption.exit_during_start_up()

import sys  # noqa: E402 - the imports after the handlers (above)
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from PIL import Image  # noqa: E402

from flash_jax import config as flash_config  # noqa: E402
from flash_jax import export, frozen, lora, parallel, sampling  # noqa: E402
from flash_jax.data import cache as data_cache  # noqa: E402
from flash_jax.eval import evaluate  # noqa: E402
from flash_jax.t2i import T2I  # noqa: E402
from flash_jax.train import checkpoint, lock, loop  # noqa: E402

_CONFIG = flags.DEFINE_string("config", None, "config file[:variant]; --config.KEY=VALUE overrides")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "export"], "what to do")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize(): auto = when the environment shows several processes "
    "(SLURM, MPI, TPU worker list); on = always (Cloud TPU VM pods)",
)
_PROMPTS = flags.DEFINE_string(
    "prompts", "", "sample: prompts separated by ';', or @file (one per line)"
)
_STEPS = flags.DEFINE_integer("steps", 3, "sample: sampler steps")
_GUIDANCE = flags.DEFINE_float(
    "guidance", 1.0, "sample: CFG scale (1 = unguided, one call per step)"
)
_NC = flags.DEFINE_bool("noise_correction", True, "sample: Imagine Flash noise correction")
_SEED = flags.DEFINE_integer("seed", 0, "sample: initial-noise seed")
_OUT = flags.DEFINE_string(
    "out",
    "",
    "sample: the grid PNG (default WORKDIR/samples/sample.png; NAME_<i>.png per prompt beside it); "
    "export: the diffusers folder to create",
)
_PARAMS = flags.DEFINE_enum("params", "ema", list(export.PARAMS), "export: which parameters")
_DTYPE = flags.DEFINE_enum("dtype", "fp32", list(export.DTYPES), "export: the UNet weights' dtype")
_MERGE = flags.DEFINE_bool(
    "merge", False, "export: a LoRA student's factors merged into unet/ (no LoRA file)"
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "",
    "persistent XLA compilation cache directory, so a restart does not recompile: "
    "'' = WORKDIR/compilation_cache, 'none' = off",
)
flags.mark_flags_as_required(["workdir"])  # --config: see main()


def read_prompts(spec: str) -> list[str]:
    """`"a;b"` or `"@file"` (one prompt per line) -> prompts; empty is an error."""
    if spec.startswith("@") and not Path(spec[1:]).is_file():
        raise app.UsageError(f"--prompts {spec}: no such file {spec[1:]!r}")
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec.replace(";", "\n")
    prompts = [p.strip() for p in text.splitlines() if p.strip()]
    if not prompts:
        raise app.UsageError("--prompts is empty: give 'prompt one;prompt two' or @file")
    return prompts


def sample_path(workdir: str, out: str) -> Path:
    """The grid PNG of `--mode sample`: `out`, else `WORKDIR/samples/sample.png`, or for a params
    file (`.msgpack`) as WORKDIR, `NAME_sample.png` beside it."""
    if out:
        return Path(out)
    if Path(workdir).is_file():
        return Path(workdir).with_name(f"{Path(workdir).stem}_sample.png")
    return Path(workdir) / "samples" / "sample.png"


def sample(config, workdir: str) -> Path:
    """Draws `--prompts` with the run's EMA parameters; writes the grid and one PNG per prompt.
    Flags, the prompts file and the run's recorded method are checked before compute."""
    prompts = read_prompts(_PROMPTS.value)
    if not np.isfinite(_GUIDANCE.value) or _GUIDANCE.value < 0:
        raise app.UsageError(f"--guidance {_GUIDANCE.value}: must be finite and >= 0 (1 = no CFG)")
    if _STEPS.value < 1:
        raise app.UsageError(f"--steps {_STEPS.value}: must be >= 1")
    loop.check_recorded_method(config, workdir)
    out = sample_path(workdir, _OUT.value)  # decided, and its folder made, before compute
    out.parent.mkdir(parents=True, exist_ok=True)
    model = T2I.from_config(config)
    params = checkpoint.load_params(workdir)
    if config.method == "imagine_flash":
        lora_student = "lora" in params["unet"]  # factors on the frozen teacher UNet
        parts = ("unet", "text") if lora_student else ("text",)
        teacher = frozen.load_teacher(config, model, parts=parts)
        unet = lora.full_unet(params["unet"], config, lambda: teacher["unet"])
        params = {"unet": unet, "text": teacher["text"]}
    model.check(params, workdir)
    vae = frozen.load_autoencoder(config, model)
    sampler = sampling.SamplerConfig(
        num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value, noise_correction=_NC.value
    )
    tokenizer = model.tokenizer()
    tokens = tokenizer(prompts)
    uncond = np.broadcast_to(tokenizer([""]), tokens.shape)
    x_T = jax.random.normal(
        jax.random.PRNGKey(_SEED.value), model.latent_shape(len(prompts), config.data.image_size)
    )
    images = jax.jit(model.generate, static_argnums=5)(params, vae, tokens, uncond, x_T, sampler)
    images = np.asarray(images)
    loop.write_sample_grid(images, prompts, out)
    for i, image in enumerate(images):
        Image.fromarray(image).save(out.with_name(f"{out.stem}_{i}{out.suffix}"))
    print(f"wrote {len(prompts)} samples ({sampler.num_steps} steps): {out}, {out.stem}_<i>.png")
    return out


def parse_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """absl's parser for every flag but the `--config.KEY=VALUE` overrides, which are returned
    beside the remaining arguments (flash_jax/config.py applies them)."""
    rest, overrides = flash_config.split_overrides(argv)
    return flags.FLAGS(rest), overrides


def load_config(overrides: list[str]):
    """`--config` with its overrides (None without `--config`), its values checked."""
    if not _CONFIG.value:
        if overrides:
            raise flash_config.ConfigError(f"--config.{overrides[0]} without --config")
        return None
    config = flash_config.load(_CONFIG.value, overrides)
    if "method" in config:  # a training run's config (not an evaluation's)
        flash_config.check_training(config)
    return config


def main(parsed: tuple[list[str], list[str]]) -> None:
    argv, overrides = parsed
    try:
        config = load_config(overrides)
    except flash_config.ConfigError as e:
        sys.exit(f"error: {e}")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax is chatty at INFO; --verbosity=0 shows it
        absl_logging.set_verbosity(absl_logging.WARNING)
    parallel.initialize_distributed(_DISTRIBUTED.value)
    if config is None and _MODE.value in ("train", "eval"):
        raise app.UsageError(f"--mode {_MODE.value} needs --config")
    if config is None and _MODE.value == "sample":
        try:
            config = export.run_config(_WORKDIR.value)  # the run's own config.json
        except flash_config.ConfigError as e:
            sys.exit(f"error: {e}")
    if _COMPILATION_CACHE.value != "none":
        default = _WORKDIR.value.rstrip("/") + "/compilation_cache"
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value or default)
    if _MODE.value in ("train", "sample"):
        data_cache.resolve_image_size(config)  # 0: the cache's or the model's native size
    if _MODE.value == "train":
        try:
            state = loop.train(config, _WORKDIR.value)
        except (lock.WorkdirBusy, checkpoint.CheckpointError, flash_config.ConfigError) as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:  # the checkpoint in flight was finished (loop.train)
            print("interrupted; rerun the same command to resume from the last checkpoint")
            sys.exit(preemption.INTERRUPTED_EXIT_CODE)
        if int(state.step) < config.total_steps:  # stopped by SIGTERM, checkpointed
            sys.exit(preemption.EXIT_CODE)
    elif _MODE.value == "sample":
        try:
            sample(config, _WORKDIR.value)
        except (flash_config.ConfigError, checkpoint.CheckpointError) as e:
            sys.exit(f"error: {e}")
    elif _MODE.value == "eval":
        evaluate.run_evaluation(config, _WORKDIR.value)
    elif _MODE.value == "export":
        if not _OUT.value:
            raise app.UsageError("--mode export needs --out FOLDER (a new diffusers folder)")
        out = export.export(
            _WORKDIR.value,
            _OUT.value,
            params=_PARAMS.value,
            dtype=_DTYPE.value,
            merge=_MERGE.value,
        )
        print(f"wrote the diffusers folder {out} (loading it: docs/stable_diffusion.md)")


def console() -> None:
    """The `flash-jax` console script (pyproject.toml): `python -m flash_jax.main`."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
