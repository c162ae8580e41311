"""TrainState: everything a run needs to resume exactly, as one pytree.

Frozen models (teacher, text encoder, VAE) are NOT in it: they are step arguments, never checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


@struct.dataclass
class TrainState:
    """Attributes:
    step: int32 scalar, number of updates applied.
    params: trainable generator parameters.
    opt_state: optimizer state of `params`.
    ema_params: exponential moving average of `params` (what is evaluated and sampled).
    disc_params / disc_opt_state: discriminator and its optimizer state (None without one).
    rng: uint32 `(2,)` base key; step keys are `fold_in(rng, step)`, so resume is exact.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    disc_params: PyTree
    disc_opt_state: PyTree
    rng: jax.Array


def init_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    disc_params: PyTree = None,
    disc_tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """A fresh state at step 0; the EMA starts equal to the parameters."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        disc_params=disc_params,
        disc_opt_state=None if disc_params is None else disc_tx.init(disc_params),
        rng=rng,
    )
