"""Baseline: adversarial diffusion distillation of the testbed teacher (flash_jax/methods/add.py).

  python -m flash_jax.main --config configs/shapes/add.py[:variants] --workdir runs/shapes/add \
      --config.teacher_workdir=assets/shapes/teacher.msgpack \
      --config.autoencoder_workdir=assets/shapes/autoencoder.msgpack
Variants (comma-separated): "f2", "quick", "tiny" (as in imagine_flash.py). Same budget and
discriminator as configs/shapes/imagine_flash.py.
"""

import dataclasses

import ml_collections

from configs import run
from configs.shapes import imagine_flash
from flash_jax import sampling


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, ("f2", "quick", "tiny"), "configs/shapes/add.py")
    base = imagine_flash.get_config(",".join(variants & {"tiny", "f2"}))
    c = run.training(
        "add", batch_size=16, total_steps=600, sample_every=200, ema_decay=base.ema_decay
    )
    c.model, c.schedule, c.data = base.model, base.schedule, base.data
    c.teacher_workdir = base.teacher_workdir  # the trained teacher (frozen)
    c.autoencoder_workdir = base.autoencoder_workdir  # the trained VAE (frozen)
    c.optimizer, c.disc_optimizer = base.optimizer, base.disc_optimizer
    c.lora = run.lora()  # a LoRA student instead of a full one: --config.lora.enabled=true
    c.add = ml_collections.ConfigDict(
        dict(
            student_steps=4,  # the student's timesteps: the trailing grid of this many steps
            guidance_scale=base.imagine_flash.guidance_scale,  # teacher CFG in the target
            distill_weight=2.5,  # λ of L_distill (the adversarial term has weight adv_weight)
            adv_weight=1.0,  # weight of the generator's adversarial loss; 0 removes D
            disc_width=base.imagine_flash.disc_width,  # channels of each discriminator head
            disc_t_max=base.imagine_flash.disc_t_max,  # D re-noising levels t_d ~ U[0, t_max)
            r1_weight=1e-5,  # R1 penalty on real latents (the paper's 1e-5)
        )
    )
    # The student's sampler (grids and evaluation; evaluation sets num_steps): DDIM η = 1, the
    # ancestral sampler SDXL-Turbo ships with, on trailing steps.
    c.sample = ml_collections.ConfigDict(
        dataclasses.asdict(sampling.SamplerConfig(num_steps=c.add.student_steps, eta=1.0))
    )
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 200, 200, 200, 10
    if "tiny" in variants:
        c.batch_size, c.total_steps, c.log_every = 2, 2, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 2, 2, 2
        c.add.r1_weight = 0.0  # R1's double backward doubles the compile; tested on its own
    c.lock()
    return c
