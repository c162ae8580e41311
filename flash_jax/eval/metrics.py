"""Evaluation metrics: Fréchet distance in any feature space, alignment by category, colour statistics.

All functions here are host-side numpy (float64 where it matters) and do not depend on jax.

- `feature_statistics` + `frechet_distance`: FD between Gaussians fitted to two feature sets. With
  judge features (`flash_jax.eval.judge.features`) it is the testbed's "FD-judge" (the FID analog);
  with InceptionV3 pool features it is FID.
- `alignment_table`: per-category accuracy from `flash_jax.eval.judge.alignment` results.
- `colour_statistics`: mean chroma and RMS contrast (distillation tends to oversaturate or wash out).
- `seed_diversity`: how much the images of one prompt differ across initial-noise seeds.
- `markdown_table`: the tables the CLIs print.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(mu (F,), sigma (F, F))` float64: mean and unbiased covariance of `features` `(N, F)`."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigendecomposition;
    eigenvalues below 0 from rounding are clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^½ sigma2 sigma1^½)^½)

    computed in float64 through the SYMMETRIC form `sigma1^½ sigma2 sigma1^½` (which has the same
    eigenvalues as `sigma1 sigma2`), so only symmetric eigendecompositions are needed — stable for
    singular covariances, no scipy. Rounding can push a true 0 a hair below; the result is clipped
    at 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}"
        )
    root1 = _sqrt_psd(s1)
    middle = root1 @ s2 @ root1
    w = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(w, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt
    return float(max(fd, 0.0))


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FD between the Gaussians fitted to feature sets `a (N, F)` and `b (M, F)`."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def seed_diversity(features: np.ndarray) -> float:
    """Diversity across initial-noise seeds: `features` `(S >= 2, N, F)` holds the features of
    the images of N prompts, each drawn from S seeds. Returns the mean over prompts of the mean
    L2 distance between the S features of the same prompt (0: every seed gives the same image)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"features must be (S >= 2 seeds, N, F), got shape {x.shape}")
    i, j = np.triu_indices(x.shape[0], k=1)
    return float(np.linalg.norm(x[i] - x[j], axis=-1).mean())


# ------------------------------------------------------------------------------ alignment


def alignment_table(
    results: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
) -> dict[str, dict[str, float]]:
    """Per-category accuracy from one or several `judge.alignment` results (e.g. one per batch).

    Returns `{name: {"accuracy": float, "n": int}}` for every key of the results (the categories
    and "all"), plus `"mean"`: the unweighted mean over the categories that have records (the
    CompBench-style average). Accuracy is NaN for a category without records.
    """
    if isinstance(results, Mapping):
        results = [results]
    merged: dict[str, list[np.ndarray]] = {}
    for r in results:
        for k, v in r.items():
            merged.setdefault(k, []).append(np.asarray(v, bool).reshape(-1))
    table = {}
    for k, parts in merged.items():
        v = np.concatenate(parts)
        table[k] = {"accuracy": float(v.mean()) if v.size else float("nan"), "n": int(v.size)}
    per_cat = [v["accuracy"] for k, v in table.items() if k != "all" and v["n"] > 0]
    table["mean"] = {
        "accuracy": float(np.mean(per_cat)) if per_cat else float("nan"),
        "n": sum(v["n"] for k, v in table.items() if k != "all"),
    }
    return table


# ------------------------------------------------------------------------------ colour


# sRGB (D65) -> CIE XYZ, and the D65 white point (IEC 61966-2-1).
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE = _RGB_TO_XYZ.sum(1)


def srgb_to_lab(images: np.ndarray) -> np.ndarray:
    """CIELAB (D65) `(..., 3)` float64 [L* in 0..100, a*, b*] of sRGB uint8 `(..., 3)` images."""
    c = np.asarray(images, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ _RGB_TO_XYZ.T) / _WHITE
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    lightness = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([lightness, a, b], -1)


def colour_statistics(images: np.ndarray) -> dict[str, float]:
    """Colour statistics of sRGB uint8 images `(N, H, W, 3)` (NHWC):

    chroma:    mean CIELAB chroma C*ab = sqrt(a*² + b*²) over all pixels (0 for greys; about
               50–100 for saturated primaries);
    contrast:  RMS contrast, the standard deviation of L*/100 within an image, averaged over
               images (0 for a flat image, 0.5 for half black / half white);
    lightness: mean L* (0..100).
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {x.shape}")
    lab = srgb_to_lab(x)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    lightness = lab[..., 0]
    contrast = (lightness / 100.0).reshape(x.shape[0], -1).std(1)
    return {
        "chroma": float(chroma.mean()),
        "contrast": float(contrast.mean()),
        "lightness": float(lightness.mean()),
    }


# ------------------------------------------------------------------------------ tables


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("accuracy", v)
    if isinstance(v, (bool, np.bool_)) or isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4f}" if abs(v) <= 1.0 else f"{v:.2f}"
    return str(v)


def markdown_table(
    rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table: one row per `rows` entry, one column per key (`columns` picks and orders
    them). Floats in [-1, 1] get 4 decimals, others 2; `{"accuracy": ...}` cells show the accuracy."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = [
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
