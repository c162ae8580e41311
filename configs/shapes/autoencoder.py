"""The testbed's AutoencoderKL that defines the latent space.

  python -m flash_jax.main --config configs/shapes/autoencoder.py --workdir runs/shapes/autoencoder
Variants: "f2" (16x16x4 latents, 3500 steps: the recipe of assets/shapes/autoencoder_f2.msgpack),
"decoder" (train only the decoder of the shipped autoencoder of those latents, which keep their
values, so the shipped teachers stay valid), "quick" (a short smoke run), "tiny" (tiny model, for
tests).
"""

import ml_collections

from configs import run
from configs.shapes import models


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, ("f2", "decoder", "quick", "tiny"), "configs/shapes/autoencoder.py")
    size = "tiny" if "tiny" in variants else "base"
    c = run.training("autoencoder", total_steps=1000, sample_every=500, ema_decay=0.99)
    c.model = models.model(size, latents="f2" if "f2" in variants else "f4")
    c.kl_weight = 1e-6  # KL to N(0, I), small: the latent scale is fixed afterwards
    c.decoder_noise = 0.0  # > 0: the decoder sees z + U(0, decoder_noise)·std(z)·ε (robustness)
    c.init_from = ""  # a workdir or .msgpack: start from its EMA params instead of random ones
    c.freeze_encoder = False  # True: only the decoder trains (needs init_from and ema_decay=0)
    c.optimizer = run.optimizer(learning_rate=1e-3, warmup_steps=100)
    if "f2" in variants:
        c.total_steps = 3500
    if "decoder" in variants:
        c.init_from = (
            "assets/shapes/autoencoder_f2.msgpack"
            if "f2" in variants
            else "assets/shapes/autoencoder.msgpack"
        )
        c.freeze_encoder, c.ema_decay = True, 0.0
        c.total_steps = 3000
        c.optimizer = run.optimizer(learning_rate=5e-4, warmup_steps=100)
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.sample_every, c.log_every = 300, 300, 300, 25
    if "tiny" in variants:
        c.data.image_size = 16
        c.model = models.model("tiny", image_size=16)
        c.batch_size, c.total_steps, c.log_every = 4, 6, 1
        c.checkpoint_every, c.sample_every, c.num_samples = 3, 6, 2
    c.lock()
    return c
