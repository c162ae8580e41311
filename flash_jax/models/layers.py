"""Shared flax.linen blocks of the diffusers-family models (UNet2DConditionModel, AutoencoderKL).

Layout: NHWC feature maps `(B, H, W, C)`, token sequences `(B, L, D)`. Submodules carry the
PyTorch names (`conv1`, `time_emb_proj`, `to_out_0`, `ff/net_0/proj`, ...), so weights map
mechanically (see `flash_jax.weights`). Numerics follow diffusers 0.42 (PyTorch), float32 exact:
GroupNorm with torch's grouping and two-pass variance, erf-GELU, softmax attention with scale
`head_dim**-0.5`, nearest-neighbour upsampling with torch's index rule.

Every kernel carries logical axis names for sharding (`nn.with_logical_partitioning`):
Dense `('embed', 'mlp')` / `('mlp', 'embed')`, attention q/k/v `('embed', 'heads')`, attention
out `('heads', 'embed')`, convs `('conv_h', 'conv_w', 'conv_in', 'conv_out')`; norms and biases
are unannotated. `Module.init` therefore returns boxed params; unbox with
`flax.linen.meta.unbox`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
IMAGE_AXES = ("batch", "height", "width", "channels")
TOKEN_AXES = ("batch", "length", "embed")


def dense(
    features: int,
    *,
    axes: tuple[str, str] = ("embed", "mlp"),
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel `(in, out)` is annotated with logical `axes`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: int | Sequence[tuple[int, int]] | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A 2-D conv, kernel `(kh, kw, in, out)`; `padding` an int is torch's symmetric padding.

    The default padding is `(kernel_size - 1) // 2` on every side, as diffusers uses.
    """
    if padding is None:
        padding = (kernel_size - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=tuple(padding),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
) -> Array:
    """`lax.conv_general_dilated`, except that an NHWC input smaller than the kernel in a spatial
    dimension (a 3×3 conv on a 2×2 map) is a patch matrix times the kernel.

    XLA:CPU lowers such convs by swapping the operands, which ran 3–7× slower than `patch_conv`
    at the testbed UNet's 2×2 maps (`benchmarks/small_conv.py`, docs/performance.md). The result
    is the same convolution (float32, other summation order).
    """
    args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    nhwc = (lhs.ndim, rhs.ndim) == (4, 4) and dimension_numbers == jax.lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")
    )
    plain = (
        all(s == 1 for s in window_strides)
        and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
        and feature_group_count == 1
        and not isinstance(padding, str)
    )
    small = nhwc and any(n < k for n, k in zip(lhs.shape[1:3], rhs.shape[:2], strict=True))
    if not (small and plain):
        return jax.lax.conv_general_dilated(
            lhs, rhs, *args, feature_group_count=feature_group_count, precision=precision
        )
    return patch_conv(lhs, rhs, padding, precision)


def patch_conv(lhs: Array, rhs: Array, padding: Any, precision: Any = None) -> Array:
    """Stride-1 NHWC conv `lhs (B, H, W, C_in)` * `rhs (kh, kw, C_in, C_out)` with explicit
    `padding ((top, bottom), (left, right))` as one matmul: the kh·kw shifted views of the padded
    input side by side, times the kernel reshaped to `(kh·kw·C_in, C_out)`."""
    kh, kw, c_in, c_out = rhs.shape
    x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    patches = [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(patches, axis=-1)  # (B, h, w, kh·kw·C_in), kernel's (kh, kw, C_in)
    return jnp.dot(patches, rhs.reshape(kh * kw * c_in, c_out), precision=precision)


def constrain_image(x: Array) -> Array:
    """Logical sharding constraint on an NHWC activation (a no-op without axis rules)."""
    return nn.with_logical_constraint(x, IMAGE_AXES)


def constrain_tokens(x: Array) -> Array:
    """Logical sharding constraint on a `(B, L, D)` activation (a no-op without axis rules)."""
    return nn.with_logical_constraint(x, TOKEN_AXES)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis of `(B, ..., C)`; statistics in float32.

    Groups are contiguous channel ranges, as in torch; the variance is the two-pass
    `mean((x - mean)^2)`. Params `scale`, `bias` of shape `(C,)`.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels not divisible by {self.num_groups} groups"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        shape, per_group = x.shape, channels // self.num_groups
        xf = x.astype(jnp.float32).reshape(shape[0], -1, channels)
        count = xf.shape[1] * per_group

        def group_mean(channel_sums: Array) -> Array:
            """`(B, C)` sums over positions -> `(B, 1, C)`: each channel's group mean."""
            groups = channel_sums.reshape(shape[0], self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(groups, per_group, axis=-1)[:, None, :]

        # Summing over positions first, then within groups, is ~5x faster on XLA:CPU than one
        # reduction over (positions, channels of the group) (docs/performance.md).
        mean = group_mean(xf.sum(axis=1))
        centred = xf - mean
        var = group_mean(jnp.square(centred).sum(axis=1))
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def layer_norm(
    epsilon: float = 1e-5,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str,
) -> nn.LayerNorm:
    """torch.nn.LayerNorm over the last axis (two-pass variance, float32 statistics)."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
    )


def timestep_embedding(
    timesteps: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding of `timesteps` `(N,)` -> `(N, dim)` float32 (diffusers' rule).

    Frequencies `exp(-log(max_period) * i / (dim // 2 - freq_shift))`; halves `[sin, cos]`, or
    `[cos, sin]` with `flip_sin_to_cos`; a zero column appended when `dim` is odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / (half - freq_shift)
    freqs = jnp.exp(exponent)
    args = scale * (jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :])
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_embedding(w: Array, dim: int) -> Array:
    """Embedding of guidance weights `w` `(N,)` -> `(N, dim)` float32 (the UNet's `timestep_cond`
    for guidance-conditioned students: LCM, guided step distillation). Same numbers as diffusers'
    `get_guidance_scale_embedding`: the sinusoidal timestep embedding of `1000·w` with [sin, cos]
    halves and frequencies `10000^(−i/(dim/2 − 1))`. `w` is the weight of `c + w·(c − u)`, i.e.
    the CFG scale minus one."""
    return timestep_embedding(1000.0 * jnp.asarray(w, jnp.float32), dim, freq_shift=1.0)


class TimestepEmbedding(nn.Module):
    """MLP `linear_1 -> SiLU -> linear_2` on an embedding `(B, D_in)` -> `(B, time_embed_dim)`.

    `condition` `(B, D_c)` (diffusers' `timestep_cond`, used by LCM-style guidance embedding) is
    projected by the bias-free `cond_proj` and added to the input first.
    """

    time_embed_dim: int
    out_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, condition: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition is not None:
            x = x + dense(x.shape[-1], use_bias=False, name="cond_proj", **kw)(condition)
        x = dense(self.time_embed_dim, axes=("embed", "mlp"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        return dense(
            self.out_dim or self.time_embed_dim, axes=("mlp", "embed"), name="linear_2", **kw
        )(x)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D: GN-SiLU-conv, (+ time embedding), GN-SiLU-conv, residual.

    `time_embedding_norm`: "default" adds `time_emb_proj(silu(temb))` before `norm2`;
    "scale_shift" applies `norm2(h) * (1 + scale) + shift`. A 1x1 `conv_shortcut` is used when
    the channel count changes. Input `(B, H, W, C_in)`, temb `(B, T)` or None -> `(B, H, W, C_out)`.
    """

    out_channels: int
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups_out = self.groups_out or self.groups
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        if temb is not None:
            scale_shift = self.time_embedding_norm == "scale_shift"
            features = self.out_channels * (2 if scale_shift else 1)
            t = dense(features, axes=("embed", "mlp"), name="time_emb_proj", **kw)(nn.silu(temb))
            t = t[:, None, None, :]
            if scale_shift:
                t_scale, t_shift = jnp.split(t, 2, axis=-1)
                h = GroupNorm(groups_out, self.eps, name="norm2", **kw)(h)
                h = h * (1 + t_scale) + t_shift
            else:
                h = GroupNorm(groups_out, self.eps, name="norm2", **kw)(h + t)
        else:
            h = GroupNorm(groups_out, self.eps, name="norm2", **kw)(h)
        h = conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return constrain_image(out)


def attention_per_head(q: Array, k: Array, v: Array) -> Array:
    """softmax(q kᵀ/√d) v, one (batch, head) pair at a time; q `(B, Lq, H, D)`, k/v `(B, Lk, H, D)`.

    A `lax.map` over the B·H pairs of plain 2-D matmuls, logits and softmax in float32. On XLA:CPU
    this is several times faster than the batched form at long sequences, since one head's
    `(Lq, Lk)` scores stay in cache (docs/performance.md). The map is sequential, so on
    accelerators, and with the batch sharded over devices, the batched default is the one to use.
    """
    b, lq, heads, d = q.shape

    def heads_first(a: Array) -> Array:
        return a.transpose(0, 2, 1, 3).reshape(b * heads, a.shape[1], d)

    def one(qkv: tuple[Array, Array, Array]) -> Array:
        qh, kh, vh = qkv
        logits = jnp.matmul(qh, kh.T, preferred_element_type=jnp.float32) * d**-0.5
        return jax.nn.softmax(logits, axis=-1).astype(vh.dtype) @ vh

    out = jax.lax.map(one, tuple(heads_first(a) for a in (q, k, v)))
    return out.reshape(b, heads, lq, d).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head attention `to_q/to_k/to_v -> softmax(q k^T / sqrt(d)) v -> to_out_0`.

    x `(B, Lq, Dq)`; `context` `(B, Lk, Dk)` for cross-attention (None: self-attention).
    With `norm_num_groups` (the VAE's mid-block attention) a `group_norm` is applied to the input
    first and the input is added back (`residual_connection`). `upcast` computes the attention in
    float32 whatever the compute dtype. `implementation` is passed to
    `jax.nn.dot_product_attention` (None: let JAX choose; "xla"; "cudnn"), or "per_head":
    `attention_per_head` (for CPUs; docs/performance.md).
    """

    heads: int
    head_dim: int
    out_dim: int | None = None
    qkv_bias: bool = False
    norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    upcast: bool = False
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        if self.norm_num_groups is not None:
            x = GroupNorm(self.norm_num_groups, self.norm_eps, name="group_norm", **kw)(x)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        qkv_axes = ("embed", "heads")
        q = dense(inner, axes=qkv_axes, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = dense(inner, axes=qkv_axes, use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = dense(inner, axes=qkv_axes, use_bias=self.qkv_bias, name="to_v", **kw)(context)
        batch, q_len = q.shape[:2]
        q, k, v = (a.reshape(batch, a.shape[1], self.heads, self.head_dim) for a in (q, k, v))
        if self.upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        if self.implementation == "per_head":
            out = attention_per_head(q, k, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.astype(self.dtype).reshape(batch, q_len, inner)
        out = dense(self.out_dim or x.shape[-1], axes=("heads", "embed"), name="to_out_0", **kw)(
            out
        )
        if self.residual_connection:
            out = out + residual
        return out


class GEGLU(nn.Module):
    """`proj` to `2 * inner`, then `hidden * gelu(gate)` (exact erf GELU), halves in that order."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(
            2 * self.inner_dim,
            axes=("embed", "mlp"),
            name="proj",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers FeedForward with GEGLU: `net_0` (GEGLU, inner = mult * dim) then `net_2` Dense."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return dense(self.dim, axes=("mlp", "embed"), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention (`norm1`/`attn1`), cross-attention (`norm2`/`attn2`, only
    with `cross_attention`), GEGLU feed-forward (`norm3`/`ff`). `(B, L, dim)` -> same."""

    dim: int
    heads: int
    head_dim: int
    cross_attention: bool = True
    norm_eps: float = 1e-5
    upcast_attention: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(
            heads=self.heads,
            head_dim=self.head_dim,
            out_dim=self.dim,
            upcast=self.upcast_attention,
            implementation=self.attention_implementation,
            **kw,
        )
        h = layer_norm(self.norm_eps, name="norm1", **kw)(x)
        x = x + Attention(name="attn1", **attn_kw)(h)
        if self.cross_attention:
            h = layer_norm(self.norm_eps, name="norm2", **kw)(x)
            x = x + Attention(name="attn2", **attn_kw)(h, context)
        h = layer_norm(self.norm_eps, name="norm3", **kw)(x)
        x = x + FeedForward(self.dim, name="ff", **kw)(h)
        return constrain_tokens(x)


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel on continuous input: GroupNorm (eps 1e-6), `proj_in`
    (1x1 conv, or Dense with `use_linear_projection`), `num_layers` BasicTransformerBlocks over
    the `H*W` tokens, `proj_out`, residual. x `(B, H, W, C)`, context `(B, L, D)` -> `(B, H, W, C)`.
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    cross_attention: bool = True
    upcast_attention: bool = False
    attention_implementation: str | None = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        residual = x
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = h.reshape(batch, height * width, channels)
            h = dense(inner, axes=("embed", "mlp"), name="proj_in", **kw)(h)
        else:
            h = conv(inner, 1, name="proj_in", **kw)(h).reshape(batch, height * width, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            h = block_cls(
                dim=inner,
                heads=self.heads,
                head_dim=self.head_dim,
                cross_attention=self.cross_attention,
                upcast_attention=self.upcast_attention,
                attention_implementation=self.attention_implementation,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context)
        if self.use_linear_projection:
            h = dense(channels, axes=("mlp", "embed"), name="proj_out", **kw)(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = conv(channels, 1, name="proj_out", **kw)(h.reshape(batch, height, width, inner))
        return constrain_image(h + residual)


class Downsample2D(nn.Module):
    """3x3 stride-2 `conv`. `padding` as torch (symmetric); 0 means diffusers' asymmetric
    zero pad of one row/column at the bottom/right first (the VAE). `(B, H, W, C)` -> `(B, H', W', C')`.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(
            self.out_channels,
            3,
            strides=2,
            padding=pad,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


def upsample_nearest(x: Array, size: tuple[int, int] | None = None) -> Array:
    """Nearest-neighbour resize of `(B, H, W, C)` to `size` (default `(2H, 2W)`), torch's rule
    `src = min(floor(dst * (in / out)), in - 1)` computed in float32."""
    _, height, width, _ = x.shape
    if size is None or tuple(size) == (2 * height, 2 * width):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32)
        return np.minimum(src, n_in - 1)

    x = jnp.take(x, index(height, size[0]), axis=1)
    return jnp.take(x, index(width, size[1]), axis=2)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to `output_size`) then a 3x3 `conv`. NHWC."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, output_size: tuple[int, int] | None = None) -> Array:
        x = upsample_nearest(x, output_size)
        return conv(
            self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
        )(x)
