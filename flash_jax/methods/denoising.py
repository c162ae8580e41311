"""The diffusion loss: trains a text-to-image teacher (UNet + text encoder) on frozen-VAE latents.

config reads: model.*, schedule.*, cfg_dropout (probability of the empty prompt, for CFG),
snr_gamma (optional; > 0 weights the loss by min-SNR-γ, `diffusion.min_snr_weight`), init_from
(optional: a teacher run or `.msgpack` to start from, e.g. to continue it on another schedule),
autoencoder_workdir (where the frozen VAE was trained; or model.pretrained), sample.* (the sampler
of the grids and of `generate`, which evaluation calls with its own step counts). Cached latents in
the batch (flash_jax/data/cache.py) replace the VAE encoder; the text encoder is trained here, so it
always encodes the batch's tokens (cached embeddings are unused).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from flash_jax import diffusion, frozen, sampling, t2i
from flash_jax.methods import Method, common
from flash_jax.t2i import T2I
from flash_jax.train import checkpoint


def diffusion_target(x0, noise, alpha, sigma, prediction_type: str) -> jax.Array:
    """What a model of `prediction_type` must output for x_t = α·x0 + σ·ε."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return diffusion.v_target(x0, noise, alpha, sigma)
    return x0


def sampler_config(config: ml_collections.ConfigDict) -> sampling.SamplerConfig:
    return sampling.SamplerConfig(**config.to_dict())


def make(config: ml_collections.ConfigDict) -> Method:
    model = T2I.from_config(config)
    tokenizer = model.tokenizer()
    empty_tokens = tokenizer([""])[0]
    schedule = model.schedule
    grid_sampler = sampler_config(config.sample)
    snr_gamma = float(config.get("snr_gamma", 0.0))

    prepare_batch = functools.partial(t2i.prepare_batch, tokenizer=tokenizer, model=model)
    init_from = config.get("init_from", "")

    @functools.cache  # init is traced for shapes, then run: read and check the file once
    def loaded_params() -> dict[str, Any]:
        params = checkpoint.load_params(init_from)
        missing = {"unet", "text"} - set(params)
        if missing:
            raise ValueError(f"config.init_from={init_from} has no {sorted(missing)} parameters")
        return model.check(params, f"config.init_from={init_from}")

    def init(rng: jax.Array) -> dict[str, Any]:
        return loaded_params() if init_from else model.init(rng)

    def load_frozen() -> dict[str, Any]:
        return {"vae": frozen.load_autoencoder(config, model)}

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        del disc_params
        k_lat, k_t, k_noise, k_drop = jax.random.split(rng, 4)
        x0 = model.batch_latents(frozen["vae"], batch, k_lat)
        b = x0.shape[0]
        tokens = batch["tokens"]
        drop = jax.random.bernoulli(k_drop, config.cfg_dropout, (b,) + (1,) * (tokens.ndim - 1))
        tokens = jnp.where(drop, empty_tokens[None], tokens)
        context = model.encode_text(params["text"], tokens)
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
        alpha, sigma = (a.reshape(b, 1, 1, 1) for a in schedule.alpha_sigma(t))
        noise = jax.random.normal(k_noise, x0.shape)
        x_t = diffusion.add_noise(x0, noise, alpha, sigma)
        out = model.apply_unet(params["unet"], x_t, t.astype(jnp.float32), context)
        target = diffusion_target(x0, noise, alpha, sigma, schedule.prediction_type)
        per_example = jnp.mean((out - target) ** 2, axis=(1, 2, 3))
        if snr_gamma > 0:
            weight = diffusion.min_snr_weight(
                alpha[:, 0, 0, 0], sigma[:, 0, 0, 0], snr_gamma, schedule.prediction_type
            )
            return jnp.mean(weight * per_example), {"unweighted_loss": jnp.mean(per_example)}
        return jnp.mean(per_example), {}

    def generate(params, frozen, tokens, x_T, rng, num_steps: int):
        """The teacher sampled with `config.sample` (CFG included) at `num_steps` steps."""
        uncond = jnp.broadcast_to(empty_tokens, tokens.shape)
        sampler = dataclasses.replace(grid_sampler, num_steps=num_steps)
        return model.generate(params, frozen["vae"], tokens, uncond, x_T, sampler, rng)

    return Method(
        init=init,
        load_frozen=load_frozen,
        generator_loss=generator_loss,
        prepare_batch=prepare_batch,
        sample=common.grid_sample(model, generate, grid_sampler.num_steps),
        generate=generate,
        logical_axes=model.logical_axes,
    )
