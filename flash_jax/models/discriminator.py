"""LADD-style discriminator heads over a FROZEN teacher UNet's features (docs/method.md,
"Adversarial term").

The teacher UNet (`UNet(..., return_features=True)`) turns a re-noised latent into one NHWC feature
map per down block plus the mid block. Each map gets a light trainable head: conv 3x3 → GroupNorm →
SiLU → conv 1x1 to a per-location logit, plus a projection term `<φ(h), e(c)>` with `e(c)` an
embedding of the condition (noise level and pooled text). The logit of an image is the mean over
locations and heads. Only the heads are trained; the teacher's weights are never in this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flash_jax.models import layers

Array = jax.Array


class FeatureHead(nn.Module):
    """One head: `(B, H, W, C)` features and `(B, E)` condition → `(B,)` logits."""

    width: int = 64

    @nn.compact
    def __call__(self, features: Array, condition: Array) -> Array:
        h = layers.conv(self.width, 3, name="conv")(features.astype(jnp.float32))
        h = nn.silu(layers.GroupNorm(min(8, self.width), 1e-5, name="norm")(h))
        logit = layers.conv(1, 1, name="out")(h)[..., 0].mean(axis=(1, 2))
        pooled = h.mean(axis=(1, 2))
        projection = jnp.sum(pooled * nn.Dense(self.width, name="cond")(condition), axis=-1)
        return logit + projection / jnp.sqrt(self.width)


class Discriminator(nn.Module):
    """Heads over a list of feature maps; condition = [sinusoidal(t) ; pooled text]."""

    width: int = 64
    time_dim: int = 64

    @nn.compact
    def __call__(self, features: Sequence[Array], t: Array, pooled_text: Array) -> Array:
        """features: NHWC maps; t: `(B,)` noise timesteps; pooled_text: `(B, D)`. Returns `(B,)`."""
        t_emb = layers.timestep_embedding(t.astype(jnp.float32), self.time_dim)
        condition = jnp.concatenate([t_emb, pooled_text.astype(jnp.float32)], axis=-1)
        condition = nn.silu(nn.Dense(self.width, name="cond_embed")(condition))
        logits = [
            FeatureHead(self.width, name=f"heads_{i}")(f, condition) for i, f in enumerate(features)
        ]
        return jnp.mean(jnp.stack(logits), axis=0)


def hinge_discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
    """`E[relu(1 − D(real))] + E[relu(1 + D(fake))]`."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_generator_loss(fake_logits: Array) -> Array:
    """`−E[D(fake)]`."""
    return -jnp.mean(fake_logits)
