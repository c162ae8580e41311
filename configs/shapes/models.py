"""The Shapes testbed's model sizes (the run knobs every config shares are in configs/run.py).

Model dicts use the diffusers / transformers config.json keys, exactly like real SD checkpoints.
Sizes: "base" is the testbed (32x32 images, 8x8x4 latents: what trains in minutes on 2 CPU cores;
64x64 costs ~16x more per autoencoder step there); "tiny" is for tests and smoke runs.
Latent spaces of the "base" size: "f4" (8x8x4, the shipped assets/shapes/autoencoder.msgpack) and
"f2" (16x16x4, assets/shapes/autoencoder_f2.msgpack: keeps shapes and most textures; docs/results.md).
"""

from __future__ import annotations

import ml_collections

from flash_jax.data.tokenizer import shapes_vocabulary

_SIZES = {
    # (unet channels, unet heads, text width, text layers)
    "base": ((32, 64, 64), 4, 64, 2),
    "tiny": ((16, 32), 2, 16, 1),
}
# Latent space -> (vae channels, shift_factor, 1 / scaling_factor). The factors make the diffusion
# latents (z − shift)·scale zero-mean with unit variance: the mean and std of the trained VAE's
# posterior means (python -m flash_jax.eval.latent_stats), so each belongs to its trained weights.
_LATENTS = {
    "f4": ((16, 32, 32), 0.54, 2.35),
    "f2": ((16, 32), 0.73, 2.32),
    "tiny": ((8, 16), None, 1.0),  # untrained, for tests
}


def model(
    size: str = "base", image_size: int = 32, latents: str = "f4"
) -> ml_collections.ConfigDict:
    """`model.{unet, text, autoencoder}` for the testbed; `latents` picks the "base" VAE ("tiny"
    always has its own)."""
    unet_ch, heads, width, layers = _SIZES[size]
    vae_ch, shift, std = _LATENTS["tiny" if size == "tiny" else latents]
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
        scaling_factor=1.0 / std,
        shift_factor=shift,
    )
    return ml_collections.ConfigDict(dict(unet=unet, text=text, autoencoder=autoencoder))
