"""Evaluate generators side by side on the Shapes testbed: FD-judge, alignment, colour statistics.

Every entry (a UNet's params and a sampler) generates images for the SAME prompts from the SAME
initial noise. Metrics per entry:
  fd_judge   Fréchet distance to the real images of the prompts in the judge's feature space (FID
             analog; lower is better);
  <category> alignment accuracy per caption category and `mean` over categories (CompBench analog);
  chroma / contrast   mean CIELAB chroma and RMS contrast (noise correction's effect);
  nfe        network evaluations per image (CFG counts two).
The real images' own row ("real") is the ceiling. Outputs: a Markdown table, JSON, and a grid of
samples (rows: entries, columns: prompts).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from flash_jax import sampling
from flash_jax.data import shapes
from flash_jax.eval import judge, metrics
from flash_jax.pipeline import T2I
from flash_jax.train import checkpoint

COLUMNS = ("fd_judge", *shapes.CATEGORIES, "mean", "chroma", "contrast", "nfe")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One generator to evaluate: a UNet's params and how to sample from it."""

    name: str
    unet_params: Any
    sampler: sampling.SamplerConfig


def nfe(sampler: sampling.SamplerConfig) -> int:
    """Network evaluations per image."""
    return sampler.num_steps * (2 if sampler.guidance_scale != 1.0 else 1)


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
    def run(unet, text, vae, tok, x_T):
        uncond = jnp.broadcast_to(empty, tok.shape)
        return model.generate({"unet": unet, "text": text}, vae, tok, uncond, x_T, sampler)

    out = []
    for start in range(0, len(tokens), batch_size):
        tok = jnp.asarray(tokens[start : start + batch_size])
        keys = [
            jax.random.fold_in(jax.random.PRNGKey(seed), i) for i in range(start, start + len(tok))
        ]
        shape = model.latent_shape(1, image_size)[1:]
        x_T = jnp.stack([jax.random.normal(k, shape) for k in keys])
        out.append(np.asarray(run(unet_params, text_params, vae_params, tok, x_T)))
    return np.concatenate(out)


def score(
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    judge_params: Any,
    judge_config: judge.JudgeConfig,
    real_features: np.ndarray,
) -> dict[str, float]:
    """Metrics of generated (or real) images against the prompts' labels and the real features."""
    out = judge.predict(judge_params, images, judge_config)
    table = metrics.alignment_table(judge.alignment(out, labels))
    row = {k: v["accuracy"] for k, v in table.items() if k != "all"}
    row["fd_judge"] = metrics.frechet_distance_from_features(out["features"], real_features)
    row |= {k: v for k, v in metrics.colour_statistics(images).items() if k != "lightness"}
    return row


def evaluate(
    model: T2I,
    entries: Sequence[Entry],
    text_params: Any,
    vae_params: Any,
    judge_workdir: str | Path,
    *,
    split: str = "eval",
    num_images: int = 500,
    data_seed: int = 0,
    seed: int = 0,
    image_size: int = 32,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray], list[str]]:
    """`(rows, images, captions)`: a metrics row and the generated images per entry (plus "real")."""
    if Path(judge_workdir).suffix == ".msgpack":  # shipped params (assets/)
        judge_params = checkpoint.load_params(judge_workdir)
        judge_config = judge.config_from_params(judge_params)
    else:
        judge_params, judge_config, _ = judge.load_judge(judge_workdir)
    real, labels = judge.real_examples(split, num_images, data_seed, image_size)
    captions = [str(c) for c in labels["caption"]]
    tokens = model.tokenizer()(captions)
    real_features = judge.predict(judge_params, real, judge_config)["features"]
    rows = {"real": score(real, labels, judge_params, judge_config, real_features)}
    images = {"real": real}
    for entry in tqdm(entries, desc="evaluate"):
        gen = generate(
            model,
            entry.unet_params,
            text_params,
            vae_params,
            tokens,
            entry.sampler,
            image_size,
            seed,
        )
        rows[entry.name] = score(gen, labels, judge_params, judge_config, real_features)
        rows[entry.name]["nfe"] = nfe(entry.sampler)
        images[entry.name] = gen
    return rows, images, captions


def sample_grid(
    images: dict[str, np.ndarray], captions: Sequence[str], num: int = 8, scale: int = 3
) -> Image.Image:
    """Rows = entries (labelled), columns = the first `num` prompts (captioned on top)."""
    names = list(images)
    num = min(num, len(captions))
    h, w = next(iter(images.values())).shape[1:3]
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=11)
    label_w, head_h = 150, 40
    sheet = Image.new("RGB", (label_w + num * (cw + 4), head_h + len(names) * (ch + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for j in range(num):
        words, lines = captions[j].split(), [""]
        for word in words:
            lines[-1] = f"{lines[-1]} {word}".strip()
            if draw.textlength(lines[-1], font=font) > cw:
                lines[-1] = lines[-1].rsplit(" ", 1)[0]
                lines.append(word)
        for k, text in enumerate(lines[:3]):
            draw.text((label_w + j * (cw + 4), 2 + 12 * k), text, fill="black", font=font)
    for i, name in enumerate(names):
        y = head_h + i * (ch + 4)
        draw.text((4, y + ch // 2 - 6), name, fill="black", font=font)
        for j in range(num):
            tile = Image.fromarray(images[name][j]).resize((cw, ch), Image.NEAREST)
            sheet.paste(tile, (label_w + j * (cw + 4), y))
    return sheet


def write_report(
    rows: dict[str, dict[str, float]],
    images: dict[str, np.ndarray],
    captions: Sequence[str],
    out_dir: str | Path,
) -> str:
    """Writes `results.md`, `results.json` and `samples.png` to `out_dir`; returns the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = metrics.markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows.values())])
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    sample_grid(images, captions).save(out_dir / "samples.png")
    return table
