"""The text-to-image model as pure functions: text encoder + UNet + autoencoder + schedule.

Every method that trains or samples a latent diffusion model (teacher training, Imagine Flash, the
baselines) builds one `T2I` from `config.model` / `config.schedule` and calls these functions with
explicit parameter pytrees: `params = {"unet": ..., "text": ...}` and the VAE's params separately
(it is always frozen while a diffusion model trains).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from flash_jax import diffusion, sampling, weights
from flash_jax.data.tokenizer import WordTokenizer
from flash_jax.models import autoencoder, text, unet

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T2I:
    """Static description of a latent text-to-image diffusion model (hashable: jit-static)."""

    unet: unet.UNetConfig
    text: text.CLIPTextConfig
    autoencoder: autoencoder.AutoencoderConfig
    schedule: diffusion.Schedule = dataclasses.field(compare=False)
    max_length: int = 24

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> T2I:
        """From `config.model.{unet, text, autoencoder}` (diffusers/transformers dicts) and
        `config.schedule` (make_schedule kwargs)."""
        text_cfg = text.CLIPTextConfig.from_transformers(config.model.text.to_dict())
        return cls(
            unet=unet.UNetConfig.from_diffusers(config.model.unet.to_dict()),
            text=text_cfg,
            autoencoder=autoencoder.AutoencoderConfig.from_diffusers(
                config.model.autoencoder.to_dict()
            ),
            schedule=diffusion.make_schedule(**config.schedule.to_dict()),
            max_length=text_cfg.max_position_embeddings,
        )

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(max_length=self.max_length)

    def init(self, rng: Array) -> dict[str, Any]:
        """Fresh `{"unet", "text"}` params."""
        k_unet, k_text = jax.random.split(rng)
        return {
            "unet": unet.init_params(self.unet, k_unet),
            "text": text.init_params(self.text, k_text),
        }

    def logical_axes(self) -> dict[str, Any]:
        """`{"unet", "text", "vae"}` abstract parameter trees whose kernels are boxed with their
        logical axis names (`nn.LogicallyPartitioned` of ShapeDtypeStructs): the annotations
        `parallel.tree_shardings` shards parameters, optimizer state and frozen models by."""
        rng = jax.random.PRNGKey(0)
        ids = jnp.zeros((1, self.text.max_position_embeddings), jnp.int32)
        side = self.autoencoder.downsample_factor
        image = jnp.zeros((1, side, side, self.autoencoder.in_channels), jnp.float32)
        boxed = {
            "unet": lambda: unet.UNet(self.unet).init(rng, **unet.dummy_inputs(self.unet)),
            "text": lambda: text.CLIPTextModel(self.text).init(rng, ids),
            "vae": lambda: autoencoder.AutoencoderKL(self.autoencoder).init(rng, image),
        }
        return {k: jax.eval_shape(f)["params"] for k, f in boxed.items()}

    def check(self, params: Any, source: str) -> Any:
        """`params` (`{"unet", "text"}` or a subset), after checking every name and shape against
        this model: a checkpoint of another configuration is an error naming the tensors."""
        expected = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        expected = {k: v for k, v in expected.items() if k in params}
        weights.check_params_match(params, expected, f"{source} (for this config's model)")
        return params

    def encode_text(self, text_params: Any, tokens: Array) -> Array:
        """Token ids `(B, L)` -> encoder hidden states `(B, L, D)`."""
        return self.encode_text_pooled(text_params, tokens)[0]

    def encode_text_pooled(self, text_params: Any, tokens: Array) -> tuple[Array, Array]:
        """Token ids `(B, L)` -> (hidden states `(B, L, D)`, pooled at <eos> `(B, D)`)."""
        out = text.CLIPTextModel(self.text).apply({"params": text_params}, tokens)
        return out["last_hidden_state"], out["pooler_output"]

    def apply_unet(self, unet_params: Any, x: Array, t: Array, context: Array, **kw) -> Array:
        """Model output (ε / v / x0 per the schedule) for latents `x` (B, h, w, c) at times `t`."""
        return unet.UNet(self.unet).apply({"params": unet_params}, x, t, context, **kw)

    def to_latents(self, vae_params: Any, images: Array, key: Array | None = None) -> Array:
        """uint8 images `(B, H, W, 3)` -> diffusion latents `(B, H/f, W/f, c)`."""
        x = images.astype(jnp.float32) / 127.5 - 1.0
        return autoencoder.images_to_latents(vae_params, self.autoencoder, x, key)

    def to_images(self, vae_params: Any, latents: Array) -> Array:
        """Diffusion latents -> uint8 images `(B, H, W, 3)`."""
        x = autoencoder.latents_to_images(vae_params, self.autoencoder, latents)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def latent_shape(self, batch: int, image_size: int) -> tuple[int, int, int, int]:
        side = image_size // self.autoencoder.downsample_factor
        return (batch, side, side, self.autoencoder.latent_channels)

    def generate(
        self,
        params: Any,
        vae_params: Any,
        tokens: Array,
        uncond_tokens: Array,
        x_T: Array,
        config: sampling.SamplerConfig,
    ) -> Array:
        """Samples latents from noise `x_T` for prompts `tokens` and decodes them: uint8 images.

        Traceable (call inside jit). `uncond_tokens` is the empty prompt, used when
        `config.guidance_scale != 1`.
        """
        cond = self.encode_text(params["text"], tokens)
        uncond = (
            self.encode_text(params["text"], uncond_tokens) if config.guidance_scale != 1 else None
        )
        steps = dataclasses.asdict(sampling.plan(self.schedule, config))
        latents, _ = sampling.run_plan(
            self.apply_unet,
            params["unet"],
            x_T,
            steps,
            cond,
            uncond,
            config,
            self.schedule.prediction_type,
        )
        return self.to_images(vae_params, latents)
