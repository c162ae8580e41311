"""Builds ONE compiled training step from a `Method`: generator update, discriminator update, EMA,
metrics. The state is donated; frozen models are arguments (closing over them would bake them into
the program as constants)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flash_jax.methods import Method
from flash_jax.train.state import TrainState


def _ema(ema: Any, params: Any, decay: float | jax.Array) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array | float:
    """The EMA decay of update `step` (0-based): `decay`, or with `warmup` `min(decay, (1 + step)
    / (10 + step))`, which lets the average forget the parameters it started from within a few
    updates (a run that starts from another run's weights, like a step-distillation stage, then
    averages only its own updates)."""
    if not warmup:
        return decay
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(
    method: Method,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    ema_warmup: bool = False,
    disc_tx: optax.GradientTransformation | None = None,
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict[str, jax.Array]]]:
    """The uncompiled step `(state, frozen, batch) -> (state, metrics)`; see `compile_train_step`.

    Order: generator loss and gradient, optimizer update, the method's `post_update` (if any),
    discriminator update (if any), EMA of the kept parameters (`ema_decay_at`).

    Metrics are scalars: `loss`, `grad_norm`, the method's aux, `disc_*` with a discriminator, and
    `finite` (1.0 when every loss and gradient norm is finite) which the loop checks before it
    writes anything.
    """

    def step(state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        gen_rng, disc_rng = jax.random.split(rng)
        grad_fn = jax.value_and_grad(method.generator_loss, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, frozen, batch, gen_rng, state.disc_params)
        fake = aux.pop("fake", None)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if method.post_update is not None:
            params = method.post_update(state.params, params)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        if method.discriminator_loss is not None:
            disc_grad_fn = jax.value_and_grad(method.discriminator_loss, has_aux=True)
            (d_loss, d_aux), d_grads = disc_grad_fn(
                disc_params, jax.lax.stop_gradient(fake), frozen, batch, disc_rng
            )
            d_updates, disc_opt_state = disc_tx.update(d_grads, disc_opt_state, disc_params)
            disc_params = optax.apply_updates(disc_params, d_updates)
            d_norm = optax.tree.norm(d_grads)
            metrics |= {"disc_loss": d_loss, "disc_grad_norm": d_norm}
            metrics |= {f"disc_{k}": v for k, v in d_aux.items()}
            finite &= jnp.isfinite(d_loss) & jnp.isfinite(d_norm)

        metrics["finite"] = finite.astype(jnp.float32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=_ema(
                state.ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup)
            ),
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
        )
        return new_state, metrics

    return step


def compile_train_step(
    step: Callable,
    state_sharding: Any = None,
    frozen_sharding: Any = None,
    batch_sharding: Any = None,
) -> Callable:
    """jit with the state donated and explicit shardings (None: single device / inferred)."""
    if state_sharding is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(
        step,
        in_shardings=(state_sharding, frozen_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
