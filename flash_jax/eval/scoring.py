"""Scoring generated images against the real images of their prompts with the judge: FD-judge,
alignment per caption category, chroma / contrast, diversity (flash_jax/eval/evaluate.py lists the
metrics), the prompt sets and the per-image records the paired comparison resamples."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from flash_jax.data import shapes
from flash_jax.eval import judge, metrics, paired

COLUMNS = ("fd_judge", *shapes.CATEGORIES, "mean", "chroma", "contrast", "diversity", "nfe")


def score(
    images: np.ndarray | Sequence[np.ndarray],
    labels: dict[str, np.ndarray],
    judge_params: Any,
    judge_config: judge.JudgeConfig,
    real_features: np.ndarray,
    outputs: Sequence[dict[str, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Metrics of generated (or real) images `(N, H, W, 3)`, or of one such array per noise seed,
    against the prompts' labels and the real images' judge features. fd_judge is the mean over
    seeds (`fd_judge_per_seed` lists them), alignment and colour statistics are pooled, and with
    several seeds `diversity` is `metrics.seed_diversity` of their judge features. `outputs`: the
    judge's outputs of each seed's images when already computed."""
    per_seed = [images] if isinstance(images, np.ndarray) else list(images)
    if outputs is None:
        outputs = [judge.predict(judge_params, im, judge_config) for im in per_seed]
    table = metrics.alignment_table([judge.alignment(out, labels) for out in outputs])
    row: dict[str, Any] = {k: v["accuracy"] for k, v in table.items() if k != "all"}
    fds = [metrics.frechet_distance_from_features(o["features"], real_features) for o in outputs]
    row["fd_judge"] = float(np.mean(fds))
    row |= {
        k: v
        for k, v in metrics.colour_statistics(np.concatenate(per_seed)).items()
        if k != "lightness"
    }
    if len(per_seed) > 1:
        row["fd_judge_per_seed"] = fds
        row["diversity"] = metrics.seed_diversity(np.stack([o["features"] for o in outputs]))
    return row


@dataclasses.dataclass
class PromptSet:
    """Prompts of one Shapes split with their real images, labels and judge features."""

    name: str
    captions: list[str]
    labels: dict[str, np.ndarray]
    real: np.ndarray
    real_features: np.ndarray
    other_real_features: np.ndarray  # a disjoint real draw of the same size (evaluation noise)


def load_prompt_set(
    name: str, num: int, data_seed: int, image_size: int, judge_params, judge_config
) -> PromptSet:
    real, labels = judge.real_examples(name, num, data_seed, image_size)
    features = judge.predict(judge_params, real, judge_config)["features"]
    other, _ = judge.real_examples(name, num, data_seed, image_size, start=num)
    other_features = judge.predict(judge_params, other, judge_config)["features"]
    captions = [str(c) for c in labels["caption"]]
    return PromptSet(name, captions, labels, real, features, np.asarray(other_features))


def real_row(prompts: PromptSet, judge_params, judge_config) -> dict[str, Any]:
    """The reference row: alignment of the real images, and the FD of a disjoint real draw of
    the same size (the floor every generator's fd_judge is compared with)."""
    row = score(prompts.real, prompts.labels, judge_params, judge_config, prompts.real_features)
    row["fd_judge"] = metrics.frechet_distance_from_features(
        prompts.other_real_features, prompts.real_features
    )
    return row | {"label": "real", "run": "real", "steps": 0, "prompt_set": prompts.name}


def generated_row(
    images: Sequence[np.ndarray], prompts: PromptSet, judge_params, judge_config
) -> tuple[dict[str, Any], paired.Record]:
    """The metrics row of one generator's images (one array per noise seed) and its per-image
    record. `fd_judge_other_real` is its FD to the disjoint real draw: how much the choice of
    real set moves the FD (evaluation noise)."""
    outputs = [judge.predict(judge_params, im, judge_config) for im in images]
    row = score(images, prompts.labels, judge_params, judge_config, prompts.real_features, outputs)
    row["fd_judge_other_real"] = float(
        np.mean(
            [
                metrics.frechet_distance_from_features(o["features"], prompts.other_real_features)
                for o in outputs
            ]
        )
    )
    correct = [judge.alignment(o, prompts.labels)["all"] for o in outputs]
    record = paired.make_record(
        images, [o["features"] for o in outputs], correct, prompts.labels["category"]
    )
    return row, record


def evaluation_noise(rows: dict[str, dict[str, Any]], prompt_set: str) -> dict[str, float]:
    """How much FD-judge moves with the evaluation's own choices, over the generated rows of a
    prompt set: `noise_seeds` the mean |FD(seed a) − FD(seed b)| over pairs of noise seeds;
    `real_sets` the mean |FD(prompts' real images) − FD(a disjoint real draw)|."""
    seed_gaps, real_gaps = [], []
    for r in rows.values():
        if r["prompt_set"] != prompt_set or r["run"] == "real":
            continue
        per_seed = r.get("fd_judge_per_seed", [])
        seed_gaps += [abs(a - b) for i, a in enumerate(per_seed) for b in per_seed[i + 1 :]]
        if "fd_judge_other_real" in r:
            real_gaps.append(abs(r["fd_judge"] - r["fd_judge_other_real"]))
    return {
        "noise_seeds": float(np.mean(seed_gaps)) if seed_gaps else float("nan"),
        "real_sets": float(np.mean(real_gaps)) if real_gaps else float("nan"),
    }
