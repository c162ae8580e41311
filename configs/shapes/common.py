"""Pieces shared by the Shapes testbed configs: model sizes and the generic training knobs.

Model dicts use the diffusers / transformers config.json keys, exactly like real SD checkpoints.
Sizes: "base" is the testbed (32x32 images, 8x8x4 latents: what trains in minutes on 2 CPU cores;
64x64 costs ~16x more per autoencoder step there); "tiny" is for tests and smoke runs.
"""

from __future__ import annotations

import ml_collections

from flash_jax.data.tokenizer import shapes_vocabulary

_SIZES = {
    # (unet channels, unet heads, text width, text layers, vae channels)
    "base": ((32, 64, 64), 4, 64, 2, (16, 32, 32)),
    "tiny": ((16, 32), 2, 16, 1, (8, 16)),
}


def model(size: str = "base", image_size: int = 32) -> ml_collections.ConfigDict:
    """`model.{unet, text, autoencoder}` for the testbed."""
    unet_ch, heads, width, layers, vae_ch = _SIZES[size]
    n = len(unet_ch)
    groups = min(16, unet_ch[0])
    unet = dict(
        sample_size=image_size // 2 ** (len(vae_ch) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=["CrossAttnDownBlock2D"] * n,
        up_block_types=["CrossAttnUpBlock2D"] * n,
        block_out_channels=list(unet_ch),
        layers_per_block=1,
        attention_head_dim=heads,
        cross_attention_dim=width,
        norm_num_groups=groups,
    )
    text = dict(
        vocab_size=len(shapes_vocabulary()),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4 if width % 4 == 0 else 1,
        max_position_embeddings=24,
        hidden_act="quick_gelu",
        eos_token_id=3,  # the testbed tokenizer's <eos>: pool at the first <eos>
    )
    autoencoder = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_ch),
        up_block_types=["UpDecoderBlock2D"] * len(vae_ch),
        block_out_channels=list(vae_ch),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, vae_ch[0]),
        sample_size=image_size,
        # Latents = (z − shift) · scale, unit variance and zero mean for the diffusion model: the
        # stage-1 VAE's posterior means have mean 0.54 and std 2.35 (docs/results.md).
        scaling_factor=1.0 / 2.35 if size == "base" else 1.0,
        shift_factor=0.54 if size == "base" else None,
    )
    return ml_collections.ConfigDict(dict(unet=unet, text=text, autoencoder=autoencoder))


def optimizer(learning_rate: float = 3e-4, warmup_steps: int = 200) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,  # peak rate after linear warm-up
            warmup_steps=warmup_steps,  # linear warm-up from 0
            grad_clip=1.0,  # global-norm clipping
            b1=0.9,  # Adam β1
            b2=0.999,  # Adam β2
            weight_decay=0.0,  # decoupled weight decay
        )
    )


def training(method: str, **overrides) -> ml_collections.ConfigDict:
    """The generic trainer's knobs (flash_jax/train/loop.py reads them)."""
    c = ml_collections.ConfigDict()
    c.method = method  # module in flash_jax/methods
    c.seed = 0  # parameter init and step keys
    c.batch_size = 32  # global batch
    c.total_steps = 10_000  # optimizer updates
    c.log_every = 50  # metrics.jsonl / progress bar cadence
    c.checkpoint_every = 1000  # checkpoint cadence (and at the end)
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.sample_every = 2000  # sample-grid cadence (and at the end)
    c.num_samples = 8  # images in each grid (eval prompts)
    c.ema_decay = 0.999  # EMA of the trainable params
    c.optimizer = optimizer()
    c.disc_optimizer = optimizer()  # used only by methods with a discriminator
    c.data = ml_collections.ConfigDict(
        dict(
            source="shapes",  # "shapes" (testbed) | "captions" (image–caption TFDS) | "cache"
            data_dir="",  # prepared TFDS directory; empty renders Shapes on the fly
            num_records=0,  # train records; 0 = the split's default
            image_size=32,  # image side in pixels
            seed=0,  # Shapes generator seed
            shuffle_seed=0,  # epoch shuffle seed
        )
    )
    c.update(overrides)
    return c
