"""Pieces shared by the Shapes testbed configs: model sizes and the generic training knobs.

Model dicts use the diffusers / transformers config.json keys, exactly like real SD checkpoints.
Sizes: "base" is the testbed (32x32 images, 8x8x4 latents: what trains in minutes on 2 CPU cores;
64x64 costs ~16x more per autoencoder step there); "tiny" is for tests and smoke runs.
Latent spaces of the "base" size: "f4" (8x8x4, the shipped assets/shapes/autoencoder.msgpack) and
"f2" (16x16x4, assets/shapes/autoencoder_f2.msgpack: keeps shapes and most textures; docs/results.md).
"""

from __future__ import annotations

from collections.abc import Iterable

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


def variants(arg: str | None, known: Iterable[str], config: str) -> set[str]:
    """The comma-separated variants in `arg` (what follows `:` in --config); one that is not in
    `known` is an error, so a misspelt variant never silently trains the default."""
    chosen = set(filter(None, (arg or "").split(",")))
    unknown = chosen - set(known)
    if unknown:
        raise ValueError(
            f"{config}: unknown variant(s) {sorted(unknown)}; this config has {sorted(known)}"
        )
    return chosen


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


def optimizer(learning_rate: float = 3e-4, warmup_steps: int = 200) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,  # peak rate after linear warm-up
            warmup_steps=warmup_steps,  # linear warm-up from 0
            grad_clip=1.0,  # global-norm clipping
            b1=0.9,  # Adam β1
            b2=0.999,  # Adam β2
            eps=1e-8,  # Adam ε (added to √v̂)
            weight_decay=0.0,  # decoupled weight decay
        )
    )


# Logical axis names of the models (models/layers.py, models/text.py) → mesh axes. Activations:
# batch over data×fsdp, channels over tensor; kernels: input features over fsdp, output features /
# heads over tensor (Megatron-style). A rule is skipped where its mesh axes are taken or do not
# divide the dimension; see flash_jax/parallel.py.
SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("channels", "tensor"),
)


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Device mesh sizes (flash_jax/parallel.py); one per-slice and one across-slice size may be -1."""
    return ml_collections.ConfigDict(
        dict(
            data=data,  # data parallel, inside a slice (ICI); -1 = the devices left
            fsdp=fsdp,  # parameter + optimizer state sharding (ZeRO-3 / FSDP), inside a slice
            tensor=tensor,  # tensor parallel (output features, attention heads), inside a slice
            dcn_data=-1,  # data parallel across TPU slices (multislice); -1 = the slices left
            dcn_fsdp=1,  # fsdp across slices
            dcn_tensor=1,  # tensor parallel across slices
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
    c.mesh = mesh()
    c.sharding_rules = SHARDING_RULES  # (logical axis, mesh axes) pairs, highest priority first
    c.fsdp_min_size = 2**20  # unannotated arrays with >= this many elements are sharded over fsdp
    c.frozen_dtype = (
        "float32"  # frozen models (teacher, text encoder, VAE) on device: or "bfloat16"
    )
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
