"""Trains the AutoencoderKL of the latent space: L1 + L2 reconstruction + a small KL term.

config reads: model.autoencoder, kl_weight, decoder_noise (optional, default 0), init_from and
freeze_encoder (optional, default "" and False).

`decoder_noise` makes the decoder robust to the small latent errors a diffusion model makes: each
example's latent gets extra Gaussian noise of std u · decoder_noise · std(posterior means of the
batch), u ~ U(0, 1), before decoding. The std is measured on the batch (without gradient) so the
encoder cannot escape the noise by growing its latents. With the tiny KL weight alone the posterior
std is ~0.2 % of the latent std, and a decoder that never saw errors turns a diffusion model's
errors into speckle (docs/results.md, "A second trial: factor-2 latents").

`init_from` (a workdir or exported `.msgpack`) starts from a trained autoencoder's EMA parameters
instead of a random init. With `freeze_encoder` the encoder and `quant_conv` keep those values bit
for bit and only the decoder trains: the latent space, and so every teacher trained on it, stays
valid while the reconstructions improve. That needs `ema_decay = 0`: the EMA `d·e + (1 − d)·p` of a
constant `p` drifts from it by float rounding (~1e-6 relative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flash_jax import weights
from flash_jax.methods import Method
from flash_jax.models import autoencoder
from flash_jax.train import checkpoint

ENCODER_SIDE = ("encoder", "quant_conv")  # the parameters that define the latent space


def make(config: ml_collections.ConfigDict) -> Method:
    ae = autoencoder.AutoencoderConfig.from_diffusers(config.model.autoencoder.to_dict())
    noise = float(config.get("decoder_noise", 0.0))
    if noise < 0:
        raise ValueError(f"config.decoder_noise must be >= 0, got {noise}")
    init_from = config.get("init_from", "")
    freeze_encoder = bool(config.get("freeze_encoder", False))
    if freeze_encoder and not init_from:
        raise ValueError("config.freeze_encoder=True needs config.init_from (the trained encoder)")
    if freeze_encoder and config.ema_decay != 0:
        raise ValueError(
            f"config.freeze_encoder=True needs config.ema_decay=0, got {config.ema_decay}: the EMA "
            "would move the frozen encoder by float rounding"
        )

    @functools.cache  # init is traced for shapes, then run: read and check the file once
    def loaded_params():
        params = checkpoint.load_params(init_from)
        weights.check_params_match(
            params,
            weights.model_abstract("autoencoder", ae),
            f"config.init_from={init_from} (for config.model.autoencoder)",
        )
        return params

    def init(rng):
        return loaded_params() if init_from else autoencoder.init_params(ae, rng)

    def keep_encoder(params, new_params):
        return {k: params[k] if k in ENCODER_SIDE else v for k, v in new_params.items()}

    def prepare_batch(raw: dict) -> dict:
        return {"image": np.asarray(raw["image"])}

    def to_unit(images):
        return images.astype(jnp.float32) / 127.5 - 1.0

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        del frozen, disc_params
        k_post, k_level, k_noise = jax.random.split(rng, 3)
        x = to_unit(batch["image"])
        mean, logvar = autoencoder.encode(params, ae, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape)
        if noise:
            level = noise * jax.random.uniform(k_level, (z.shape[0], 1, 1, 1))
            scale = jax.lax.stop_gradient(jnp.std(mean))
            z = z + level * scale * jax.random.normal(k_noise, z.shape)
        recon = autoencoder.decode(params, ae, z)
        l1 = jnp.mean(jnp.abs(recon - x))
        l2 = jnp.mean((recon - x) ** 2)
        kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return l1 + l2 + config.kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}

    def sample(params, frozen, batch, rng):
        """Reconstructions (posterior mean) of the batch images."""
        del frozen, rng
        x = autoencoder.decode(
            params, ae, autoencoder.encode(params, ae, to_unit(batch["image"]))[0]
        )
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return Method(
        init=init,
        load_frozen=dict,
        generator_loss=generator_loss,
        prepare_batch=prepare_batch,
        sample=sample,
        post_update=keep_encoder if freeze_encoder else None,
        logical_axes=lambda: jax.eval_shape(
            autoencoder.AutoencoderKL(ae).init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, ae.downsample_factor, ae.downsample_factor, ae.in_channels)),
        )["params"],
    )
