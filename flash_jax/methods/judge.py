"""Trains the testbed's judge (flash_jax/eval/judge.py) on the exact labels of the Shapes records.

The judge has one output per (color, shape) pair, so it can only recognise pairs it was trained on.
The held-out pairs are held out from the MODELS UNDER TEST (teacher, students), not from their
evaluator: a fraction `heldout_fraction` of each training batch is replaced by records of the
"heldout" split at indices `HELDOUT_TRAIN_OFFSET + i`, disjoint from the held-out records that are
evaluated (indices below the offset). The replacement is a pure function of the record index, so
runs stay deterministic and resumable.

config reads: model.judge (`JudgeConfig` fields), judge_loss.* (head weights),
channel_permute_fraction, heldout_fraction, data.seed, data.image_size.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flash_jax.data import shapes
from flash_jax.eval import judge
from flash_jax.eval.judge import evaluate_judge  # noqa: F401 - re-exported: the judge's report
from flash_jax.methods import Method

HELDOUT_TRAIN_OFFSET = 10_000_000  # held-out records judged in evaluation are below this index
_LABEL_KEYS = (
    "object_present",
    "object_color",
    "object_shape",
    "object_texture",
    "object_size",
    "object_xy",
)


def heldout_mask(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which records (by train index) are swapped for held-out-split records: a fixed hash of the
    index, true for about `fraction` of indices."""
    h = (np.asarray(index, np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    return h < np.uint64(int(fraction * (1 << 32)))


def mix_heldout(raw: dict, fraction: float, seed: int, image_size: int) -> dict:
    """`raw` (a batch, `sources` layout) with the `heldout_mask` records replaced by held-out-split
    records `HELDOUT_TRAIN_OFFSET + index` (image and labels); other fields are left alone."""
    swap = np.flatnonzero(heldout_mask(raw["index"], fraction))
    if swap.size == 0:
        return raw
    out = {k: np.array(raw[k]) for k in ("image", *_LABEL_KEYS)}
    for i in swap:
        ex = shapes.make_example(
            seed, "heldout", HELDOUT_TRAIN_OFFSET + int(raw["index"][i]), image_size
        )
        for k in out:
            out[k][i] = ex[k]
    return {**raw, **out}


_PERMUTATIONS = np.array(list(itertools.permutations(range(3)))[1:])  # the 5 non-identity ones


def permute_channels(
    images: jax.Array, rng: jax.Array, fraction: float
) -> tuple[jax.Array, jax.Array]:
    """Color-invariance augmentation: a random `fraction` of the images `(B, H, W, 3)` get a random
    non-identity RGB channel permutation. The testbed's backgrounds are grey and its textures are
    shades of the object color, so only the colors change: shape, texture, size and position
    targets stay right, and the color loss is switched off for those images.

    Returns `(images, color_mask (B,) float32)`, the mask 0 where the colors were permuted.
    """
    k_pick, k_perm = jax.random.split(rng)
    b = images.shape[0]
    pick = jax.random.bernoulli(k_pick, fraction, (b,))
    perm = jnp.asarray(_PERMUTATIONS)[jax.random.randint(k_perm, (b,), 0, len(_PERMUTATIONS))]
    permuted = jnp.take_along_axis(images, perm[:, None, None, :], axis=-1)
    images = jnp.where(pick[:, None, None, None], permuted, images)
    return images, 1.0 - pick.astype(jnp.float32)


def make(config: ml_collections.ConfigDict) -> Method:
    jcfg = judge.JudgeConfig.from_dict(config.model.judge.to_dict())
    weights = config.judge_loss.to_dict()
    image_size = config.data.image_size
    grid = jcfg.grid(image_size)

    def prepare_batch(raw: dict) -> dict:
        if config.heldout_fraction > 0:
            raw = mix_heldout(raw, config.heldout_fraction, config.data.seed, image_size)
        return {"image": np.asarray(raw["image"]), **judge.judge_targets(raw, grid)}

    def generator_loss(params, frozen, batch, rng, disc_params=None):
        del frozen, disc_params
        images, color_mask = permute_channels(batch["image"], rng, config.channel_permute_fraction)
        outputs = judge.Judge(jcfg).apply({"params": params}, images)
        return judge.judge_loss(outputs, {**batch, "color_mask": color_mask}, **weights)

    return Method(
        init=lambda rng: judge.init_params(jcfg, rng, image_size),
        load_frozen=dict,
        generator_loss=generator_loss,
        prepare_batch=prepare_batch,
        sample=None,
    )
