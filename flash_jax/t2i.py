"""The text-to-image model as pure functions: text encoder(s) + UNet + autoencoder + schedule.

Every method that trains or samples a latent diffusion model (teacher training, Imagine Flash, the
baselines) builds one `T2I` from `config.model` / `config.schedule` and calls these functions with
explicit parameter pytrees: `params = {"unet": ..., "text": ...}` and the VAE's params separately
(it is always frozen while a diffusion model trains). SDXL has two text encoders:
`params["text"] = {"text_encoder": ..., "text_encoder_2": ...}`.

Conditioning. `encode_text_pooled` returns `(context, pooled)`: `context` is what the UNet takes —
the hidden states `(B, L, D)` for SD1.x/2.x and the testbed, and for SDXL the dict
`{"hidden_states": (B, L, 2048), "text_embeds": (B, 1280)}` (`apply_unet` adds the size
micro-conditioning `time_ids` from the latent size: original = target = the image size, no crop).
Samplers treat `context` as an opaque pytree.

Batches. A batch carries either raw data (`image` uint8 `(B, H, W, 3)`, `tokens`) or the cached
encodings written by `flash_jax.data.cache` (`latent_mean`, `latent_std` `(B, h, w, c)` in diffusion
space; `prompt_embeds` `(B, L, D)`, `pooled_prompt_embeds` `(B, P)`; plus `tokens`). Methods read
latents and conditioning through `batch_latents` / `conditioning`, which use the cache when it is
there and encode otherwise: that is the only place the two cases differ.

Frozen weights come from the testbed's checkpoints (`config.teacher_workdir`,
`config.autoencoder_workdir`; loaded by flash_jax/frozen.py) or, when `config.model.pretrained` names a diffusers pipeline folder (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, and for SDXL `text_encoder_2/`, `tokenizer_2/`), from that folder,
whose `config.json` files must describe exactly the architecture in `config.model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import diffusion, sampling, weights
from flash_jax.data.tokenizer import WordTokenizer
from flash_jax.models import autoencoder, text, unet

if TYPE_CHECKING:  # ml_collections is only a type here: GPU boxes without it can import this
    import ml_collections

Array = jax.Array
Tokenizer = Callable[[Sequence[str]], np.ndarray]

# Batch keys written by the latent cache (flash_jax/data/cache.py).
CACHE_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")

# `config.model` keys besides the architecture dicts, with their defaults.
MODEL_OPTIONS: dict[str, Any] = {
    "pretrained": "",  # diffusers pipeline folder with the weights (and the CLIP tokenizer)
    "variant": "",  # weight files to read there: "" (model.safetensors) or e.g. "fp16"
    "dtype": "float32",  # compute dtype of the UNet and text encoder(s) ("bfloat16" at scale)
    "remat": False,  # rematerialise UNet / text encoder blocks in the backward pass
    "force_zeros_for_empty_prompt": False,  # SDXL: the empty prompt's conditioning is zeros
    # UNet attention: "" (jax.nn.dot_product_attention's choice), "xla", "cudnn", or "per_head"
    # (one head at a time: faster on CPUs at long sequences, docs/performance.md)
    "attention_implementation": "",
}
_ARCHITECTURES = ("unet", "text", "text_2", "autoencoder")
_FLAX_KNOBS = ("dtype", "param_dtype", "remat", "attention_implementation")


class StackedTokenizer:
    """Several tokenizers over the same captions (SDXL's `tokenizer` and `tokenizer_2`): int32
    ids `(B, n, L)`, one row per tokenizer."""

    def __init__(self, tokenizers: Sequence[Tokenizer]):
        self.tokenizers = tuple(tokenizers)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        return np.stack([t(list(captions)) for t in self.tokenizers], axis=1)


def _architecture_diff(loaded: Any, expected: Any) -> list[str]:
    """Fields (not flax-only knobs) where two model configs differ, as `name: a != b`."""
    return [
        f"{f.name}: {getattr(loaded, f.name)!r} != {getattr(expected, f.name)!r}"
        for f in dataclasses.fields(expected)
        if f.name not in _FLAX_KNOBS and getattr(loaded, f.name) != getattr(expected, f.name)
    ]


def _knobs(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k) for k in _FLAX_KNOBS if hasattr(config, k)}


@dataclasses.dataclass(frozen=True)
class T2I:
    """Static description of a latent text-to-image diffusion model (hashable: jit-static)."""

    unet: unet.UNetConfig
    text: text.CLIPTextConfig
    autoencoder: autoencoder.AutoencoderConfig
    schedule: diffusion.Schedule = dataclasses.field(compare=False)
    max_length: int = 24
    text_2: text.CLIPTextConfig | None = None  # SDXL's CLIPTextModelWithProjection
    pretrained: str = ""  # see MODEL_OPTIONS
    variant: str = ""
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self):
        width = self.text.hidden_size + (self.text_2.hidden_size if self.text_2 else 0)
        if any(d != width for d in self.unet.cross_attention_dim):
            what = "text.hidden_size" + (" + text_2.hidden_size" if self.text_2 else "")
            raise ValueError(
                f"config.model.unet.cross_attention_dim={self.unet.cross_attention_dim} does not "
                f"match the text conditioning width {width} (config.model.{what})"
            )
        sdxl = self.unet.addition_embed_type == "text_time"
        if sdxl != (self.text_2 is not None):
            raise ValueError(
                "config.model.text_2 (SDXL's second text encoder) is needed exactly when "
                "config.model.unet.addition_embed_type='text_time'"
            )
        if sdxl:
            need = self.text_2.projection_dim + 6 * self.unet.addition_time_embed_dim
            if self.unet.projection_class_embeddings_input_dim != need:
                raise ValueError(
                    "config.model.unet.projection_class_embeddings_input_dim="
                    f"{self.unet.projection_class_embeddings_input_dim}, but text_2.projection_dim"
                    f" + 6 * addition_time_embed_dim = {need}"
                )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> T2I:
        """From `config.model.{unet, text, autoencoder[, text_2]}` (diffusers/transformers
        config.json dicts), the `MODEL_OPTIONS` keys of `config.model`, and `config.schedule`
        (make_schedule kwargs)."""
        m = config.model
        unknown = set(m.keys()) - set(_ARCHITECTURES) - set(MODEL_OPTIONS)
        if unknown:
            raise ValueError(
                f"config.model: unknown keys {sorted(unknown)} "
                f"(have {sorted(_ARCHITECTURES)} and {sorted(MODEL_OPTIONS)})"
            )
        opt = {k: m.get(k, default) for k, default in MODEL_OPTIONS.items()}
        dtype = jnp.dtype(opt["dtype"])
        knobs = dict(dtype=dtype, remat=bool(opt["remat"]))
        text_cfg = text.CLIPTextConfig.from_transformers(m.text.to_dict(), **knobs)
        text_2 = m.get("text_2")
        return cls(
            unet=unet.UNetConfig.from_diffusers(
                m.unet.to_dict(),
                attention_implementation=opt["attention_implementation"] or None,
                **knobs,
            ),
            text=text_cfg,
            autoencoder=autoencoder.AutoencoderConfig.from_diffusers(m.autoencoder.to_dict()),
            schedule=diffusion.make_schedule(**config.schedule.to_dict()),
            max_length=text_cfg.max_position_embeddings,
            text_2=text.CLIPTextConfig.from_transformers(text_2.to_dict(), **knobs)
            if text_2
            else None,
            pretrained=str(opt["pretrained"]),
            variant=str(opt["variant"]),
            force_zeros_for_empty_prompt=bool(opt["force_zeros_for_empty_prompt"]),
        )

    # ------------------------------------------------------------------------------ tokens

    def tokenizer(self) -> Tokenizer:
        """captions -> int32 ids `(B, L)` (`(B, 2, L)` for SDXL). The testbed's word tokenizer, or
        the CLIP BPE tokenizer(s) of the `pretrained` folder (`tokenizer/`, `tokenizer_2/`)."""
        if not self.pretrained:
            return WordTokenizer(max_length=self.max_length)
        folders = ["tokenizer", "tokenizer_2"] if self.text_2 else ["tokenizer"]
        tokenizers = []
        for folder, cfg in zip(folders, [self.text, self.text_2], strict=False):
            tok = text.CLIPTokenizerAdapter.from_folder(Path(self.pretrained) / folder)
            if tok.max_length != self.max_length:
                raise ValueError(
                    f"{self.pretrained}/{folder}: model_max_length {tok.max_length} != the text "
                    f"encoder's max_position_embeddings {self.max_length}"
                )
            if len(tok.tokenizer) > cfg.vocab_size:
                raise ValueError(
                    f"{self.pretrained}/{folder}: {len(tok.tokenizer)} tokens, but the text "
                    f"encoder has vocab_size {cfg.vocab_size}"
                )
            tokenizers.append(tok)
        return StackedTokenizer(tokenizers) if self.text_2 else tokenizers[0]

    # ------------------------------------------------------------------------------ params

    def init(self, rng: Array) -> dict[str, Any]:
        """Fresh `{"unet", "text"}` params."""
        k_unet, k_text, k_text_2 = jax.random.split(rng, 3)
        text_params = text.init_params(self.text, k_text)
        if self.text_2:
            text_params = {
                "text_encoder": text_params,
                "text_encoder_2": text.init_params(self.text_2, k_text_2, with_projection=True),
            }
        return {"unet": unet.init_params(self.unet, k_unet), "text": text_params}

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

    def load_pretrained(self, parts: Sequence[str] = ("unet", "text")) -> dict[str, Any]:
        """`{part: params}` for `parts` of "unet", "text", "vae", read from the diffusers folder
        `pretrained` (float32 params). Its config.json files must describe this model exactly;
        otherwise a ValueError lists every differing field.

        Raises:
          ValueError: no `pretrained` folder, or an architecture mismatch.
          weights.WeightsError: a missing, unexpected or mis-shaped tensor.
        """
        if not self.pretrained:
            raise ValueError("config.model.pretrained is empty: no diffusers folder to load")
        root = Path(self.pretrained)

        def checked(loaded_cfg, params, expected_cfg, folder):
            diff = _architecture_diff(loaded_cfg, expected_cfg)
            if diff:
                raise ValueError(
                    f"{root / folder}/config.json differs from config.model:\n  "
                    + "\n  ".join(diff)
                )
            return params

        def clip(folder, cfg):
            loaded, params = weights.clip_text_from_pretrained(
                root / folder, self.variant, **_knobs(cfg)
            )
            return checked(loaded, params, cfg, folder)

        out: dict[str, Any] = {}
        for part in parts:
            if part == "unet":
                loaded, params = weights.unet_from_pretrained(
                    root / "unet", self.variant, **_knobs(self.unet)
                )
                out["unet"] = checked(loaded, params, self.unet, "unet")
            elif part == "text":
                out["text"] = clip("text_encoder", self.text)
                if self.text_2:
                    out["text"] = {
                        "text_encoder": out["text"],
                        "text_encoder_2": clip("text_encoder_2", self.text_2),
                    }
            elif part == "vae":
                loaded, params = weights.autoencoder_from_pretrained(
                    root / "vae", self.variant, **_knobs(self.autoencoder)
                )
                out["vae"] = checked(loaded, params, self.autoencoder, "vae")
            else:
                raise ValueError(f"load_pretrained: unknown part {part!r} (unet, text, vae)")
        return out

    # ------------------------------------------------------------------------------ text

    def embed_prompts(self, text_params: Any, tokens: Array) -> tuple[Array, Array]:
        """Token ids -> `(prompt_embeds (B, L, D), pooled_prompt_embeds (B, P))`, as diffusers'
        pipelines compute them (what the latent cache stores).

        One encoder: the final hidden states and the EOS-pooled output. SDXL (`tokens` `(B, 2, L)`):
        the penultimate hidden states of both encoders concatenated (768 + 1280), pooled = the
        second encoder's projected `text_embeds` (1280).
        """
        if self.text_2 is None:
            out = text.CLIPTextModel(self.text).apply({"params": text_params}, tokens)
            return out["last_hidden_state"], out["pooler_output"]
        out_1 = text.CLIPTextModel(self.text).apply(
            {"params": text_params["text_encoder"]}, tokens[:, 0]
        )
        out_2 = text.CLIPTextModel(self.text_2, with_projection=True).apply(
            {"params": text_params["text_encoder_2"]}, tokens[:, 1]
        )
        hidden = jnp.concatenate([out_1["hidden_states"][-2], out_2["hidden_states"][-2]], -1)
        return hidden, out_2["text_embeds"]

    def unet_context(self, prompt_embeds: Array, pooled: Array) -> Any:
        """The UNet's conditioning from prompt embeddings: the embeddings, or SDXL's dict."""
        if self.text_2 is None:
            return prompt_embeds
        return {"hidden_states": prompt_embeds, "text_embeds": pooled}

    def encode_text_pooled(self, text_params: Any, tokens: Array) -> tuple[Any, Array]:
        """Token ids `(B, L)` (SDXL `(B, 2, L)`) -> (UNet context, pooled `(B, P)`)."""
        embeds, pooled = self.embed_prompts(text_params, tokens)
        return self.unet_context(embeds, pooled), pooled

    def encode_text(self, text_params: Any, tokens: Array) -> Any:
        """Token ids -> the UNet context (hidden states `(B, L, D)`, or SDXL's dict)."""
        return self.encode_text_pooled(text_params, tokens)[0]

    def conditioning(self, text_params: Any, batch: Mapping[str, Array]) -> tuple[Any, Array]:
        """(UNet context, pooled) of a batch: its cached `prompt_embeds` / `pooled_prompt_embeds`
        when present, else its `tokens` encoded with `text_params`."""
        if "prompt_embeds" in batch:
            pooled = batch["pooled_prompt_embeds"].astype(jnp.float32)
            return self.unet_context(batch["prompt_embeds"].astype(jnp.float32), pooled), pooled
        return self.encode_text_pooled(text_params, batch["tokens"])

    def uncond_conditioning(
        self, text_params: Any, empty_tokens: Array, batch_size: int
    ) -> tuple[Any, Array]:
        """(context, pooled) of the empty prompt (`empty_tokens`: its ids, `(L,)` or `(2, L)`),
        encoded once and broadcast to `batch_size`; zeros with `force_zeros_for_empty_prompt`."""
        if self.force_zeros_for_empty_prompt:
            embeds, pooled = jax.eval_shape(self.embed_prompts, text_params, empty_tokens[None])
            embeds, pooled = jnp.zeros(embeds.shape[1:]), jnp.zeros(pooled.shape[1:])
        else:
            embeds, pooled = (v[0] for v in self.embed_prompts(text_params, empty_tokens[None]))
        embeds = jnp.broadcast_to(embeds, (batch_size, *embeds.shape))
        pooled = jnp.broadcast_to(pooled, (batch_size, *pooled.shape))
        return self.unet_context(embeds, pooled), pooled

    # ------------------------------------------------------------------------------ UNet

    def time_ids(self, x: Array) -> Array:
        """SDXL micro-conditioning `(B, 6)` for latents `x`: (H, W, 0, 0, H, W) in pixels."""
        f = self.autoencoder.downsample_factor
        h, w = x.shape[1] * f, x.shape[2] * f
        return jnp.broadcast_to(jnp.array([h, w, 0, 0, h, w], jnp.float32), (x.shape[0], 6))

    def apply_unet(self, unet_params: Any, x: Array, t: Array, context: Any, **kw) -> Array:
        """Model output (ε / v / x0 per the schedule) for latents `x` (B, h, w, c) at times `t`;
        `context` as returned by `encode_text`."""
        if isinstance(context, Mapping):
            kw["added_cond_kwargs"] = {
                "text_embeds": context["text_embeds"],
                "time_ids": self.time_ids(x),
            }
            context = context["hidden_states"]
        return unet.UNet(self.unet).apply({"params": unet_params}, x, t, context, **kw)

    # ------------------------------------------------------------------------------ latents

    def latent_moments(self, vae_params: Any, images: Array) -> tuple[Array, Array]:
        """uint8 images `(B, H, W, 3)` -> the posterior's `(mean, std)` in diffusion space:
        `(mean_z − shift) · scale`, `std_z · scale`, each `(B, H/f, W/f, c)`."""
        x = images.astype(jnp.float32) / 127.5 - 1.0
        mean, logvar = autoencoder.encode(vae_params, self.autoencoder, x)
        cfg = self.autoencoder
        return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor, jnp.exp(
            0.5 * logvar
        ) * cfg.scaling_factor

    def to_latents(self, vae_params: Any, images: Array, key: Array | None = None) -> Array:
        """uint8 images `(B, H, W, 3)` -> diffusion latents `(B, H/f, W/f, c)`, sampled from the
        posterior with `key`, else its mean."""
        x = images.astype(jnp.float32) / 127.5 - 1.0
        return autoencoder.images_to_latents(vae_params, self.autoencoder, x, key)

    def batch_latents(
        self, vae_params: Any, batch: Mapping[str, Array], key: Array | None = None
    ) -> Array:
        """Clean latents of a batch: from its cached `latent_mean` / `latent_std` when present,
        else encoded from its `image`. With `key` both sample `mean + std · ε` with the same ε."""
        if "latent_mean" not in batch:
            return self.to_latents(vae_params, batch["image"], key)
        mean = batch["latent_mean"].astype(jnp.float32)
        if key is None:
            return mean
        std = batch["latent_std"].astype(jnp.float32)
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    def batch_latent_shape(self, batch: Mapping[str, Any]) -> tuple[int, int, int, int]:
        """Shape of the batch's latents (from the cache, or from its images' size)."""
        if "latent_mean" in batch:
            return tuple(batch["latent_mean"].shape)
        return self.latent_shape(batch["image"].shape[0], batch["image"].shape[1])

    def to_images(self, vae_params: Any, latents: Array) -> Array:
        """Diffusion latents -> uint8 images `(B, H, W, 3)`."""
        x = autoencoder.latents_to_images(vae_params, self.autoencoder, latents)
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    def latent_shape(self, batch: int, image_size: int) -> tuple[int, int, int, int]:
        side = image_size // self.autoencoder.downsample_factor
        return (batch, side, side, self.autoencoder.latent_channels)

    # ------------------------------------------------------------------------------ sampling

    def generate(
        self,
        params: Any,
        vae_params: Any,
        tokens: Array,
        uncond_tokens: Array,
        x_T: Array,
        config: sampling.SamplerConfig,
        rng: Array | None = None,
    ) -> Array:
        """Samples latents from noise `x_T` for prompts `tokens` and decodes them: uint8 images.

        Traceable (call inside jit). `uncond_tokens` (same shape as `tokens`) is the empty prompt,
        used when `config.guidance_scale != 1`; `rng` is needed by stochastic samplers (DDIM with
        eta > 0).
        """
        cond = self.encode_text(params["text"], tokens)
        uncond = None
        if config.guidance_scale != 1 and self.force_zeros_for_empty_prompt:
            uncond = self.uncond_conditioning(params["text"], uncond_tokens[0], tokens.shape[0])[0]
        elif config.guidance_scale != 1:
            uncond = self.encode_text(params["text"], uncond_tokens)
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
            rng,
        )
        return self.to_images(vae_params, latents)


# ------------------------------------------------------------------------------ host side


def check_cached(batch: Mapping[str, np.ndarray], model: T2I) -> None:
    """Raises ValueError, naming the key and the config field, when a cached batch was written for
    another model (latent channels, text length or width)."""
    problems = []
    if "latent_mean" in batch:
        c = batch["latent_mean"].shape[-1]
        if c != model.autoencoder.latent_channels:
            problems.append(
                f"latent_mean has {c} channels, config.model.autoencoder.latent_channels="
                f"{model.autoencoder.latent_channels}"
            )
    if "prompt_embeds" in batch:
        _, length, width = batch["prompt_embeds"].shape
        if (length, width) != (model.max_length, model.unet.cross_attention_dim[0]):
            problems.append(
                f"prompt_embeds is (L={length}, D={width}), the model needs (L={model.max_length}, "
                f"D={model.unet.cross_attention_dim[0]}: config.model.unet.cross_attention_dim)"
            )
        pooled = batch["pooled_prompt_embeds"].shape[-1]
        want = model.text_2.projection_dim if model.text_2 else model.text.hidden_size
        if pooled != want:
            problems.append(f"pooled_prompt_embeds has width {pooled}, the model's is {want}")
    if problems:
        raise ValueError(
            "the cached data was written for another model (rerun flash_jax.data.cache):\n  "
            + "\n  ".join(problems)
        )


def prepare_batch(
    raw: Mapping[str, Any], tokenizer: Tokenizer, model: T2I | None = None
) -> dict[str, np.ndarray]:
    """Host-side step input from a raw data batch: the image or cached arrays as they are, and
    `tokens` (stored ones, else the tokenized `caption`s). Non-array fields are dropped. With
    `model`, cached arrays are checked against it (`check_cached`)."""
    out = {k: np.asarray(raw[k]) for k in (*CACHE_KEYS, "image") if k in raw}
    if "tokens" in raw:
        out["tokens"] = np.asarray(raw["tokens"])
    else:
        out["tokens"] = tokenizer([str(c) for c in raw["caption"]])
    if model is not None:
        check_cached(out, model)
    return out
