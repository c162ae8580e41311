"""AutoencoderKL, the Stable Diffusion VAE family, as a flax.linen module.

Numerically the same as diffusers 0.42 `AutoencoderKL` (PyTorch). Submodules carry the diffusers
names (`encoder/down_blocks_0/resnets_1/conv2`, `decoder/mid_block/attentions_0/to_q`,
`quant_conv`), so `flash_jax.weights.autoencoder_from_diffusers` maps weights by name.

Shapes: images NHWC `(B, H, W, in_channels)` in [-1, 1]; latents `(B, H/f, W/f, latent_channels)`
with `f = 2 ** (len(block_out_channels) - 1)`. `encode` returns the diagonal Gaussian's
`(mean, logvar)` (logvar clipped to [-30, 20] as diffusers does); `decode` maps a latent back to
an image. `images_to_latents` / `latents_to_images` add the diffusion-space scaling:
`latents = (z - shift_factor) * scaling_factor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flash_jax.models import layers

Array = jax.Array
Dtype = Any

_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "latents_mean": (None,),
    "latents_std": (None,),
}
_IGNORED_KEYS = frozenset({"force_upcast"})  # a PyTorch pipeline dtype hint


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """AutoencoderKL hyper-parameters; defaults are diffusers' `AutoencoderKL` defaults."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)  # one per block; only this type
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)  # one per block; only this type
    block_out_channels: tuple[int, ...] = (64,)  # channels per resolution
    layers_per_block: int = 1  # resnets per encoder block (decoder blocks: +1)
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups everywhere (eps is 1e-6)
    sample_size: int = 32  # nominal image side; metadata only
    scaling_factor: float = 0.18215  # latents = (z - shift_factor) * scaling_factor
    shift_factor: float | None = None  # see scaling_factor; None means 0
    use_quant_conv: bool = True  # 1x1 conv on the encoder moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # self-attention in the encoder/decoder mid blocks
    # flax-only knobs
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # parameter dtype
    remat: bool = False  # rematerialise every resnet block (saves memory)

    def __post_init__(self):
        n = len(self.block_out_channels)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for key, kind in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            value = tuple(getattr(self, key))
            if value == (kind,) and n > 1:  # the dataclass default: one per block
                value = (kind,) * n
            if len(value) != n or any(v != kind for v in value):
                raise ValueError(
                    f"AutoencoderConfig.{key}: need {n} x {kind!r} (one per block), got {value}"
                )
            object.__setattr__(self, key, value)
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderConfig.norm_num_groups: {self.norm_num_groups} does not divide {c}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> AutoencoderConfig:
        """From a diffusers `AutoencoderKL` `config.json` dict; `overrides` set any field.

        Raises ValueError naming the key for unknown keys and unsupported options.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _FIXED_KEYS:
                if value not in _FIXED_KEYS[key]:
                    raise ValueError(
                        f"AutoencoderConfig.from_diffusers: unsupported {key}={value!r} "
                        f"(supported: {_FIXED_KEYS[key]})"
                    )
                continue
            if key not in fields:
                raise ValueError(f"AutoencoderConfig.from_diffusers: unknown key {key!r}")
            if isinstance(value, list):
                value = tuple(value)
            if key == "sample_size" and isinstance(value, tuple):
                value = value[0]
            kwargs[key] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` config dict describing the same network."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("dtype", "param_dtype", "remat"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _resnet(config: AutoencoderConfig, out_channels: int, name: str) -> nn.Module:
    cls = nn.remat(layers.ResnetBlock2D) if config.remat else layers.ResnetBlock2D
    return cls(
        out_channels=out_channels,
        groups=config.norm_num_groups,
        eps=1e-6,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D as the VAE uses it: resnet, single-head self-attention with group norm and
    residual (optional), resnet. NHWC in and out, channels unchanged."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        h = _resnet(cfg, channels, "resnets_0")(h)
        if cfg.mid_block_add_attention:
            b, height, width, c = h.shape
            h = layers.Attention(
                heads=1,
                head_dim=channels,
                qkv_bias=True,
                norm_num_groups=cfg.norm_num_groups,
                norm_eps=1e-6,
                residual_connection=True,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="attentions_0",
            )(h.reshape(b, height * width, c)).reshape(b, height, width, c)
        return _resnet(cfg, channels, "resnets_1")(h)


class _DownEncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets without time embedding, then (unless last) the asymmetric
    padding stride-2 `downsamplers_0`."""

    config: AutoencoderConfig
    index: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        for j in range(cfg.layers_per_block):
            h = _resnet(cfg, channels, f"resnets_{j}")(h)
        if i < len(cfg.block_out_channels) - 1:
            h = layers.Downsample2D(
                channels,
                padding=0,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="downsamplers_0",
            )(h)
        return layers.constrain_image(h)


class _UpDecoderBlock(nn.Module):
    """UpDecoderBlock2D number `index` (from the bottom): `layers_per_block + 1` resnets, then
    (unless last) nearest x2 + conv `upsamplers_0`."""

    config: AutoencoderConfig
    index: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        channels = cfg.block_out_channels[n - 1 - i]
        for j in range(cfg.layers_per_block + 1):
            h = _resnet(cfg, channels, f"resnets_{j}")(h)
        if i < n - 1:
            h = layers.Upsample2D(
                channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="upsamplers_0"
            )(h)
        return layers.constrain_image(h)


class Encoder(nn.Module):
    """Image `(B, H, W, in_channels)` -> moments `(B, H/f, W/f, 2 * latent_channels)`."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = layers.conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i in range(len(cfg.block_out_channels)):
            h = _DownEncoderBlock(cfg, i, name=f"down_blocks_{i}")(h)
        h = VAEMidBlock(cfg, name="mid_block")(h)
        h = layers.GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(h)
        return layers.conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(nn.silu(h))


class Decoder(nn.Module):
    """Latent `(B, h, w, latent_channels)` (after post_quant_conv) -> image `(B, h*f, w*f, out_channels)`."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = layers.conv(cfg.block_out_channels[-1], 3, name="conv_in", **kw)(z)
        h = VAEMidBlock(cfg, name="mid_block")(h)
        for i in range(len(cfg.block_out_channels)):
            h = _UpDecoderBlock(cfg, i, name=f"up_blocks_{i}")(h)
        h = layers.GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(h)
        return layers.conv(cfg.out_channels, 3, name="conv_out", **kw)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` in flax. Use `apply(..., method="encode" | "decode")`;
    `__call__` (encode, take the mean, decode) exists to initialise every parameter."""

    config: AutoencoderConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = layers.conv(cfg.latent_channels, 1, **kw)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image `(B, H, W, C)` in [-1, 1] -> `(mean, logvar)`, each `(B, H/f, W/f, latent_channels)`."""
        moments = self.encoder(x.astype(self.config.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Latent `z` `(B, h, w, latent_channels)` (unscaled) -> image `(B, h*f, w*f, out_channels)`."""
        z = z.astype(self.config.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def init_params(
    config: AutoencoderConfig, rng: Array, sample_size: int | None = None
) -> dict[str, Any]:
    """Fresh AutoencoderKL params, plain (unboxed) nested dicts. `AutoencoderKL(config).init`
    gives the boxed tree with logical axis names. `sample_size` is the dummy image side."""
    size = sample_size or config.downsample_factor
    x = jnp.zeros((1, size, size, config.in_channels), jnp.float32)
    return nn.meta.unbox(AutoencoderKL(config).init(rng, x)["params"])


def encode(params: Any, config: AutoencoderConfig, images: Array) -> tuple[Array, Array]:
    """`(mean, logvar)` of the posterior for images `(B, H, W, C)` in [-1, 1] (unscaled z space)."""
    return AutoencoderKL(config).apply({"params": params}, images, method="encode")


def decode(params: Any, config: AutoencoderConfig, z: Array) -> Array:
    """Image `(B, H, W, C)` (about [-1, 1]) for an unscaled latent `z`."""
    return AutoencoderKL(config).apply({"params": params}, z, method="decode")


def images_to_latents(
    params: Any, config: AutoencoderConfig, images: Array, key: Array | None = None
) -> Array:
    """Images `(B, H, W, C)` in [-1, 1] -> diffusion-space latents `(B, H/f, W/f, latent_channels)`.

    With `key`, samples `z = mean + exp(logvar / 2) * ε`; without, takes the posterior mean. Then
    `latents = (z - shift_factor) * scaling_factor`.
    """
    mean, logvar = encode(params, config, images)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def latents_to_images(params: Any, config: AutoencoderConfig, latents: Array) -> Array:
    """Diffusion-space latents -> images `(B, H, W, C)` (about [-1, 1]; not clipped)."""
    z = latents / config.scaling_factor + (config.shift_factor or 0.0)
    return decode(params, config, z)
