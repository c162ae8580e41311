"""Baseline: latent consistency distillation of the testbed teacher (flash_jax/methods/lcm.py).

  python -m flash_jax.main --config configs/shapes/lcm.py[:variants] --workdir runs/shapes/lcm \
      --config.teacher_workdir=assets/shapes/teacher.msgpack \
      --config.autoencoder_workdir=assets/shapes/autoencoder.msgpack
One student serves 1, 2 and 3 steps. Variants (comma-separated): "f2", "quick", "tiny" (as in
imagine_flash.py). Same budget as configs/shapes/imagine_flash.py (updates, batch, optimizer).
"""

import ml_collections

from configs import run
from configs.shapes import imagine_flash


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, ("f2", "quick", "tiny"), "configs/shapes/lcm.py")
    base = imagine_flash.get_config(",".join(variants & {"tiny", "f2"}))
    c = run.training(
        "lcm", batch_size=16, total_steps=600, sample_every=200, ema_decay=base.ema_decay
    )
    c.model, c.schedule, c.data = base.model, base.schedule, base.data
    c.teacher_workdir = base.teacher_workdir  # the trained teacher (frozen)
    c.autoencoder_workdir = base.autoencoder_workdir  # the trained VAE (frozen)
    c.optimizer = base.optimizer
    c.lora = run.lora()  # a LoRA student instead of a full one: --config.lora.enabled=true
    teacher_scale = base.imagine_flash.guidance_scale
    c.lcm = ml_collections.ConfigDict(
        dict(
            skip=20,  # k: solver step in train timesteps (T/k = 50 DDIM steps)
            guidance_scale_min=max(1.0, teacher_scale - 2.0),  # CFG scale s range in training
            guidance_scale_max=teacher_scale + 2.0,  # (w = s − 1 is embedded)
            guidance_scale=teacher_scale,  # s when sampling
            w_embedding_dim=64,  # width of the guidance embedding (UNet time_cond_proj_dim)
            target_decay=0.95,  # μ of the EMA target network θ⁻
            distance="huber",  # "huber" (pseudo-Huber) | "l2"
            huber_c=0.001,  # c of the pseudo-Huber distance
            timestep_scaling=10.0,  # boundary condition: c_skip/c_out use t·timestep_scaling
            sigma_data=0.5,  # boundary condition σ_d
            sample_steps=4,  # steps of the periodic sample grids
        )
    )
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 200, 200, 200, 10
    if "tiny" in variants:
        c.batch_size, c.total_steps, c.log_every = 2, 2, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 2, 2, 2
        c.lcm.w_embedding_dim, c.lcm.sample_steps = 8, 2
    c.lock()
    return c
