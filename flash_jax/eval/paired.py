"""Powered, paired comparisons: per-image records of each evaluated generator, metrics under
resampled prompts, and paired bootstrap 95 % confidence intervals of each row's difference to a
reference row.

Every generator samples the same prompts from the same initial noise (`flash_jax.eval.generation.initial_noise`),
so two rows differ only by the generator. A row is one method label at one step count on one
prompt set, trained with several seeds (one run per seed). Its value for a metric is the mean
over its seeds. The interval of `row − reference` comes from a two-level bootstrap that keeps the
pairing: each resample draws the prompts with replacement (the same prompts for every row, the
real images and the teacher's images) and the training seeds with replacement (the same seed
indices for both rows when both were trained with the same seeds; independently otherwise).

A record (`Record`) holds, for N prompts, S noise seeds and F judge features:
  features  float32 (S, N, F)  judge features of each image
  correct   bool    (S, N)     the judge finds the caption in the image (`judge.alignment` "all")
  category  int32   (N,)       caption category (index into `shapes.CATEGORIES`)
  chroma    float32 (S, N)     mean CIELAB chroma of each image
  contrast  float32 (S, N)     RMS contrast of each image (std of L*/100)

Metrics (`METRICS`), each a function of a record, the prompts' real images' features and the
teacher's record of the same prompts and noise:
  fd_judge      Fréchet distance to the prompts' real images in the judge's space (mean over S)
  fd_teacher    Fréchet distance to the teacher's images of the same prompts and noise
  teacher_dist  mean L2 distance between an image's judge features and the teacher's image from
                the same x_T (a paired distance: 0 only when the images match one by one)
  <category>, mean   alignment accuracy per caption category and their unweighted mean
  chroma, contrast   colour statistics (noise correction's effect)
  diversity     mean judge-feature distance between the noise seeds' images of one prompt
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flash_jax.data import shapes
from flash_jax.eval import metrics

METRICS = (
    "fd_judge",
    "fd_teacher",
    "teacher_dist",
    *shapes.CATEGORIES,
    "mean",
    "chroma",
    "contrast",
    "diversity",
)
LOWER_IS_BETTER = {"fd_judge", "fd_teacher", "teacher_dist"}


@dataclasses.dataclass(frozen=True)
class Record:
    """Per-image outcomes of one generator on one prompt set (layout in the module docstring)."""

    features: np.ndarray
    correct: np.ndarray
    category: np.ndarray
    chroma: np.ndarray
    contrast: np.ndarray

    def __post_init__(self):
        s, n, _ = self.features.shape
        for name in ("correct", "chroma", "contrast"):
            if getattr(self, name).shape != (s, n):
                raise ValueError(
                    f"record {name} has shape {getattr(self, name).shape}, features "
                    f"{self.features.shape}: expected ({s}, {n})"
                )
        if self.category.shape != (n,):
            raise ValueError(f"record category has shape {self.category.shape}, expected ({n},)")

    def save(self, path: str | Path) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Record:
        with np.load(path) as f:
            return cls(**{k.name: f[k.name] for k in dataclasses.fields(cls)})


def per_image_colour(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(chroma (N,), contrast (N,))` of sRGB uint8 images `(N, H, W, 3)`, per image; their means
    are `metrics.colour_statistics`'s chroma and contrast."""
    lab = metrics.srgb_to_lab(np.asarray(images))
    n = lab.shape[0]
    chroma = np.hypot(lab[..., 1], lab[..., 2]).reshape(n, -1).mean(1)
    contrast = (lab[..., 0] / 100.0).reshape(n, -1).std(1)
    return chroma.astype(np.float32), contrast.astype(np.float32)


def make_record(
    images: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    category: np.ndarray,
) -> Record:
    """A record from one entry per noise seed: images `(N, H, W, 3)` uint8, judge features
    `(N, F)`, alignment `(N,)` bool; `category` `(N,)` of the prompts."""
    colours = [per_image_colour(im) for im in images]
    return Record(
        features=np.stack([np.asarray(f, np.float32) for f in features]),
        correct=np.stack([np.asarray(c, bool) for c in correct]),
        category=np.asarray(category, np.int32).reshape(-1),
        chroma=np.stack([c for c, _ in colours]),
        contrast=np.stack([c for _, c in colours]),
    )


# ------------------------------------------------------------------ metrics under prompt weights


def _weighted_moments(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means `(B, F)` and unbiased covariances `(B, F, F)` of features `x` `(N, F)` under prompt
    weights `w` `(B, N)` (bootstrap counts; the weights of one resample sum to N)."""
    x = np.asarray(x, np.float64)
    total = w.sum(1, keepdims=True)
    mu = (w @ x) / total
    f = x.shape[1]
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), f * f)  # (N, F·F): one GEMM for all B
    second = (w @ outer).reshape(len(w), f, f)
    cov = (second - total[:, :, None] * mu[:, :, None] * mu[:, None, :]) / (total[:, :, None] - 1)
    return mu, cov


def _sqrt_psd_batched(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + np.swapaxes(a, -1, -2)) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))[:, None, :]) @ np.swapaxes(vecs, -1, -2)


def _frechet_batched(
    mu1: np.ndarray, cov1: np.ndarray, root1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> np.ndarray:
    """`metrics.frechet_distance` over a batch `(B,)`; `root1` is the square root of `cov1`."""
    middle = root1 @ cov2 @ root1
    vals = np.linalg.eigvalsh((middle + np.swapaxes(middle, -1, -2)) / 2)
    trace_sqrt = np.sqrt(np.clip(vals, 0.0, None)).sum(-1)
    diff = mu1 - mu2
    fd = (diff * diff).sum(-1) + np.trace(cov1, axis1=1, axis2=2)
    fd = fd + np.trace(cov2, axis1=1, axis2=2) - 2.0 * trace_sqrt
    return np.maximum(fd, 0.0)


class Reference:
    """The real images' and the teacher's features under a fixed set of prompt weights, their
    moments and covariance roots computed once and shared by every generator's metrics."""

    def __init__(self, real_features: np.ndarray, teacher: Record | None, weights: np.ndarray):
        self.weights = np.asarray(weights, np.float64)
        self.real = _weighted_moments(real_features, self.weights)
        self.real_root = _sqrt_psd_batched(self.real[1])
        self.teacher = teacher
        self.teacher_moments = []
        if teacher is not None:
            for s in range(teacher.features.shape[0]):
                mu, cov = _weighted_moments(teacher.features[s], self.weights)
                self.teacher_moments.append((mu, cov, _sqrt_psd_batched(cov)))


def record_metrics(record: Record, ref: Reference) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` of `record`, one value per weight vector of `ref`: `(B,)` each.
    With a single all-ones weight vector these are the plain metrics of the whole prompt set."""
    w = ref.weights
    total = w.sum(1)
    s_count = record.features.shape[0]
    out: dict[str, np.ndarray] = {}

    def mean_over_images(per_image: np.ndarray) -> np.ndarray:  # (S, N) -> (B,)
        return (w @ per_image.mean(0)) / total

    fds, fds_teacher = [], []
    for s in range(s_count):
        mu, cov = _weighted_moments(record.features[s], w)
        fds.append(_frechet_batched(ref.real[0], ref.real[1], ref.real_root, mu, cov))
        if ref.teacher is not None:
            t_mu, t_cov, t_root = ref.teacher_moments[s]
            fds_teacher.append(_frechet_batched(t_mu, t_cov, t_root, mu, cov))
    out["fd_judge"] = np.mean(fds, 0)
    if ref.teacher is not None:
        if ref.teacher.features.shape != record.features.shape:
            raise ValueError(
                f"teacher record features {ref.teacher.features.shape} do not match the "
                f"record's {record.features.shape}: not the same prompts and noise seeds"
            )
        out["fd_teacher"] = np.mean(fds_teacher, 0)
        dist = np.linalg.norm(record.features - ref.teacher.features, axis=-1)
        out["teacher_dist"] = mean_over_images(dist)
    per_category = []
    for c, name in enumerate(shapes.CATEGORIES):
        in_c = (record.category == c).astype(np.float64)
        count = w @ in_c
        hits = w @ (record.correct.mean(0) * in_c)
        if in_c.any():
            out[name] = np.where(count > 0, hits / np.maximum(count, 1e-12), np.nan)
            per_category.append(out[name])
    out["mean"] = np.nanmean(np.stack(per_category), 0)
    out["chroma"] = mean_over_images(record.chroma)
    out["contrast"] = mean_over_images(record.contrast)
    if s_count > 1:
        i, j = np.triu_indices(s_count, k=1)
        pair = np.linalg.norm(record.features[i] - record.features[j], axis=-1).mean(0)
        out["diversity"] = (w @ pair) / total
    return out


# ------------------------------------------------------------------ paired bootstrap


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared row: a method label at a step count, with one record per training seed."""

    label: str
    steps: int
    seeds: tuple[int, ...]
    records: tuple[Record, ...]
    nfe: int = 0


def bootstrap_weights(num_prompts: int, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`(num_resamples, num_prompts)` multinomial counts: prompts drawn with replacement."""
    draws = rng.integers(0, num_prompts, (num_resamples, num_prompts))
    return np.stack([np.bincount(d, minlength=num_prompts) for d in draws]).astype(np.float64)


def compare(
    rows: Sequence[Row],
    reference: tuple[str, int],
    real_features: np.ndarray,
    teacher: Record | None,
    *,
    num_resamples: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per row and metric: the per-seed values, their mean, the difference of means to the
    `reference` row `(label, steps)`, and its paired bootstrap 95 % interval.

    Returns one dict per row: `{"label", "steps", "nfe", "seeds", "metrics": {m: {"seeds": [...],
    "mean", "diff", "ci95": [low, high], "excludes_0"}}, "reference": bool}`. The reference row's
    own difference is identically 0: its interval is [0, 0]. A row whose seeds equal the reference's is paired by seed;
    otherwise seeds are drawn independently (the teacher, one run, against students).
    """
    by_key = {(r.label, r.steps): r for r in rows}
    if reference not in by_key:
        raise ValueError(f"reference row {reference} not among {sorted(by_key)}")
    ref_row = by_key[reference]
    num_prompts = real_features.shape[0]
    for r in rows:
        for rec in r.records:
            if rec.features.shape[1] != num_prompts:
                raise ValueError(
                    f"row {r.label!r} @ {r.steps}: {rec.features.shape[1]} prompts, the real set "
                    f"has {num_prompts}"
                )
    rng = np.random.default_rng(seed)
    full = Reference(real_features, teacher, np.ones((1, num_prompts)))
    resampled = Reference(
        real_features, teacher, bootstrap_weights(num_prompts, num_resamples, rng)
    )
    values = {}  # (label, steps) -> metric -> (per-seed full values (K,), resampled (K, B))
    for r in rows:
        fulls = [record_metrics(rec, full) for rec in r.records]
        boots = [record_metrics(rec, resampled) for rec in r.records]
        values[(r.label, r.steps)] = {
            m: (np.array([f[m][0] for f in fulls]), np.stack([b[m] for b in boots]))
            for m in fulls[0]
        }
    seed_draws = {}

    def seed_indices(count: int) -> np.ndarray:  # (B, count): training seeds with replacement
        if count not in seed_draws:
            seed_draws[count] = rng.integers(0, count, (num_resamples, count))
        return seed_draws[count]

    ref_values = values[reference]
    ref_draw = seed_indices(len(ref_row.records))
    out = []
    for r in rows:
        paired = r.seeds == ref_row.seeds
        draw = (
            ref_draw if paired else rng.integers(0, len(r.records), (num_resamples, len(r.records)))
        )
        entry = {"label": r.label, "steps": r.steps, "nfe": r.nfe, "seeds": list(r.seeds)}
        entry["paired_by_seed"] = bool(paired)
        entry["reference"] = (r.label, r.steps) == reference
        entry["metrics"] = {}
        for m, (seed_values, boot) in values[(r.label, r.steps)].items():
            cell = {"seeds": [float(v) for v in seed_values], "mean": float(np.mean(seed_values))}
            if m in ref_values:
                ref_seed_values, ref_boot = ref_values[m]
                cell["diff"] = cell["mean"] - float(np.mean(ref_seed_values))
                if (r.label, r.steps) == reference:
                    cell["ci95"], cell["excludes_0"] = [0.0, 0.0], False
                else:
                    b = np.arange(num_resamples)[:, None]
                    mine = boot.T[b, draw].mean(1)  # (B,)
                    theirs = ref_boot.T[b, ref_draw].mean(1)
                    low, high = np.nanpercentile(mine - theirs, [2.5, 97.5])
                    cell["ci95"] = [float(low), float(high)]
                    cell["excludes_0"] = bool(low > 0 or high < 0)
            entry["metrics"][m] = cell
        out.append(entry)
    return out


def verdict(cell: Mapping[str, Any], metric: str) -> str:
    """'better' / 'worse' than the reference when the interval excludes 0, else 'not resolved'."""
    if not cell.get("excludes_0"):
        return "not resolved"
    lower = cell["diff"] < 0
    return "better" if lower == (metric in LOWER_IS_BETTER) else "worse"


def markdown(compared: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> str:
    """A table: per row the mean over seeds, and for every other row the difference to the
    reference with its 95 % interval; `*` marks an interval that excludes 0."""

    def fmt(v: float) -> str:
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"

    lines = [
        "| row | steps | nfe | seeds | " + " | ".join(metric_names) + " |",
        "|---" * (len(metric_names) + 4) + "|",
    ]
    for e in compared:
        cells = []
        for m in metric_names:
            c = e["metrics"].get(m)
            if c is None:
                cells.append("")
            elif e["reference"] or c.get("ci95") is None:
                cells.append(fmt(c["mean"]))
            else:
                lo, hi = c["ci95"]
                star = "*" if c["excludes_0"] else ""
                cells.append(f"{fmt(c['mean'])} ({c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{star})")
        head = [e["label"], str(e["steps"]), str(e["nfe"]), str(len(e["seeds"]))]
        lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines)


def claim_verdicts(
    compared: Sequence[Mapping[str, Any]],
    claims: Mapping[str, str],
    steps: int,
    metric_names: Sequence[str] = ("fd_judge", "fd_teacher", "mean"),
) -> list[dict[str, Any]]:
    """One entry per claim `name -> label of the row without the component` (at `steps`): per
    metric the row's difference to the reference, its interval and whether the component is
    "confirmed" (its removal is worse, the interval excludes 0), "refuted" (removal is better)
    or "not resolved". Claims whose row was not evaluated are left out."""
    by_label = {(e["label"], e["steps"]): e for e in compared}
    out = []
    for name, label in claims.items():
        entry = by_label.get((label, steps))
        if entry is None or entry.get("reference"):
            continue
        cells = {}
        for m in metric_names:
            cell = entry["metrics"].get(m)
            if cell is None or cell.get("ci95") is None:
                continue
            effect = {"worse": "confirmed", "better": "refuted"}.get(
                verdict(cell, m), "not resolved"
            )
            cells[m] = {"diff": cell["diff"], "ci95": cell["ci95"], "verdict": effect}
        out.append({"claim": name, "row": label, "seeds": len(entry["seeds"]), "metrics": cells})
    return out
