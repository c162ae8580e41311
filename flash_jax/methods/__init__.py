"""Training objectives. Each file here is one method exposing `make(config) -> Method`.

The trainer (flash_jax/train) only knows the `Method` interface, so adding a method never touches it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
    """A training objective as pure functions over pytrees (hyper-parameters bound at `make`).

    Attributes:
      init: `rng -> params`, the trainable parameters (student, teacher being trained, VAE...).
      load_frozen: `() -> frozen`, the frozen models (teacher, text encoder, VAE) as a pytree of
        arrays; passed to the compiled step as an ARGUMENT and never checkpointed.
      generator_loss: `(params, frozen, batch, rng, disc_params) -> (loss, aux)`, with `aux` a dict of
        scalar metrics plus, for methods with a discriminator, `aux["fake"]`: the generated
        samples the discriminator is then trained against; `disc_params` is None without one.
      init_discriminator: `rng -> disc_params`, or None.
      discriminator_loss: `(disc_params, fake, frozen, batch, rng) -> (loss, aux)`, or None; `fake`
        is the generator's `aux["fake"]` of the same step, under stop-gradient.
      prepare_batch: host-side `raw numpy batch -> dict of arrays` for the step (tokenize
        captions, scale images); runs outside jit, must drop non-array fields such as captions.
      sample: `(params, frozen, batch, rng) -> uint8 images (B, H, W, 3)` for periodic grids, or None.
      generate: `(params, frozen, tokens, x_T, rng, num_steps) -> uint8 images (B, H, W, 3)`, or
        None: the trained generator's own sampler at `num_steps` steps (a static int) from the
        initial noise `x_T` `(B, h, w, c)` for token ids `(B, L)`; `rng` drives stochastic
        samplers. Traceable; what evaluation (flash_jax/eval/generation.py) calls for a checkpoint
        of this method, so every method is compared on the same prompts and noise.
      post_update: `(params, new_params) -> new_params`, or None: runs in the compiled step right
        after the optimizer update (`params` are the values before it, `new_params` after) and
        returns the parameters to keep. For per-step state that is not learned by gradient, kept
        inside the trainable pytree under stop-gradient: e.g. LCM's EMA target network
        `target ← μ·target + (1 − μ)·student`. Without it the update is kept as is.
      logical_axes: `() -> tree` of the models' abstract parameters with kernels boxed by their
        logical axis names (e.g. `t2i.T2I.logical_axes()`), or None. Parameters, optimizer
        state and frozen models whose paths end like an annotated kernel's are sharded by
        `config.sharding_rules` (`parallel.tree_shardings`); the rest by size.
    """

    init: Callable[[jax.Array], PyTree]
    load_frozen: Callable[[], PyTree]
    generator_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    prepare_batch: Callable[[dict], Batch]
    init_discriminator: Callable[[jax.Array], PyTree] | None = None
    discriminator_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]] | None = None
    sample: Callable[..., jax.Array] | None = None
    generate: Callable[..., jax.Array] | None = None
    post_update: Callable[[PyTree, PyTree], PyTree] | None = None
    logical_axes: Callable[[], PyTree] | None = None


def get(name: str) -> Callable[[Any], Method]:
    """`make` of the method module `flash_jax.methods.<name>`; a clear error for unknown names."""
    try:
        module = importlib.import_module(f"flash_jax.methods.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"flash_jax.methods.{name}":
            raise
        raise ValueError(f"config.method={name!r}: no module flash_jax/methods/{name}.py") from None
    if not hasattr(module, "make"):
        raise ValueError(f"config.method={name!r}: flash_jax/methods/{name}.py is not a method")
    return module.make
