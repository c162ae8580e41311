"""Baseline: guided step distillation of the testbed teacher (flash_jax/methods/step_distill.py).

The method is a chain of runs, each a variant of this config:
  "guidance"  stage 1: a w-conditioned student learns the CFG teacher in one call (sampled at 32
              steps, the first halving's teacher);
  "16", "8", "4"  progressive halving: N steps from the 2N-step student of the previous run, given
              as --config.step_distill.previous_workdir.
  python -m flash_jax.main --config configs/shapes/step_distill.py:guidance --workdir runs/sd/guidance \
      --config.teacher_workdir=assets/shapes/teacher.msgpack \
      --config.autoencoder_workdir=assets/shapes/autoencoder.msgpack
  python -m flash_jax.main --config configs/shapes/step_distill.py:16 --workdir runs/sd/16 \
      --config.step_distill.previous_workdir=runs/sd/guidance  (same teacher/VAE flags)
  ... then :8 from runs/sd/16, :4 from runs/sd/8.
The four runs together get the budget of ONE Imagine Flash run (STAGES stages of total_steps/STAGES
updates each). Other variants: "f2", "quick", "tiny" (as in imagine_flash.py).
"""

import ml_collections

from configs import run
from configs.shapes import imagine_flash

CHAIN = ("guidance", "16", "8", "4")  # the stages, in order; each starts from the one before
FIRST_TEACHER_STEPS = 32  # the guidance stage's student is the 16-step stage's teacher


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, (*CHAIN, "f2", "quick", "tiny"), "configs/shapes/step_distill.py")
    base = imagine_flash.get_config(",".join(variants & {"tiny", "f2"}))
    stages = [v for v in CHAIN if v in variants]
    if len(stages) > 1:
        raise ValueError(f"step_distill config: pick one stage of {CHAIN}, got {stages}")
    stage = stages[0] if stages else "guidance"
    c = run.training(
        "step_distill",
        batch_size=16,
        total_steps=base.total_steps // len(CHAIN),
        sample_every=base.total_steps // len(CHAIN),
        ema_decay=base.ema_decay,
        # Each stage starts from the previous one: without the warm-up 0.99^150 ≈ 22 % of a
        # stage's EMA would still be the previous stage's student.
        ema_warmup=True,
    )
    c.model, c.schedule, c.data = base.model, base.schedule, base.data
    c.teacher_workdir = base.teacher_workdir  # the trained teacher (frozen; text encoder always)
    c.autoencoder_workdir = base.autoencoder_workdir  # the trained VAE (frozen)
    c.optimizer = base.optimizer
    c.lora = run.lora()  # a LoRA student instead of a full one: --config.lora.enabled=true
    teacher_scale = base.imagine_flash.guidance_scale
    c.step_distill = ml_collections.ConfigDict(
        dict(
            stage="guidance" if stage == "guidance" else "progressive",  # | "progressive"
            # steps the student samples with (progressive: learns N from the previous 2N)
            student_steps=FIRST_TEACHER_STEPS if stage == "guidance" else int(stage),
            previous_workdir="",  # progressive: the previous stage's run (2N-step student)
            guidance_scale_min=max(1.0, teacher_scale - 2.0),  # CFG scale s range in training
            guidance_scale_max=teacher_scale + 2.0,  # (w = s − 1 is embedded)
            guidance_scale=teacher_scale,  # s when sampling
            w_embedding_dim=64,  # width of the guidance embedding (UNet time_cond_proj_dim)
            loss_weighting="truncated_snr",  # "truncated_snr" max(SNR, 1) | "uniform"
        )
    )
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 50, 50, 50, 10
    if "tiny" in variants:
        c.batch_size, c.total_steps, c.log_every = 2, 2, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 2, 2, 2
        c.step_distill.w_embedding_dim = 8
    c.lock()
    return c
