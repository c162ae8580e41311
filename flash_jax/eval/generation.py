"""Sampling generators for evaluation: the same prompts from the same initial noise for every
generator (image i of seed s starts from `normal(fold_in(PRNGKey(s), i))`), sharded over the
devices: in-memory UNet params with a sampler (`Entry`, `generate`) or a trained run sampled by
its method's own `Method.generate` (`Generator`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flash_jax import methods, parallel, sampling
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint


@dataclasses.dataclass(frozen=True)
class Entry:
    """One generator to evaluate: a UNet's params and how to sample from it."""

    name: str
    unet_params: Any
    sampler: sampling.SamplerConfig


def nfe(num_steps: int, guidance_scale: float) -> int:
    """Network evaluations per image: 2 per step with CFG."""
    return num_steps * (2 if guidance_scale != 1.0 else 1)


def initial_noise(seed: int, start: int, count: int, latent_shape: Sequence[int]) -> jax.Array:
    """x_T `(count, *latent_shape)` of images `start .. start+count−1` for `seed`: image i starts
    from `normal(fold_in(PRNGKey(seed), i))`, whatever the batching."""
    key = jax.random.PRNGKey(seed)
    indices = jnp.arange(start, start + count)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), latent_shape))(indices)


def generate_batched(
    generate_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    params: Any,
    tokens: np.ndarray,
    latent_shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images `(N, H, W, 3)` of `generate_fn(params, tokens, x_T, rng)` over token ids
    `(N, L)` in batches, with `initial_noise(seed, ...)`; `rng` (stochastic samplers' noise)
    depends on (seed, batch start), so those samplers also depend on `batch_size`.

    Each batch is split over this process's devices (`parallel.local_batch_mesh`: the most that
    divide it) with `params` replicated on them: the images are those of one device, up to float
    summation order (a 2-core CPU as two devices samples 1.6× faster: docs/performance.md).
    """
    sampler_key = jax.random.fold_in(jax.random.PRNGKey(seed), 2**31 - 1)
    placed: dict[int, Any] = {}  # params replicated, per mesh size
    out = []
    for start in range(0, len(tokens), batch_size):
        tok = tokens[start : start + batch_size]
        mesh = parallel.local_batch_mesh(len(tok))
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        if mesh.size not in placed:
            placed[mesh.size] = jax.device_put(params, replicated)
        x_T = jax.device_put(initial_noise(seed, start, len(tok), latent_shape), rows)
        rng = jax.device_put(jax.random.fold_in(sampler_key, start), replicated)
        tok = jax.device_put(np.asarray(tok), rows)
        out.append(np.asarray(generate_fn(placed[mesh.size], tok, x_T, rng)))
    return np.concatenate(out)


def generate(
    model: T2I,
    unet_params: Any,
    text_params: Any,
    vae_params: Any,
    tokens: np.ndarray,
    sampler: sampling.SamplerConfig,
    image_size: int,
    seed: int = 0,
    batch_size: int = 50,
) -> np.ndarray:
    """uint8 images `(N, H, W, 3)` for token ids `(N, L)`; image i's noise depends on (seed, i)."""
    empty = model.tokenizer()([""])[0]

    @jax.jit
    def run(unet, text, vae, tok, x_T, rng):
        uncond = jnp.broadcast_to(empty, tok.shape)
        return model.generate({"unet": unet, "text": text}, vae, tok, uncond, x_T, sampler, rng)

    def generate_fn(params, tok, x_T, rng):  # params are jit arguments, never baked in
        return run(*params, tok, x_T, rng)

    shape = model.latent_shape(1, image_size)[1:]
    params = (unet_params, text_params, vae_params)
    return generate_batched(generate_fn, params, tokens, shape, seed, batch_size)


@dataclasses.dataclass(frozen=True)
class Generator:
    """A trained run ready to sample: its config, `Method`, frozen models and (EMA) params."""

    config: ml_collections.ConfigDict
    method: methods.Method
    frozen: Any
    params: Any

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, workdir: str | Path) -> Generator:
        """The method of `config`, its frozen models, and the params of `workdir` (a run
        directory: the newest checkpoint's EMA params; or a params file)."""
        method = methods.get(config.method)(config)
        if method.generate is None:
            raise ValueError(f"config.method={config.method!r} has no generate(): cannot sample")
        return cls(config, method, method.load_frozen(), checkpoint.load_params(workdir))

    @functools.cached_property
    def _generate_jit(self) -> Callable:
        return jax.jit(self.method.generate, static_argnums=5)

    def nfe(self, steps: int) -> int:
        """Network calls per image: 2 per step when the run's sampler uses CFG (a teacher)."""
        sample = self.config.get("sample")
        return nfe(steps, sample.get("guidance_scale", 1.0) if sample is not None else 1.0)

    def images(
        self, captions: Sequence[str], steps: int, seed: int = 0, batch_size: int = 50
    ) -> np.ndarray:
        """uint8 images `(N, H, W, 3)` for the captions with `initial_noise(seed, ...)`."""
        model = T2I.from_config(self.config)
        tokens = model.tokenizer()(list(captions))
        shape = model.latent_shape(1, self.config.data.image_size)[1:]
        fn = functools.partial(_call_generate, self._generate_jit, steps)
        return generate_batched(fn, (self.params, self.frozen), tokens, shape, seed, batch_size)


def _call_generate(generate_jit, steps, params_and_frozen, tokens, x_T, rng):
    # params and frozen models go in as jit arguments (never baked into the program)
    return generate_jit(*params_and_frozen, tokens, x_T, rng, steps)
