"""CLIP text transformer (the SD1.x / SD2.x / SDXL text encoders) and a tokenizer adapter.

Numerically the same as transformers 5 `CLIPTextModel` / `CLIPTextModelWithProjection` (PyTorch):
pre-LN causal transformer, `quick_gelu` or `gelu` MLP, final LayerNorm, pooling at the EOS token.
Submodules carry the transformers names (`text_model/encoder/layers_3/self_attn/q_proj`, ...), so
`flash_jax.weights.clip_text_from_transformers` maps weights by name.

Shapes: token ids `(B, L)` int32 with `L <= max_position_embeddings` (77 for SD); hidden states
`(B, L, D)`; pooled `(B, D)`; projected text embeddings `(B, P)`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Activations transformers' CLIP configs use (`ACT2FN` names).
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers keys that do not change the inference forward pass (bookkeeping, generation and
# training-only settings); accepted and ignored by `CLIPTextConfig.from_transformers`.
_IGNORED_KEYS = frozenset(
    """
    _name_or_path _attn_implementation_autoset add_cross_attention architectures bad_words_ids
    begin_suppress_tokens bos_token_id chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample dtype early_stopping
    encoder_no_repeat_ngram_size exponential_decay_length_penalty finetuning_task
    forced_bos_token_id forced_eos_token_id gradient_checkpointing id2label initializer_factor
    initializer_range is_decoder is_encoder_decoder label2id length_penalty max_length min_length
    model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id
    suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder
    tie_word_embeddings tokenizer_class top_k top_p torch_dtype torchscript transformers_version
    typical_p use_bfloat16
    """.split()
)
_ZERO_ONLY_KEYS = ("attention_dropout", "dropout")  # no dropout here: frozen-encoder inference


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text encoder hyper-parameters; defaults are transformers 5 `CLIPTextConfig`'s."""

    vocab_size: int = 49408  # token embedding rows
    hidden_size: int = 512  # D
    intermediate_size: int = 2048  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # longest token sequence
    hidden_act: str = "quick_gelu"  # one of _ACTIVATIONS
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # P, used only with `with_projection`
    # EOS id for pooling; 2 is transformers' legacy value meaning "pool at argmax(input_ids)".
    eos_token_id: int = 49407
    dtype: Dtype = jnp.float32  # compute dtype
    param_dtype: Dtype = jnp.float32  # parameter dtype
    remat: bool = False  # rematerialise each encoder layer in the backward pass

    def __post_init__(self):
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "projection_dim",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{key} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {sorted(_ACTIVATIONS)})"
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(
                f"CLIPTextConfig.eos_token_id must be an int, got {self.eos_token_id!r}"
            )

    @classmethod
    def from_transformers(cls, config_dict: Mapping[str, Any], **overrides: Any) -> CLIPTextConfig:
        """From a transformers `CLIPTextConfig` dict (a text encoder's `config.json`).

        Args:
          config_dict: the dict; missing keys take transformers' defaults. Keys that do not affect
            inference (ids, generation, init scales) are ignored; any other unknown key, a nonzero
            dropout, or a whole `CLIPConfig` (model_type "clip") is a ValueError naming the key.
          **overrides: flash-jax knobs (`dtype`, `param_dtype`, `remat`) or any field.
        """
        model_type = config_dict.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            hint = " (pass config_dict['text_config'])" if "text_config" in config_dict else ""
            raise ValueError(f"model_type {model_type!r} is not a CLIP text model{hint}")
        fields = {f.name for f in dataclasses.fields(cls)}
        knobs = {"dtype", "param_dtype", "remat"}
        kwargs = {}
        for key, value in config_dict.items():
            if key in fields and key not in knobs:
                kwargs[key] = value
            elif key in _ZERO_ONLY_KEYS:
                if value:
                    raise ValueError(
                        f"config key {key!r}={value!r} is not supported: this CLIP text encoder "
                        "has no dropout (use 0.0)"
                    )
            elif key not in _IGNORED_KEYS:
                raise ValueError(f"unsupported CLIP text config key {key!r} (value {value!r})")
        for key in overrides:
            if key not in fields:
                raise ValueError(f"unknown CLIPTextConfig override {key!r}")
        return cls(**{**kwargs, **overrides})


def _dense(
    features: int, axes: tuple[str | None, str | None], std: float, cfg, name: str, bias=True
):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        name=name,
    )


def _layer_norm(cfg: CLIPTextConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        use_fast_variance=False,
        name=name,
    )


def _constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class CLIPTextEmbeddings(nn.Module):
    """Token + learned absolute position embeddings: ids `(B, L)` -> `(B, L, D)`."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        cfg = self.config
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        embed = lambda n, axes, name: nn.Embed(  # noqa: E731
            n,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
            name=name,
        )
        tokens = embed(cfg.vocab_size, ("vocab", "embed"), "token_embedding")(input_ids)
        positions = embed(cfg.max_position_embeddings, (None, "embed"), "position_embedding")(
            jnp.arange(length)
        )
        return _constrain(tokens + positions[None])


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a causal (and optional key padding) mask, `(B, L, D)`."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        cfg = self.config
        b, length, d = x.shape
        heads = cfg.num_attention_heads
        std_in = d**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5
        proj = lambda name: _dense(d, ("embed", "heads"), std_in, cfg, name)(x).reshape(  # noqa: E731
            b, length, heads, d // heads
        )
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        # Softmax runs in float32 whatever the compute dtype (like transformers).
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)
        return _dense(d, ("heads", "embed"), d**-0.5, cfg, "out_proj")(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2, `(B, L, D) -> (B, L, D)`."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d = cfg.hidden_size
        x = _dense(cfg.intermediate_size, ("embed", "mlp"), (2 * d) ** -0.5, cfg, "fc1")(x)
        x = _ACTIVATIONS[cfg.hidden_act](x)
        std_out = d**-0.5 * (2 * cfg.num_hidden_layers) ** -0.5
        return _dense(d, ("mlp", "embed"), std_out, cfg, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        x = x + CLIPAttention(self.config, name="self_attn")(
            _layer_norm(self.config, "layer_norm1")(x), mask
        )
        x = x + CLIPMLP(self.config, name="mlp")(_layer_norm(self.config, "layer_norm2")(x))
        return _constrain(x)


class CLIPEncoder(nn.Module):
    """The layer stack; returns the input and every layer's output, `num_hidden_layers + 1` arrays."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, ...]:
        layer_cls = nn.remat(CLIPEncoderLayer) if self.config.remat else CLIPEncoderLayer
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(layer_cls(self.config, name=f"layers_{i}")(states[-1], mask))
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """transformers' `CLIPTextModel` body (`text_model`): embeddings, encoder, final LN, pooling."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        cfg = self.config
        mask = None
        if attention_mask is not None:  # (B, L) 1 = attend, 0 = padding -> (B, 1, 1, L) keys
            mask = attention_mask.astype(bool)[:, None, None, :]
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        hidden_states = CLIPEncoder(cfg, name="encoder")(x, mask)
        last = _layer_norm(cfg, "final_layer_norm")(hidden_states[-1])
        if cfg.eos_token_id == 2:  # transformers' legacy rule: EOS is the largest id
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of eos_token_id (0 if absent, like transformers)
            eos_pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPTextModel(nn.Module):
    """CLIP text encoder; with `with_projection`, transformers' `CLIPTextModelWithProjection`.

    Call with `input_ids` `(B, L)` int32 and optionally `attention_mask` `(B, L)` (1 = token,
    0 = padding; SD pipelines pass none and rely on the causal mask). Returns a dict:
      last_hidden_state: `(B, L, D)`, after the final LayerNorm.
      hidden_states: tuple of `num_hidden_layers + 1` arrays `(B, L, D)`: the embeddings and every
        layer's output before the final LayerNorm (transformers' `output_hidden_states=True`);
        SD2-style "penultimate layer" conditioning (SDXL) is `hidden_states[-2]`.
      pooler_output: `(B, D)`, `last_hidden_state` at the EOS position.
      text_embeds: `(B, P)`, `text_projection(pooler_output)` (only with `with_projection`).
    """

    config: CLIPTextConfig
    with_projection: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> dict[str, Any]:
        out = CLIPTextTransformer(self.config, name="text_model")(input_ids, attention_mask)
        if self.with_projection:
            cfg = self.config
            out["text_embeds"] = _dense(
                cfg.projection_dim,
                ("embed", None),
                cfg.hidden_size**-0.5,
                cfg,
                "text_projection",
                bias=False,
            )(out["pooler_output"])
        return out


def init_params(
    config: CLIPTextConfig, rng: Array, with_projection: bool = False
) -> dict[str, Any]:
    """Random parameters (transformers' init scales) as a plain nested dict, unboxed.

    For sharded init use `CLIPTextModel(...).init` under `jax.jit(out_shardings=...)` directly.
    """
    model = CLIPTextModel(config, with_projection=with_projection)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    variables = jax.jit(model.init)(rng, ids)
    return nn.meta.unbox(variables["params"])


# ---------------------------------------------------------------------------------------------
# Tokenizer adapter (needs `transformers`, imported lazily: only the tokenizer uses it).


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table used by byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_bpe_from_open_clip(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from open_clip's `bpe_simple_vocab_16e6.txt.gz` (CLIP's BPE file).

    Returns:
      `(vocab, merges)` equal to the `vocab.json` / `merges.txt` of the HF CLIP tokenizers
      (49408 tokens for the full file): bytes, bytes + `</w>`, one token per merge, then
      `<|startoftext|>` and `<|endoftext|>`.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line is a version header; CLIP keeps 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: malformed merge line {' '.join(bad[0])!r}")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split()) for line in lines if line.strip()]  # type: ignore[misc]


class CLIPTokenizerAdapter:
    """Text -> padded token ids for the CLIP text encoder, with the Stable Diffusion convention.

    Every prompt becomes `<|startoftext|> tokens <|endoftext|>`, truncated to `max_length` (the EOS
    is kept) and padded to exactly `max_length` with the pad token (`<|endoftext|>` for SD1.x/SDXL's
    first encoder, `!` for SD2.x / SDXL's second). Wraps a transformers `CLIPTokenizer`.
    """

    def __init__(self, tokenizer: Any, max_length: int = 77):
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_vocab(
        cls,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        max_length: int = 77,
        pad_token: str = "<|endoftext|>",
    ) -> CLIPTokenizerAdapter:
        """From an in-memory vocabulary `{token: id}` and BPE merges `[(left, right), ...]`."""
        try:
            from transformers import CLIPTokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError("the CLIP tokenizer adapter needs `transformers`") from e
        if pad_token not in vocab:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        # Positional vocab/merges: transformers 5 ignores `vocab_file=`/`merges_file=` keywords.
        tokenizer = CLIPTokenizer(dict(vocab), [tuple(m) for m in merges], pad_token=pad_token)
        return cls(tokenizer, max_length)

    @classmethod
    def from_files(
        cls,
        vocab_file: str | Path,
        merges_file: str | Path,
        *,
        max_length: int = 77,
        pad_token: str = "<|endoftext|>",
    ) -> CLIPTokenizerAdapter:
        """From `vocab.json` and `merges.txt` (a diffusers `tokenizer/` folder's files)."""
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        return cls.from_vocab(
            vocab, _read_merges(Path(merges_file)), max_length=max_length, pad_token=pad_token
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizerAdapter:
        """From a diffusers/transformers tokenizer folder: `vocab.json`, `merges.txt` and, if
        present, the pad token and `model_max_length` in `special_tokens_map.json` /
        `tokenizer_config.json`."""
        path = Path(path)
        settings: dict[str, Any] = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (path / name).is_file():
                settings.update(json.loads((path / name).read_text(encoding="utf-8")))
        pad = settings.get("pad_token", "<|endoftext|>")
        if isinstance(pad, dict):
            pad = pad["content"]
        max_length = int(settings.get("model_max_length", 77))
        return cls.from_files(
            path / "vocab.json", path / "merges.txt", max_length=max_length, pad_token=pad
        )

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Token ids `(B, max_length)` int32 (B = 1 for a single string)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )["input_ids"]
        return np.asarray(ids, dtype=np.int32)
