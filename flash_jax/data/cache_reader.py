"""Reading a latent cache (written by `python -m flash_jax.data.cache`, flash_jax/data/cache.py,
which documents its records): its recorded image size and the Grain pipeline over a split."""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from flash_jax.data import datasets

BUILDER_NAME = "flash_jax_latent_cache"


def stored_image_size(data_dir: str | os.PathLike) -> int | None:
    """The image size a prepared cache was written at (None: not recorded)."""
    prepared = datasets.find_prepared(data_dir, BUILDER_NAME)
    info = tfds.builder_from_directory(os.fspath(prepared)).info
    return info.metadata.get("image_size") if info.metadata else None


def _cache_example(example: dict[str, Any]) -> dict[str, Any]:
    caption = example["caption"]
    out = {k: np.asarray(v) for k, v in example.items() if k != "caption"}
    out["caption"] = caption.decode() if isinstance(caption, bytes) else str(caption)
    return out


def make_cache_dataset(
    data_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    seed: int,
    image_size: int,
    **kwargs: Any,
) -> grain.IterDataset:
    """Batches of a cache split for this host's shard: the stored arrays with a leading batch
    axis (floats as stored), `caption <U (B,)`, `index int64 (B,)`. `kwargs` as in
    `datasets.make_pipeline`.

    Raises:
      ValueError: the cache was written for another image size than `image_size`
        (config.data.image_size).
    """
    cached_size = stored_image_size(data_dir)
    if cached_size != image_size:
        raise ValueError(
            f"the cache at {data_dir} holds {cached_size}px images, but "
            f"config.data.image_size={image_size} (0: take the cache's, cache.resolve_image_size)"
        )
    source = datasets.tfds_source(data_dir, split, BUILDER_NAME)
    return datasets.make_pipeline(source, batch_size, seed, _cache_example, **kwargs)
