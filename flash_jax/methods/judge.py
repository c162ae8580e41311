"""Trains the testbed's judge (flash_jax/eval/judge.py) on the exact labels of the train split.

The judge reads color and shape independently per object, so it also recognises the (color, shape)
pairs held out from training; `permute_channels` (color-invariance augmentation) keeps its shape,
texture and size heads from leaning on color. Report: `evaluate_judge` (re-exported here) or
`python -m flash_jax.eval.judge --workdir WORKDIR`.

config reads: model.judge (`JudgeConfig` fields), judge_loss.* (head weights),
channel_permute_fraction, data.image_size.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flash_jax.eval import judge
from flash_jax.eval.judge import evaluate_judge  # noqa: F401 - re-exported: the judge's report
from flash_jax.methods import Method

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
