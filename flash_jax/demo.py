"""`make demo`: distil the Shapes testbed teacher into a 3-step student and compare them.

  python -m flash_jax.demo --workdir runs/demo [--distill_steps N] [--num_images N] \
      [--latents f4|f2] [--set imagine_flash.teacher_steps=4 ...]

1. Takes the trained testbed autoencoder, teacher and judge shipped in assets/shapes/ (or, where
   one is missing, trains it first with the project's own config: slower). `--latents f2` takes
   the 16x16x4 pair autoencoder_f2 / teacher_f2 (the stronger teacher; ~4x the compute per step).
2. Distils a 3-step student with Imagine Flash (configs/shapes/imagine_flash.py), showing progress
   and writing sample grids to WORKDIR/imagine_flash/samples/.
3. Evaluates the teacher (25-step CFG and 3-step CFG) and the student (1/2/3 steps; 3 also without
   noise correction) on the same prompts and noise: prints the table, writes WORKDIR/report/
   (results.md, results.json, samples.png).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from configs.shapes import autoencoder as ae_config
from configs.shapes import imagine_flash as if_config
from configs.shapes import judge as judge_config
from configs.shapes import teacher as teacher_config
from flash_jax import config as flash_config
from flash_jax import sampling
from flash_jax.eval import evaluate, generation, reporting
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint, loop

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "shapes"

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where the demo writes everything")
_DISTILL_STEPS = flags.DEFINE_integer("distill_steps", 1200, "Imagine Flash updates")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 300, "evaluation prompts (images per entry)")
_LATENTS = flags.DEFINE_enum(
    "latents", "f4", ["f4", "f2"], "latent space: f4 (8x8x4) or f2 (16x16x4, the stronger teacher)"
)
_SET = flags.DEFINE_multi_string(
    "set", [], "override of the distillation config, KEY=VALUE (e.g. imagine_flash.adv_weight=0)"
)


def shipped_name(name: str, latents: str) -> str:
    """The assets/shapes file of a stage; the judge scores images, so one serves both latents."""
    return f"{name}.msgpack" if latents == "f4" or name == "judge" else f"{name}_{latents}.msgpack"


def stage(name: str, config, workdir: Path, assets: Path | None, latents: str = "f4") -> str:
    """The shipped parameters of a stage, or a freshly trained run of it."""
    shipped = assets / shipped_name(name, latents) if assets else None
    if shipped and shipped.is_file():
        return str(shipped)
    print(f"[demo] no shipped {name}: training it first ({config.total_steps} steps)")
    with config.unlocked():
        if "autoencoder_workdir" in config:
            config.autoencoder_workdir = str(workdir / "autoencoder")
    loop.train(config, workdir / name)
    return str(workdir / name)


def run_demo(
    workdir: str | Path,
    distill_steps: int,
    num_images: int,
    variant: str = "",
    assets: Path | None = ASSETS,
    overrides: Sequence[str] = (),
    latents: str = "f4",
) -> dict[str, dict[str, float]]:
    """Distil, evaluate, write the report; returns the metrics rows. `variant="tiny"` runs the whole
    pipeline on tiny models (tests); `overrides` (`KEY=VALUE`) change the distillation config;
    `latents` picks the latent space ("f4" or "f2") of the autoencoder, teacher and student."""
    workdir = Path(workdir)
    variants = ",".join(filter(None, [variant, "f2" if latents == "f2" else ""]))
    config = if_config.get_config(",".join(filter(None, ["3", variants])))
    with config.unlocked():
        config.total_steps = distill_steps
        config.checkpoint_every = config.sample_every = max(distill_steps // 3, 1)
    flash_config.apply_overrides(config, overrides)  # a bad key fails before anything trains
    flash_config.check_training(config)

    vae = stage("autoencoder", ae_config.get_config(variants), workdir, assets, latents)
    teacher = stage("teacher", teacher_config.get_config(variants), workdir, assets, latents)
    judge_dir = stage("judge", judge_config.get_config(variant), workdir, assets)
    with config.unlocked():
        config.teacher_workdir, config.autoencoder_workdir = teacher, vae
    print(f"[demo] distilling a 3-step student for {config.total_steps} steps")
    state = loop.train(config, workdir / "imagine_flash")

    model = T2I.from_config(config)
    teacher_params = checkpoint.load_params(teacher)
    guided = dict(guidance_scale=config.imagine_flash.guidance_scale)
    cfg = sampling.SamplerConfig
    student = state.ema_params["unet"]
    entries = [
        generation.Entry("teacher 25 (CFG)", teacher_params["unet"], cfg(num_steps=25, **guided)),
        generation.Entry("teacher 3 (CFG)", teacher_params["unet"], cfg(num_steps=3, **guided)),
        *(
            generation.Entry(f"student {n}", student, cfg(num_steps=n, noise_correction=True))
            for n in (1, 2, 3)
        ),
        generation.Entry("student 3, no NC", student, cfg(num_steps=3)),
    ]
    rows, images, captions = evaluate.evaluate(
        model,
        entries,
        teacher_params["text"],
        checkpoint.load_params(vae),
        judge_dir,
        num_images=num_images,
        image_size=config.data.image_size,
    )
    table = reporting.write_report(rows, images, captions, workdir / "report")
    print(table)
    print(f"[demo] report: {workdir / 'report'}/results.md, samples.png")
    return rows


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # --verbosity=0 for absl's INFO logs
        absl_logging.set_verbosity(absl_logging.WARNING)
    run_demo(
        _WORKDIR.value,
        _DISTILL_STEPS.value,
        _NUM_IMAGES.value,
        overrides=_SET.value,
        latents=_LATENTS.value,
    )


if __name__ == "__main__":
    app.run(main)
