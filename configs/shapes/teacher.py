"""The testbed's text-to-image teacher (UNet + CLIP-style text encoder) on the
frozen stage-1 VAE's latents, with CFG dropout.

  python -m flash_jax.main --config configs/shapes/teacher.py --workdir runs/shapes/teacher \
      --config.autoencoder_workdir=runs/shapes/autoencoder
Variants: "gpu" (the recipe of the shipped assets/shapes/teacher.msgpack: 12200 steps at batch 128,
peak lr 1e-3, min-SNR-5; about 6 minutes on one H100, ~17 hours on 2 CPU cores; docs/results.md),
"f2" (on the 16x16x4 latents of configs/shapes/autoencoder.py:f2, e.g. the shipped
assets/shapes/autoencoder_f2.msgpack), "leak" (with "f2": a schedule whose terminal ᾱ_T leaves
the 16x16 latents as much low-frequency signal at t = T as SD1.5's 64x64 ones at theirs,
benchmarks/terminal_leak.py; continues the shipped f2 teacher on it), "quick" (a short smoke run),
"tiny" (tiny model, for tests).
"""

import dataclasses

import ml_collections

from configs import run
from configs.shapes import models
from flash_jax import sampling

# scaled_linear 0.00085 -> 0.005: ᾱ_T within 3 % of what 16x16 latents need to keep SD1.5's
# 64x64 low-frequency SNR at t = T (benchmarks/results/terminal_leak.json; a test checks it).
LEAK_BETA_END = 0.005


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, ("gpu", "f2", "leak", "quick", "tiny"), "configs/shapes/teacher.py")
    c = run.training("denoising", total_steps=3000, sample_every=1000)
    c.model = models.model(latents="f2" if "f2" in variants else "f4")
    c.schedule = ml_collections.ConfigDict(
        dict(
            beta_schedule="scaled_linear",  # SD's schedule
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_betas_zero_snr=False,
            prediction_type="epsilon",
        )
    )
    c.snr_gamma = 0.0  # > 0: min-SNR-γ loss weight (diffusion.min_snr_weight); 0: plain ε-loss
    c.cfg_dropout = 0.1  # probability of training on the empty prompt
    c.init_from = ""  # a teacher run or .msgpack to start from ("" = random init)
    c.autoencoder_workdir = "runs/shapes/autoencoder"  # the trained stage-1 VAE
    if "f2" in variants:
        c.autoencoder_workdir += "_f2"
    # The sampler of the periodic grids (every flash_jax.sampling.SamplerConfig field).
    c.sample = ml_collections.ConfigDict(
        dataclasses.asdict(sampling.SamplerConfig(num_steps=25, guidance_scale=4.0))
    )
    if "leak" in variants:
        if "f2" not in variants:
            raise ValueError("configs/shapes/teacher.py: the 'leak' variant is for 'f2' latents")
        c.schedule.beta_end = LEAK_BETA_END
        c.init_from = "assets/shapes/teacher_f2.msgpack"
    if "gpu" in variants:
        c.batch_size, c.total_steps, c.snr_gamma = 128, 12200, 5.0
        c.optimizer.learning_rate = 1e-3
        c.checkpoint_every, c.sample_every = 1000, 2000
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 400, 400, 400, 25
    if "tiny" in variants:
        c.data.image_size = 16
        c.model = models.model("tiny", image_size=16)
        c.batch_size, c.total_steps, c.log_every = 4, 6, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 3, 6, 2
        c.sample.num_steps = 2
    c.lock()
    return c
