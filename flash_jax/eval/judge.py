"""The Shapes testbed's judge: a small CNN that reads an image (no caption) and finds its objects —
each one's color, shape, texture, size and centroid.

It serves two purposes:
- alignment (the T2I-CompBench analog): `alignment` decides whether an image shows what its caption
  says, per caption category;
- a feature space for a Fréchet distance ("FD-judge", the FID analog): `features`, `fd_judge`.

Design: a fully convolutional detector in the CenterNet style. The image is cut into a G×G grid
(G = image_size / 2**len(channels); the testbed's judge has G = 8, cells of 1/8 of the side, while
two objects' centroids are always ≥ 0.27 of the side apart). Each cell says how much of an object
is centred near it and reads that object's attributes — color and shape INDEPENDENTLY, so the
(color, shape) pairs never seen in training (the held-out split) are recognised too (a head per
pair would need training examples of every pair). Outputs (`Judge.__call__`, `apply`):

    object_logits   (B, G, G)      sigmoid: share of an object centred near this cell (bilinear
                                   over the 2×2 cells around its centroid; `judge_targets`)
    color_logits    (B, G, G, 8)   softmax over `shapes.COLORS`   } of the object centred in or
    shape_logits    (B, G, G, 6)   softmax over `shapes.SHAPES`   } next to the cell (trained
    texture_logits  (B, G, G, 4)   softmax over `shapes.TEXTURES` } only there)
    size_logits     (B, G, G, 2)   softmax over `shapes.SIZES`    }
    offset          (B, G, G, 2)   (x, y) of that centroid from the cell's top-left corner, in
                                   cells, in (-1, 2)
    features        (B, F)         global average of the last feature map (FD-judge)

Cells are indexed `[row, col]` = `[y, x]`; image coordinates are (x right, y down) in [0, 1].
`judge_targets(batch)` builds the matching targets from the exact labels (numpy, host side);
`detect` decodes outputs into objects (3×3 local maxima of the object probability with enough
probability around them); `pair_outputs` summarises detections per (color, shape) pair: count
0..3, texture and size presence, mean centroid.

The alignment rule (`alignment`), per record. A detection MATCHES a described object (label slot)
when it agrees on every attribute the caption MENTIONS for that object (`object_mentioned`);
unmentioned attributes (e.g. the color in "a striped circle") are free. The image is correct for
its caption iff
1. every described object is matched by some detection — in the "counting" category instead, the
   number of matching detections equals the number of described objects with the same color and
   shape ("two red circles": exactly two red circles);
2. if the caption states a relation "slot 0 <relation> slot 1", some detection matching slot 0
   and some matching slot 1 satisfy it: separated by >= `margin` (fraction of the image side)
   along the relation's axis, and no farther apart across it than along it (a 90° cone; y grows
   down, so "above" means smaller y).
Other objects in the image are ignored (as in CompBench).

CLI: `python -m flash_jax.eval.judge --workdir runs/shapes/judge` prints the judge's per-category
accuracy on real eval and held-out images (and, with `--autoencoder_workdir`, on autoencoder
reconstructions) as a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flash_jax.config import read_json
from flash_jax.data import shapes
from flash_jax.models import layers
from flash_jax.train import checkpoint

log = logging.getLogger(__name__)

Array = jax.Array
Dtype = Any

NUM_COLORS = len(shapes.COLORS)
NUM_SHAPES = len(shapes.SHAPES)
NUM_TEXTURES = len(shapes.TEXTURES)
NUM_SIZES = len(shapes.SIZES)
NUM_COUNTS = 4  # pair counts 0..3 (at most MAX_OBJECTS = 3 objects)
# Per-cell outputs in the order they are sliced from the 1x1 head.
_HEADS = (
    ("object_logits", 1),
    ("color_logits", NUM_COLORS),
    ("shape_logits", NUM_SHAPES),
    ("texture_logits", NUM_TEXTURES),
    ("size_logits", NUM_SIZES),
    ("offset", 2),
)
_ATTRS = ("color", "shape", "texture", "size")  # = shapes.ATTRIBUTES, the mentioned-mask columns
NORM_GROUPS = 8  # GroupNorm groups (fewer for narrower layers)
DEFAULT_MARGIN = 0.1  # relation: min separation, fraction of the image side (real data: >= 0.24)
DEFAULT_THRESHOLD = 0.5  # detection: min object probability summed around a local maximum
MATCH_RADIUS = 0.1  # evaluation: a detection this close to a true centroid found it


# ------------------------------------------------------------------------------ the network


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """Architecture of the judge (all defaults are the trained testbed judge).

    stem: channels of a full-resolution 3x3 conv first (0: none).
    channels: one stage per entry: a stride-2 3x3 conv, then a 3x3 conv (GroupNorm + SiLU each).
      The grid is image_size / 2**len(channels) cells a side.
    features: channels of the last 3x3 conv, whose map feeds the heads; its global average is
      the FD-judge feature vector.
    GroupNorms use `min(NORM_GROUPS, channels)` groups, so everything that changes the numbers
    (except dtypes) can be read off the params: `config_from_params`.
    """

    stem: int = 32
    channels: tuple[int, ...] = (48, 96)
    features: int = 96
    remat: bool = False  # rematerialise each stage in the backward pass
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeConfig:
        """From a config dict (e.g. `config.model.judge.to_dict()`); unknown keys are errors."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(
                f"unknown judge config keys {sorted(unknown)}; expected {sorted(fields)}"
            )
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        for k in ("dtype", "param_dtype"):
            if isinstance(d.get(k), str):
                d[k] = jnp.dtype(d[k])
        return cls(**d)

    def grid(self, image_size: int) -> int:
        """Cells per side for `image_size`² images."""
        g, rem = divmod(image_size, 2 ** len(self.channels))
        if rem or g == 0:
            raise ValueError(f"image_size {image_size} not divisible by 2**{len(self.channels)}")
        return g


def _groups(channels: int) -> int:
    return min(NORM_GROUPS, channels)


class _ConvNorm(nn.Module):
    channels: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.conv(self.channels, 3, strides=self.strides, name="conv", **kw)(x)
        x = layers.GroupNorm(_groups(self.channels), name="norm", **kw)(x)
        return layers.constrain_image(nn.silu(x))


class _Stage(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _ConvNorm(self.channels, 2, name="down", **kw)(x)
        return _ConvNorm(self.channels, 1, name="block", **kw)(x)


class Judge(nn.Module):
    """images uint8 `(B, H, W, 3)` NHWC -> dict of outputs (layout in the module docstring)."""

    config: JudgeConfig

    @nn.compact
    def __call__(self, images: Array) -> dict[str, Array]:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = images.astype(c.dtype) / 127.5 - 1.0
        if c.stem:
            x = _ConvNorm(c.stem, 1, name="stem", **kw)(x)
        stage = nn.remat(_Stage) if c.remat else _Stage
        for i, ch in enumerate(c.channels):
            x = stage(ch, name=f"stages_{i}", **kw)(x)
        x = _ConvNorm(c.features, 1, name="head", **kw)(x)
        h = layers.conv(sum(w for _, w in _HEADS), 1, name="out", **kw)(x).astype(jnp.float32)
        out, start = {}, 0
        for name, w in _HEADS:
            out[name] = h[..., start : start + w]
            start += w
        out["object_logits"] = out["object_logits"][..., 0]
        out["offset"] = 3.0 * jax.nn.sigmoid(out["offset"]) - 1.0
        out["features"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return out


def init_params(config: JudgeConfig, rng: Array, image_size: int = 64) -> dict[str, Any]:
    """Fresh judge params (plain, unboxed nested dicts) for `image_size`² images."""
    config.grid(image_size)
    x = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    return nn.meta.unbox(Judge(config).init(rng, x)["params"])


def config_from_params(params: dict[str, Any]) -> JudgeConfig:
    """The `JudgeConfig` (default dtypes, no remat) whose parameter tree is `params`."""
    stages = sorted(
        (k for k in params if k.startswith("stages_")), key=lambda k: int(k.split("_")[1])
    )
    width = lambda p: int(p["conv"]["kernel"].shape[-1])  # noqa: E731
    return JudgeConfig(
        stem=width(params["stem"]) if "stem" in params else 0,
        channels=tuple(width(params[k]["block"]) for k in stages),
        features=width(params["head"]),
    )


def apply(params: Any, images: Array, config: JudgeConfig | None = None) -> dict[str, Array]:
    """Judge outputs for uint8 images `(B, H, W, 3)` (layout in the module docstring)."""
    return Judge(config or config_from_params(params)).apply({"params": params}, images)


def features(params: Any, images: Array, config: JudgeConfig | None = None) -> Array:
    """The FD-judge feature space: `(B, F)` float32 for uint8 images `(B, H, W, 3)`: the global
    average of the judge's last feature map. `config` defaults to the one read off the params."""
    return apply(params, images, config)["features"]


# ------------------------------------------------------------------------------ targets and loss


def judge_targets(batch: dict[str, np.ndarray], grid: int = 8) -> dict[str, np.ndarray]:
    """Per-cell targets from exact labels (batched `shapes` label layout, leading axis B). Numpy.

    An object's centroid lies in cell `floor(xy * grid)`. Its presence is spread bilinearly over
    the 2×2 cells whose centres surround the centroid (weights summing to 1: a smooth function of
    position, with no hard decision at cell borders). Its attributes and position are taught in
    the 3×3 cells around the centroid's cell (which include those 2×2; a cell within reach of
    two objects takes the one whose centroid is nearer its centre), so whichever cell `detect`
    picks reads the right object. Returns:
      object  float32 (B, G, G)      bilinear presence in [0, 1]; sums to 1 per object
      weight  float32 (B, G, G)      1 within the 3×3 cells of some object
      color, shape, texture, size  int32 (B, G, G)   that object's attributes (0 where weight 0)
      offset  float32 (B, G, G, 2)   its centroid relative to the cell's corner, in cells, (x, y)
                                     in [-1, 2) (in [0, 1) in the centroid's own cell)
    """
    present = np.asarray(batch["object_present"], bool)
    b = present.shape[0]
    xy = np.asarray(batch["object_xy"], np.float64) * grid
    cell = np.clip(np.floor(xy), 0, grid - 1).astype(np.int64)
    out = {"object": np.zeros((b, grid, grid), np.float32)}
    for attr in _ATTRS:
        out[attr] = np.zeros((b, grid, grid), np.int32)
    out["offset"] = np.zeros((b, grid, grid, 2), np.float32)
    best = np.full((b, grid, grid), np.inf)  # distance of the assigned centroid to the cell centre
    for j in range(present.shape[1]):
        rows = np.flatnonzero(present[:, j])
        p = xy[rows, j] - 0.5  # relative to the cell centres
        base = np.floor(p).astype(np.int64)
        frac = p - base
        for dy in (0, 1):
            for dx in (0, 1):
                y, x = base[:, 1] + dy, base[:, 0] + dx
                w = (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 0] if dx else 1 - frac[:, 0])
                inside = (y >= 0) & (y < grid) & (x >= 0) & (x < grid)
                out["object"][rows[inside], y[inside], x[inside]] += w[inside]
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                y, x = cell[rows, j, 1] + di, cell[rows, j, 0] + dj
                inside = (y >= 0) & (y < grid) & (x >= 0) & (x < grid)
                r, y, x = rows[inside], y[inside], x[inside]
                corner = np.stack([x, y], -1)
                dist = np.linalg.norm(xy[r, j] - (corner + 0.5), axis=-1)
                closer = dist < best[r, y, x]
                r, y, x = r[closer], y[closer], x[closer]
                best[r, y, x] = dist[closer]
                for attr in _ATTRS:
                    out[attr][r, y, x] = np.asarray(batch[f"object_{attr}"])[r, j]
                out["offset"][r, y, x] = xy[r, j] - corner[closer]
    out["object"] = np.minimum(out["object"], 1.0)
    out["weight"] = np.isfinite(best).astype(np.float32)
    return out


def judge_loss(
    outputs: dict[str, Array],
    targets: dict[str, Array],
    *,
    object_weight: float = 1.0,
    attribute_weight: float = 1.0,
    offset_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the heads' losses, each summed over cells and averaged over the batch.

    object: sigmoid cross-entropy in every cell; color / shape / texture / size: softmax
    cross-entropy and offset: L1, in the cells that `weight` marks. An optional per-image
    `targets["color_mask"]` `(B,)` switches the color loss off for images whose colors were
    altered by augmentation.
    """
    import optax  # only needed for training

    parts = {
        "object": optax.sigmoid_binary_cross_entropy(
            outputs["object_logits"], targets["object"]
        ).sum((1, 2))
    }
    mask = targets["weight"]
    for attr in _ATTRS:
        ce = optax.softmax_cross_entropy_with_integer_labels(
            outputs[f"{attr}_logits"], targets[attr]
        )
        parts[attr] = (ce * mask).sum((1, 2))
    if "color_mask" in targets:
        parts["color"] = parts["color"] * targets["color_mask"]
    parts["offset"] = (jnp.abs(outputs["offset"] - targets["offset"]).sum(-1) * mask).sum((1, 2))
    parts = {k: jnp.mean(v) for k, v in parts.items()}
    loss = (
        object_weight * parts["object"]
        + attribute_weight * sum(parts[a] for a in _ATTRS)
        + offset_weight * parts["offset"]
    )
    return loss, {f"loss_{k}": v for k, v in parts.items()}


def oracle_outputs(
    targets: dict[str, np.ndarray], confidence: float = 10.0
) -> dict[str, np.ndarray]:
    """Judge outputs that say exactly what `judge_targets` says (for testing the alignment rule)."""
    sizes = dict(zip(_ATTRS, (NUM_COLORS, NUM_SHAPES, NUM_TEXTURES, NUM_SIZES), strict=True))
    p = np.clip(targets["object"], 1e-4, 1 - 1e-4)
    out = {"object_logits": np.log(p) - np.log1p(-p), "offset": targets["offset"]}
    for attr, n in sizes.items():
        out[f"{attr}_logits"] = confidence * np.eye(n, dtype=np.float32)[targets[attr]]
    return out


# ------------------------------------------------------------------------------ decoding


def detect(outputs: dict[str, Any], threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
    """Objects found by the judge, one slot per cell (host-side numpy).

    A cell holds a detection where its object probability is the maximum of its 3×3 neighbourhood
    (ties go to the first cell in raster order) and the probabilities in that neighbourhood sum
    to more than `threshold`: an object whose centroid sits on a cell border splits its
    probability between neighbouring cells and is still found once. Two objects whose centroid
    cells or presence blocks touch (≈0.1 % of testbed records at G = 8) can merge into one.

    Returns, with K = G*G cells in row-major order: present bool (B, K); color, shape, texture,
    size int (B, K) (argmax); xy float32 (B, K, 2) centroid in image coordinates [0, 1].
    """
    logits = np.asarray(outputs["object_logits"], np.float64)
    b, g = logits.shape[:2]
    prob = 1.0 / (1.0 + np.exp(-logits))
    padded = np.pad(prob, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    is_max = np.ones_like(prob, bool)
    mass = np.zeros_like(prob)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            q = padded[:, 1 + di : 1 + di + g, 1 + dj : 1 + dj + g]
            mass += np.maximum(q, 0.0)
            if (di, dj) != (0, 0):
                earlier = di < 0 or (di == 0 and dj < 0)
                is_max &= prob > q if earlier else prob >= q
    det = {"present": (is_max & (mass > threshold)).reshape(b, -1)}
    for attr in _ATTRS:
        det[attr] = np.asarray(outputs[f"{attr}_logits"]).argmax(-1).reshape(b, -1)
    rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    corner = np.stack([cols, rows], -1).reshape(1, -1, 2)
    det["xy"] = ((corner + np.asarray(outputs["offset"]).reshape(b, -1, 2)) / g).astype(np.float32)
    return det


def pair_outputs(detections: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per (color, shape) pair summary of `detect` output, pairs as `(8, 6)` colors × shapes:
    count int32 (B, 8, 6) (clipped to 0..3); texture bool (B, 8, 6, 4) and size bool
    (B, 8, 6, 2): some detected object of the pair has it; xy float32 (B, 8, 6, 2) mean centroid
    (0 where the count is 0)."""
    pair = detections["color"] * NUM_SHAPES + detections["shape"]
    hot = (pair[..., None] == np.arange(NUM_COLORS * NUM_SHAPES)) & detections["present"][..., None]
    b = hot.shape[0]
    count = hot.sum(1)
    grid = (b, NUM_COLORS, NUM_SHAPES)

    def presence(attr: str, n: int) -> np.ndarray:
        onehot = detections[attr][..., None] == np.arange(n)
        return (hot[..., None] & onehot[:, :, None, :]).any(1).reshape(*grid, n)

    xy = (hot[..., None] * detections["xy"][:, :, None, :]).sum(1) / np.maximum(count, 1)[..., None]
    return {
        "count": np.minimum(count, NUM_COUNTS - 1).astype(np.int32).reshape(grid),
        "texture": presence("texture", NUM_TEXTURES),
        "size": presence("size", NUM_SIZES),
        "xy": xy.astype(np.float32).reshape(*grid, 2),
    }


# ------------------------------------------------------------------------------ alignment


def alignment(
    judge_outputs: dict[str, Any],
    labels: dict[str, Any],
    margin: float = DEFAULT_MARGIN,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Whether each image shows its caption (rule in the module docstring). Host-side numpy.

    Args:
      judge_outputs: judge outputs for B images (jax or numpy arrays; `features` not needed).
      labels: the captions' labels, batched `shapes` layout (`object_*`, `category`, `relation`).
      margin: minimum separation along a relation's axis, fraction of the image side.
      threshold: detection threshold on the summed object probability (see `detect`).

    Returns:
      `{"all": bool (B,)}` plus, for each name in `shapes.CATEGORIES`, the bool array of the
      records of that category (in batch order; possibly empty).
    """
    det = detect(judge_outputs, threshold)
    present = np.asarray(labels["object_present"], bool)  # (B, S)
    mentioned = np.asarray(labels["object_mentioned"], bool)  # (B, S, 4)
    values = {a: np.asarray(labels[f"object_{a}"]) for a in _ATTRS}
    category = np.asarray(labels["category"]).reshape(-1)
    counting = category == shapes.CATEGORIES.index("counting")
    # Described objects with the same (color, shape) as each slot: what a counting caption asks for.
    same_pair = (values["color"][:, :, None] == values["color"][:, None, :]) & (
        values["shape"][:, :, None] == values["shape"][:, None, :]
    )
    wanted = (same_pair & present[:, None, :]).sum(2)  # (B, S)

    ok = np.ones(present.shape[0], bool)
    matches = []
    for j in range(present.shape[1]):
        match = det["present"].copy()  # (B, K)
        for a, attr in enumerate(_ATTRS):
            match &= ~mentioned[:, j, a : a + 1] | (det[attr] == values[attr][:, j : j + 1])
        matches.append(match)
        slot_ok = np.where(counting, match.sum(1) == wanted[:, j], match.any(1))
        ok &= slot_ok | ~present[:, j]

    relation = np.asarray(labels["relation"]).reshape(-1)
    xy = det["xy"]
    d = xy[:, None, :, :] - xy[:, :, None, :]  # (B, K_a, K_b, 2): b minus a
    # "A r B": left of: B has larger x; right of: smaller x; above: larger y; below: smaller y.
    main = np.choose(
        np.clip(relation, 0, 3)[:, None, None], [d[..., 0], -d[..., 0], d[..., 1], -d[..., 1]]
    )
    other = np.abs(np.where((relation >= 2)[:, None, None], d[..., 0], d[..., 1]))
    holds = matches[0][:, :, None] & matches[1][:, None, :] & (main >= margin) & (other <= main)
    ok &= (relation < 0) | holds.any((1, 2))

    result = {"all": ok}
    for i, name in enumerate(shapes.CATEGORIES):
        result[name] = ok[category == i]
    return result


# ------------------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=8)
def _jitted_apply(config: JudgeConfig) -> Callable:
    return jax.jit(lambda params, images: Judge(config).apply({"params": params}, images))


def predict(
    params: Any, images: np.ndarray, config: JudgeConfig | None = None, batch_size: int = 250
) -> dict[str, np.ndarray]:
    """Judge outputs (numpy) for uint8 images `(N, H, W, 3)`, in jitted batches."""
    fn = _jitted_apply(config or config_from_params(params))
    chunks = [
        jax.device_get(fn(params, jnp.asarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def fd_judge(
    params: Any, images_a: np.ndarray, images_b: np.ndarray, config: JudgeConfig | None = None
) -> float:
    """FD-judge: Fréchet distance between two uint8 image sets `(N, H, W, 3)`, `(M, H, W, 3)` in
    the judge's feature space (the testbed's FID analog; use thousands of images per set)."""
    from flash_jax.eval import metrics

    fa = predict(params, images_a, config)["features"]
    fb = predict(params, images_b, config)["features"]
    return metrics.frechet_distance_from_features(fa, fb)


def evaluate_judge(
    params: Any,
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    config: JudgeConfig | None = None,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, float]:
    """The judge's accuracy on real images `(N, H, W, 3)` uint8 with their true `labels`.

    Returns floats:
      `<category>` (each of `shapes.CATEGORIES`), `all` and `mean` (over categories): alignment
        accuracy of the images with their own captions (the testbed's ceiling);
      `objects_exact`: fraction of images whose detections are exactly the true objects (no
        misses, no extras) with every attribute right;
      `recall`: fraction of true objects with a detection within `MATCH_RADIUS`; `extra`: other
        detections per image; `color_acc`, `shape_acc`, `texture_acc`, `size_acc`: attribute accuracy of the
        detected true objects;
      `xy_mae_px`: centroid mean absolute error of detected true objects, in pixels;
      `n`: number of images.
    """
    from flash_jax.eval import metrics  # metrics does not import this module

    config = config or config_from_params(params)
    out = predict(params, images, config)
    acc = metrics.alignment_table(alignment(out, labels, margin))
    result = {k: v["accuracy"] for k, v in acc.items()}
    # Each true object is paired with the nearest detection within MATCH_RADIUS.
    det = detect(out)
    present = np.asarray(labels["object_present"], bool)  # (B, S)
    true_xy = np.asarray(labels["object_xy"], np.float32)
    dist = np.linalg.norm(det["xy"][:, None, :, :] - true_xy[:, :, None, :], axis=-1)  # (B, S, K)
    dist = np.where(det["present"][:, None, :], dist, np.inf)
    nearest = dist.argmin(2)[..., None]  # (B, S, 1)
    found = present & (np.take_along_axis(dist, nearest, 2)[..., 0] < MATCH_RADIUS)
    exact = (found == present).all(1) & (det["present"].sum(1) == present.sum(1))
    for attr in _ATTRS:
        guess = np.take_along_axis(det[attr], nearest[..., 0], 1)
        right = guess == np.asarray(labels[f"object_{attr}"])
        result[f"{attr}_acc"] = float(right[found].mean())
        exact &= (right | ~found).all(1)
    result["objects_exact"] = float(exact.mean())
    result["recall"] = float(found.sum() / present.sum())
    result["extra"] = float((det["present"].sum() - found.sum()) / len(images))
    guess_xy = np.take_along_axis(det["xy"], nearest, 1)
    result["xy_mae_px"] = float(np.abs(guess_xy - true_xy)[found].mean() * images.shape[1])
    result["n"] = len(images)
    return result


def judge_image_size(path: str | Path) -> int | None:
    """The image side the judge at `path` was trained on: `data.image_size` of its run's
    config.json, or for a params file the `image_size` of the JSON file beside it
    (`judge.msgpack` -> `judge.json`); None when neither exists."""
    path = Path(path)
    if path.suffix != ".msgpack":
        return int(read_json(path / "config.json")["data"]["image_size"])
    sidecar = path.with_suffix(".json")
    return int(read_json(sidecar)["image_size"]) if sidecar.is_file() else None


def check_judge_size(path: str | Path, image_size: int) -> None:
    """Refuses a judge trained on another image size than the evaluation's: it would score those
    images without complaint, and wrongly."""
    trained = judge_image_size(path)
    if trained is None:
        log.warning("%s records no image size (no %s): cannot check it against %dpx images",
                    path, Path(path).with_suffix(".json").name, image_size)  # fmt: skip
    elif trained != image_size:
        raise ValueError(
            f"the judge {path} was trained on {trained}px images, but the evaluation's images are "
            f"{image_size}px (image_size): give a judge trained on {image_size}px images"
        )


def load_judge(path: str | Path, image_size: int | None = None) -> tuple[Any, JudgeConfig]:
    """`(params, config)` of a judge: a run directory it was trained in (EMA params of the newest
    checkpoint, the config from its `config.json`) or a shipped `.msgpack` (assets/; the config
    read off the params, `config_from_params`). With `image_size`, first `check_judge_size`."""
    if image_size is not None:
        check_judge_size(path, image_size)
    params = checkpoint.load_params(path)
    if Path(path).suffix == ".msgpack":
        return params, config_from_params(params)
    run_config = read_json(Path(path) / "config.json")
    return params, JudgeConfig.from_dict(run_config["model"]["judge"])


def real_examples(
    split: str, n: int, seed: int = 0, image_size: int = 64, start: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`(images (n, H, W, 3) uint8, batched labels)` of records `start .. start+n-1` of a split."""
    examples = [shapes.make_example(seed, split, i, image_size) for i in range(start, start + n)]
    images = np.stack([e.pop("image") for e in examples])
    labels = {
        k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0] if k != "caption"
    }
    labels["caption"] = np.array([e["caption"] for e in examples])
    return images, labels


def _reconstruct(
    autoencoder_workdir: str, images: np.ndarray, latent_noise: float = 0.0
) -> np.ndarray:
    """Autoencoder reconstructions (posterior mean) of uint8 images. With `latent_noise`, Gaussian
    noise of std latent_noise · std(posterior means) is added before decoding (fixed seed): the
    error of a diffusion model that samples unit-variance latents to that accuracy."""
    from flash_jax.models import autoencoder

    cfg = read_json(Path(autoencoder_workdir) / "config.json")
    ae = autoencoder.AutoencoderConfig.from_diffusers(cfg["model"]["autoencoder"])
    params = checkpoint.load_params(autoencoder_workdir)

    @jax.jit
    def recon(x, key):
        x = x.astype(jnp.float32) / 127.5 - 1.0
        z = autoencoder.encode(params, ae, x)[0]
        z = z + latent_noise * jnp.std(z) * jax.random.normal(key, z.shape)
        y = autoencoder.decode(params, ae, z)
        return jnp.clip(jnp.round((y + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    keys = jax.random.split(jax.random.PRNGKey(0), (len(images) + 99) // 100)
    return np.concatenate(
        [np.asarray(recon(images[i : i + 100], keys[i // 100])) for i in range(0, len(images), 100)]
    )


TABLE_COLUMNS = (
    *shapes.CATEGORIES,
    "mean",
    "objects_exact",
    "recall",
    "extra",
    *(f"{a}_acc" for a in _ATTRS),
    "xy_mae_px",
    "n",
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-category accuracy of a trained judge.")
    parser.add_argument("--workdir", required=True, help="the judge's run directory")
    parser.add_argument("--n", type=int, default=1000, help="images per split")
    parser.add_argument("--splits", default="eval,heldout", help="comma-separated splits")
    parser.add_argument("--autoencoder_workdir", default=None, help="also judge reconstructions")
    parser.add_argument(
        "--latent_noise",
        default="",
        help="comma-separated levels: also judge decodes of latents + level·std(latents)·ε",
    )
    parser.add_argument("--out", default=None, help="JSON path (default WORKDIR/judge_eval.json)")
    args = parser.parse_args(argv)
    noise_levels = [float(v) for v in filter(None, args.latent_noise.split(","))]

    from flash_jax.eval import metrics

    params, config = load_judge(args.workdir)
    run_config = read_json(Path(args.workdir) / "config.json")
    seed, size = run_config["data"]["seed"], run_config["data"]["image_size"]
    rows: dict[str, dict[str, float]] = {}
    for split in filter(None, args.splits.split(",")):
        t = time.time()
        images, labels = real_examples(split, args.n, seed, size)
        rows[f"{split} (real)"] = evaluate_judge(params, images, labels, config)
        if args.autoencoder_workdir:
            recon = _reconstruct(args.autoencoder_workdir, images)
            rows[f"{split} (VAE recon)"] = evaluate_judge(params, recon, labels, config)
            for level in noise_levels:
                noisy = _reconstruct(args.autoencoder_workdir, images, level)
                rows[f"{split} (VAE recon, latent noise {level:g})"] = evaluate_judge(
                    params, noisy, labels, config
                )
        print(f"{split}: {time.time() - t:.1f} s", flush=True)
    print(metrics.markdown_table(rows, TABLE_COLUMNS))
    out = Path(args.out) if args.out else Path(args.workdir) / "judge_eval.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
