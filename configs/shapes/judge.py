"""The testbed's judge: an attribute classifier trained on the exact labels (flash_jax/eval/judge.py).

  python -m flash_jax.main --config configs/shapes/judge.py --workdir runs/shapes/judge
  python -m flash_jax.eval.judge --workdir runs/shapes/judge      # per-category accuracy table
Variants: "quick" (a short smoke run), "tiny" (tiny model, for tests).
"""

import ml_collections

from configs import run


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = run.flags(arg, ("quick", "tiny"), "configs/shapes/judge.py")
    c = run.training(
        "judge",
        batch_size=32,
        total_steps=6000,
        checkpoint_every=500,
        log_every=25,
        sample_every=10**9,  # the judge draws no samples
        num_samples=1,
        ema_decay=0.999,
    )
    c.optimizer = run.optimizer(learning_rate=1e-3, warmup_steps=100)
    c.model = ml_collections.ConfigDict(
        dict(
            judge=dict(
                stem=32,  # channels of a full-resolution conv first (0: none): textures
                channels=(48, 96),  # per stride-2 stage; grid = image_size / 2**len = 8
                features=96,  # last conv: feeds the heads; its mean is the FD-judge feature
                remat=False,  # rematerialise stages in the backward pass
            )
        )
    )
    c.judge_loss = ml_collections.ConfigDict(
        dict(
            object_weight=1.0,  # object-centre BCE, summed over cells
            attribute_weight=1.0,  # color / shape / texture / size CE, in object cells
            offset_weight=1.0,  # L1 of the centroid within its cell (cell units)
        )
    )
    c.channel_permute_fraction = 0.5  # images with permuted RGB (no color loss): color invariance
    if "quick" in variants:
        c.total_steps, c.checkpoint_every, c.log_every = 300, 300, 25
    if "tiny" in variants:
        c.data.image_size = 16
        c.model.judge.update(stem=4, channels=(8, 8), features=16)  # 4x4 grid
        c.batch_size, c.total_steps, c.log_every = 4, 6, 1
        c.checkpoint_every, c.num_samples = 3, 1
    c.lock()
    return c
