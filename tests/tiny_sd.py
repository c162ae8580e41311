"""Tiny Stable-Diffusion-shaped diffusers pipeline folders, written at test time (no download).

`write_pipeline(folder, kind)` saves random-weight PyTorch models (diffusers `UNet2DConditionModel`,
`AutoencoderKL`, transformers `CLIPTextModel` / `CLIPTextModelWithProjection`) and a tiny CLIP BPE
tokenizer in the diffusers layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, and for "sdxl"
`text_encoder_2/`, `tokenizer_2/`), and returns the architecture dicts for `config.model`.
Needs torch, diffusers and transformers (the test extras).
"""

from __future__ import annotations

import json
from pathlib import Path

from flash_jax.models.text import _bytes_to_unicode

LENGTH = 16  # tokenizer model_max_length = text max_position_embeddings
IMAGE_SIZE = 16  # pixels; the tiny VAE downsamples 2x -> 8x8 latents
WORDS = ("a", "red", "blue", "cat", "dog", "on", "mat", "photo", "of", "the")


def bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE with whole-word merges for `WORDS`: bytes, bytes + `</w>`,
    one token per merge, then `<|startoftext|>`, `<|endoftext|>` (the largest id, as in CLIP)."""
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        if len(word) == 1:
            continue
        left = word[0]
        for i, ch in enumerate(word[1:], 1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens = [*dict.fromkeys(tokens), "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, pad_token: str) -> int:
    """A diffusers `tokenizer/` folder; returns the vocabulary size."""
    vocab, merges = bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": pad_token,
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": LENGTH, "tokenizer_class": "CLIPTokenizer"})
    )
    return len(vocab)


def model_dicts(kind: str = "sd15") -> dict[str, dict]:
    """`config.model` architecture dicts of the tiny `kind` ("sd15", "sd21" or "sdxl")."""
    vocab = len(bpe()[0])
    text = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=LENGTH,
        hidden_act="quick_gelu" if kind == "sd15" else "gelu",
        projection_dim=32,
        eos_token_id=2,  # legacy: pool at the largest id, like the SD checkpoints
        model_type="clip_text_model",
    )
    vae = dict(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.5,
    )
    unet = dict(
        sample_size=IMAGE_SIZE // 2,
        block_out_channels=[16, 32],
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    )
    out = {"unet": unet, "text": text, "autoencoder": vae}
    if kind == "sd21":
        unet.update(use_linear_projection=True, upcast_attention=True, attention_head_dim=[2, 4])
    if kind == "sdxl":
        text_2 = dict(text, hidden_size=48, intermediate_size=96, projection_dim=24)
        unet.update(
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            cross_attention_dim=32 + 48,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8,
        )
        out["text_2"] = text_2
    return out


def write_pipeline(folder: Path, kind: str = "sd15", seed: int = 0) -> dict[str, dict]:
    """Writes the tiny `kind` pipeline folder (random weights from `seed`); returns
    `model_dicts(kind)`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dicts = model_dicts(kind)
    torch.manual_seed(seed)
    UNet2DConditionModel(**dicts["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL(**dicts["autoencoder"]).save_pretrained(folder / "vae")
    clip = lambda d: CLIPTextConfig(**{k: v for k, v in d.items() if k != "model_type"})  # noqa: E731
    CLIPTextModel(clip(dicts["text"])).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", "<|endoftext|>" if kind != "sd21" else "!")
    if kind == "sdxl":
        CLIPTextModelWithProjection(clip(dicts["text_2"])).save_pretrained(
            folder / "text_encoder_2"
        )
        write_tokenizer(folder / "tokenizer_2", "!")
    return dicts
