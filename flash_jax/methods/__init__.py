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
      logical_axes: `() -> tree` of the models' abstract parameters with kernels boxed by their
        logical axis names (e.g. `pipeline.T2I.logical_axes()`), or None. Parameters, optimizer
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
    logical_axes: Callable[[], PyTree] | None = None


def get(name: str) -> Callable[[Any], Method]:
    """`make` of the method module `flash_jax.methods.<name>`; a clear error for unknown names."""
    try:
        module = importlib.import_module(f"flash_jax.methods.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"flash_jax.methods.{name}":
            raise
        raise ValueError(f"config.method={name!r}: no module flash_jax/methods/{name}.py") from None
    return module.make
