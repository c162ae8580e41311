"""The Stable Diffusion family UNet (SD1.x, SD2.x, SDXL) as one flax.linen module.

Numerically the same as diffusers 0.42 `UNet2DConditionModel` (PyTorch) for the configurations
`UNetConfig.from_diffusers` accepts; anything else is rejected with a `ValueError` naming the key.
Submodules carry the diffusers names (`down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k`),
so `flash_jax.weights.unet_from_diffusers` maps weights by name.

Shapes: sample NHWC `(B, H, W, C_in)` with `H, W` any size (odd sizes follow diffusers' upsample
to the skip's size); timesteps `(B,)` or scalar; encoder hidden states `(B, L, D_cross)`;
for SDXL (`addition_embed_type="text_time"`) `text_embeds` `(B, D_pooled)` and `time_ids`
`(B, 6)`. Output `(B, H, W, C_out)` in the compute dtype.
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

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# diffusers keys that must keep the value(s) listed: options this implementation does not have.
_FIXED_KEYS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "dropout": (0, 0.0),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "num_attention_heads": (None,),  # diffusers itself rejects it; `attention_head_dim` is used
    "reverse_transformer_layers_per_block": (None,),
}
# diffusers keys without effect on the supported models (bookkeeping, or only for other options).
_IGNORED_KEYS = frozenset({"addition_embed_type_num_heads"})
# diffusers key -> UNetConfig field, where the names differ.
_RENAMED_KEYS = {"attention_head_dim": "num_attention_heads"}


def _per_block(value: Any, n: int, what: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNetConfig.{what}: {len(value)} values for {n} blocks: {value}")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters. Defaults are diffusers' `UNet2DConditionModel` defaults (SD1.x).

    Per-block fields accept an int (same for every block) and are stored as tuples, one value
    per down block (up blocks use them reversed; the mid block uses the last).
    """

    sample_size: int | None = None  # nominal latent side; metadata only (any H, W run)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels predicted (ε or v)
    center_input_sample: bool = False  # apply `2 * x - 1` to the input first
    flip_sin_to_cos: bool = True  # timestep embedding halves ordered [cos, sin]
    freq_shift: float = 0.0  # timestep embedding frequency shift
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )  # each "CrossAttnDownBlock2D" or "DownBlock2D"
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # or "UNetMidBlock2D" or None
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )  # each "CrossAttnUpBlock2D" or "UpBlock2D"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution
    layers_per_block: int | tuple[int, ...] = 2  # resnets per down block (up blocks: +1)
    downsample_padding: int = 1  # padding of the stride-2 downsample convs
    mid_block_scale_factor: float = 1.0  # mid-block resnet output divisor
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm eps of resnets and the output norm
    cross_attention_dim: int | tuple[int, ...] = 1280  # width of encoder hidden states
    transformer_layers_per_block: int | tuple[int, ...] = 1  # BasicTransformerBlocks per attention
    num_attention_heads: int | tuple[int, ...] = 8  # heads (diffusers' `attention_head_dim`, sic)
    use_linear_projection: bool = False  # Dense proj_in/out (SD2, SDXL) instead of 1x1 convs (SD1)
    upcast_attention: bool = False  # attention in float32 even in bf16/fp16 compute
    resnet_time_scale_shift: str = "default"  # "default" (add) or "scale_shift"
    time_embedding_dim: int | None = None  # default 4 * block_out_channels[0]
    time_cond_proj_dim: int | None = None  # width of `timestep_cond` (LCM guidance embedding)
    conv_in_kernel: int = 3  # kernel of conv_in
    conv_out_kernel: int = 3  # kernel of conv_out
    addition_embed_type: str | None = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None  # SDXL: embedding width per time id
    projection_class_embeddings_input_dim: int | None = None  # SDXL: D_pooled + 6 * that width
    # flax-only knobs
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # parameter dtype
    remat: bool = False  # rematerialise every resnet and transformer block (saves memory)
    # None / "xla" / "cudnn" (jax.nn.dot_product_attention) | "per_head" (CPUs: layers.py)
    attention_implementation: str | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("block_out_channels", tuple(self.block_out_channels))
        set_("down_block_types", tuple(self.down_block_types))
        set_("up_block_types", tuple(self.up_block_types))
        set_("upcast_attention", bool(self.upcast_attention))  # config.json files say null or false
        if self.attention_implementation not in (None, "xla", "cudnn", "per_head"):
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r}: "
                "None, 'xla', 'cudnn' or 'per_head'"
            )
        for key in (
            "layers_per_block",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "num_attention_heads",
        ):
            set_(key, _per_block(getattr(self, key), n, key))
        if any(isinstance(t, (list, tuple)) for t in self.transformer_layers_per_block):
            raise ValueError(
                "UNetConfig.transformer_layers_per_block: nested (asymmetric) values are not supported"
            )
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: {len(self.down_block_types)} down_block_types, "
                f"{len(self.up_block_types)} up_block_types for {n} block_out_channels"
            )
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(
                    f"UNetConfig.down_block_types: unsupported {t!r} (have {_DOWN_TYPES})"
                )
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"UNetConfig.up_block_types: unsupported {t!r} (have {_UP_TYPES})")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(
                f"UNetConfig.mid_block_type: unsupported {self.mid_block_type!r} (have {_MID_TYPES})"
            )
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"UNetConfig.resnet_time_scale_shift: unsupported {self.resnet_time_scale_shift!r}"
            )
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"UNetConfig.addition_embed_type: unsupported {self.addition_embed_type!r} "
                "(have None, 'text_time')"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None
            or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "UNetConfig.addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        for c, h in zip(self.block_out_channels, self.num_attention_heads, strict=True):
            if c % h:
                raise ValueError(
                    f"UNetConfig.num_attention_heads: {h} does not divide {c} channels"
                )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig.norm_num_groups: {self.norm_num_groups} does not divide {c} channels"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
        """From a diffusers `UNet2DConditionModel` `config.json` dict (SD1.x, SD2.x, SDXL).

        `overrides` set flax-only fields (`dtype`, `param_dtype`, `remat`, ...) or any other.
        Raises ValueError naming the key for unknown keys and unsupported options.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _FIXED_KEYS:
                ok = _FIXED_KEYS[key]
                if isinstance(value, (list, tuple)) and key == "only_cross_attention":
                    value = any(value)
                if value not in ok:
                    raise ValueError(
                        f"UNetConfig.from_diffusers: unsupported {key}={value!r} (supported: {ok})"
                    )
                continue
            name = _RENAMED_KEYS.get(key, key)
            if name not in fields:
                raise ValueError(f"UNetConfig.from_diffusers: unknown key {key!r}")
            if name == "norm_num_groups" and value is None:
                raise ValueError("UNetConfig.from_diffusers: unsupported norm_num_groups=None")
            if isinstance(value, list):
                value = tuple(value)
            if name == "sample_size" and isinstance(value, tuple):
                value = value[0]
            kwargs[name] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers `UNet2DConditionModel` config dict describing the same network."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("dtype", "param_dtype", "remat", "attention_implementation"):
                continue
            value = getattr(self, f.name)
            out["attention_head_dim" if f.name == "num_attention_heads" else f.name] = (
                list(value) if isinstance(value, tuple) else value
            )
        return out


def _resnet(config: UNetConfig, out_channels: int, name: str, scale: float = 1.0) -> nn.Module:
    cls = nn.remat(layers.ResnetBlock2D) if config.remat else layers.ResnetBlock2D
    return cls(
        out_channels=out_channels,
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        time_embedding_norm=config.resnet_time_scale_shift,
        output_scale_factor=scale,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


def _transformer(config: UNetConfig, block: int, name: str) -> nn.Module:
    """The Transformer2DModel of down block `block` (its up twin and, for -1, the mid block)."""
    channels, heads = config.block_out_channels[block], config.num_attention_heads[block]
    return layers.Transformer2DModel(
        heads=heads,
        head_dim=channels // heads,
        num_layers=config.transformer_layers_per_block[block],
        norm_num_groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=bool(config.upcast_attention),
        attention_implementation=config.attention_implementation,
        remat=config.remat,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D / DownBlock2D number `index`: returns `(h, skips)`, skips being each
    resnet(+attention) output and, unless last, the downsampled output."""

    config: UNetConfig
    index: int

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> tuple[Array, list[Array]]:
        cfg, i = self.config, self.index
        channels = cfg.block_out_channels[i]
        attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        skips = []
        for j in range(cfg.layers_per_block[i]):
            h = _resnet(cfg, channels, f"resnets_{j}")(h, temb)
            if attention:
                h = _transformer(cfg, i, f"attentions_{j}")(h, context)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = layers.Downsample2D(
                channels,
                cfg.downsample_padding,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="downsamplers_0",
            )(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn (resnet, transformer, resnet) or UNetMidBlock2D (one resnet)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Array) -> Array:
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        h = _resnet(cfg, channels, "resnets_0", scale)(h, temb)
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            h = _transformer(cfg, -1, "attentions_0")(h, context)
            h = _resnet(cfg, channels, "resnets_1", scale)(h, temb)
        return h


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D / UpBlock2D number `index` (counted from the bottom): each resnet takes
    the concatenation of `h` and the last remaining skip; upsamples to `upsample_size` unless last."""

    config: UNetConfig
    index: int

    @nn.compact
    def __call__(
        self,
        h: Array,
        skips: list[Array],
        temb: Array,
        context: Array,
        upsample_size: tuple[int, int] | None,
    ) -> Array:
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        rev = n - 1 - i  # the matching down block
        channels = cfg.block_out_channels[rev]
        attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        skips = list(skips)
        for j in range(cfg.layers_per_block[rev] + 1):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _resnet(cfg, channels, f"resnets_{j}")(h, temb)
            if attention:
                h = _transformer(cfg, rev, f"attentions_{j}")(h, context)
        if i < n - 1:
            h = layers.Upsample2D(
                channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="upsamplers_0"
            )(h, upsample_size)
        return h


class UNet(nn.Module):
    """diffusers `UNet2DConditionModel` in flax; NHWC. See the module docstring for shapes."""

    config: UNetConfig

    @nn.compact
    def __call__(
        self,
        sample: Array,
        timesteps: Array | float,
        encoder_hidden_states: Array,
        added_cond_kwargs: Mapping[str, Array] | None = None,
        timestep_cond: Array | None = None,
        return_features: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        """Predicts ε (or v) for a noisy latent.

        Args:
          sample: `(B, H, W, in_channels)` noisy latents.
          timesteps: `(B,)` or scalar, integer or fractional training timesteps.
          encoder_hidden_states: `(B, L, cross_attention_dim)` text embeddings.
          added_cond_kwargs: SDXL only: `{"text_embeds": (B, D_pooled), "time_ids": (B, 6)}`.
          timestep_cond: `(B, time_cond_proj_dim)` when the config has `time_cond_proj_dim`.
          return_features: also return the output of every down block and of the mid block
            (NHWC, for discriminators on the frozen network's features).

        Returns:
          `(B, H, W, out_channels)`, or `(that, features)` with `return_features`.
        """
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        batch = sample.shape[0]
        sample = layers.constrain_image(sample.astype(cfg.dtype))
        context = layers.constrain_tokens(encoder_hidden_states.astype(cfg.dtype))

        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps), (-1,)), (batch,))
        t_emb = layers.timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).astype(cfg.dtype)
        if (timestep_cond is None) != (cfg.time_cond_proj_dim is None):
            raise ValueError(
                "UNet: pass timestep_cond exactly when config.time_cond_proj_dim is set"
            )
        emb = layers.TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(
            t_emb, None if timestep_cond is None else timestep_cond.astype(cfg.dtype)
        )
        if cfg.addition_embed_type == "text_time":
            if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(
                added_cond_kwargs
            ):
                raise ValueError(
                    "UNet: addition_embed_type='text_time' needs added_cond_kwargs "
                    "with 'text_embeds' and 'time_ids'"
                )
            time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
            time_embeds = layers.timestep_embedding(
                time_ids.reshape(-1),
                cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos,
                freq_shift=cfg.freq_shift,
            ).reshape(batch, -1)
            add = jnp.concatenate(
                [added_cond_kwargs["text_embeds"].astype(cfg.dtype), time_embeds.astype(cfg.dtype)],
                axis=-1,
            )
            emb = emb + layers.TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(
                add
            )

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        h = layers.conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(sample)

        skips, features = [h], []
        for i in range(len(cfg.block_out_channels)):
            h, block_skips = DownBlock(cfg, i, name=f"down_blocks_{i}")(h, emb, context)
            skips += block_skips
            features.append(h)
        if cfg.mid_block_type is not None:
            h = MidBlock(cfg, name="mid_block")(h, emb, context)
            features.append(h)

        for i in range(len(cfg.block_out_channels)):
            n_skips = cfg.layers_per_block[-1 - i] + 1
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            size = skips[-1].shape[1:3] if skips else None
            h = UpBlock(cfg, i, name=f"up_blocks_{i}")(h, block_skips, emb, context, size)

        h = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        h = nn.silu(h)
        out = layers.conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(h)
        return (out, features) if return_features else out


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int | None = None) -> dict[str, Any]:
    """Zero inputs of the right shapes for `UNet(config).init`/`apply` (size defaults to the
    smallest side every down block accepts)."""
    size = size or config.sample_size or 2 ** (len(config.block_out_channels) - 1)
    inputs: dict[str, Any] = dict(
        sample=jnp.zeros((batch, size, size, config.in_channels), jnp.float32),
        timesteps=jnp.zeros((batch,), jnp.float32),
        encoder_hidden_states=jnp.zeros((batch, 1, config.cross_attention_dim[0]), jnp.float32),
    )
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(
            text_embeds=jnp.zeros((batch, pooled), jnp.float32),
            time_ids=jnp.zeros((batch, 6), jnp.float32),
        )
    if config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim), jnp.float32)
    return inputs


def init_params(config: UNetConfig, rng: Array, sample_size: int | None = None) -> dict[str, Any]:
    """Fresh UNet params: the plain (unboxed) `params` collection, `{name: ...}` nested dicts.

    For the logical sharding annotations use `UNet(config).init(rng, **dummy_inputs(config))`,
    which returns the boxed (`nn.LogicallyPartitioned`) tree. `sample_size` only sets the dummy
    input's side (parameter shapes do not depend on it).
    """
    variables = UNet(config).init(rng, **dummy_inputs(config, 1, sample_size))
    return nn.meta.unbox(variables["params"])
