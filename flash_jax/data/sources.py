"""Shapes data on disk (a tensorflow-datasets builder) and the Grain input pipeline that reads it.

Two sources give identical examples (`shapes.make_example` layout, `caption` as `str`):

- `ShapesSource`: renders record `i` on the fly — no disk, the default for quick runs.
- a TFDS `array_record` dataset written by `build_shapes_tfds` (no TensorFlow needed) and read
  through `as_data_source()` — for long runs where rendering would cost more than reading.

`make_shapes_dataset` builds the Grain pipeline over either one: per-host shard (contiguous,
equal-sized blocks of record indices) -> global shuffle (reshuffled every epoch) -> repeat ->
batch. The order is a pure function of (seed, shard, records); iterators are resumable through
`get_state()` / `set_state()` (and `grain.checkpoint.CheckpointSave/Restore` for Orbax).

A batch is a dict of numpy arrays with a leading batch axis B:
`image uint8 (B, H, W, 3)`, `caption <U (B,)`, `index int64 (B,)`, and the label arrays of
`shapes.py` (e.g. `object_color int32 (B, 3)`, `object_xy float32 (B, 3, 2)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from flash_jax.data import shapes

# Label features: name -> (shape, dtype). `image` and `caption` are added separately.
LABEL_FEATURES: dict[str, tuple[tuple[int, ...], Any]] = {
    "category": ((), np.int32),
    "num_objects": ((), np.int32),
    "object_present": ((shapes.MAX_OBJECTS,), np.bool_),
    "object_color": ((shapes.MAX_OBJECTS,), np.int32),
    "object_shape": ((shapes.MAX_OBJECTS,), np.int32),
    "object_texture": ((shapes.MAX_OBJECTS,), np.int32),
    "object_size": ((shapes.MAX_OBJECTS,), np.int32),
    "object_xy": ((shapes.MAX_OBJECTS, 2), np.float32),
    "object_mentioned": ((shapes.MAX_OBJECTS, len(shapes.ATTRIBUTES)), np.bool_),
    "relation": ((), np.int32),
    "background": ((), np.int32),
    "index": ((), np.int64),
}

DEFAULT_NUM_RECORDS = {"train": 50_000, "eval": 2_000, "heldout": 2_000}


# ------------------------------------------------------------------------------ on the fly


class ShapesSource:
    """Grain random-access source rendering `shapes.make_example(seed, split, i, image_size)`.

    Picklable and stateless, so it also works with `worker_count > 0`.
    """

    def __init__(self, split: str, num_records: int, seed: int = 0, image_size: int = 64):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {shapes.SPLITS}")
        if num_records <= 0:
            raise ValueError(f"num_records must be positive, got {num_records}")
        self.split, self.num_records, self.seed, self.image_size = (
            split,
            num_records,
            seed,
            image_size,
        )

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} out of range [0, {self.num_records})")
        return shapes.make_example(self.seed, self.split, int(index), self.image_size)

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, num_records={self.num_records}, "
            f"seed={self.seed}, image_size={self.image_size})"
        )


# ------------------------------------------------------------------------------ TFDS builder


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """What to materialise: generator seed, image size and records per split."""

    seed: int = 0
    image_size: int = 64
    num_train: int = DEFAULT_NUM_RECORDS["train"]
    num_eval: int = DEFAULT_NUM_RECORDS["eval"]
    num_heldout: int = DEFAULT_NUM_RECORDS["heldout"]

    @classmethod
    def make(
        cls, seed: int = 0, image_size: int = 64, num_records: Mapping[str, int] | None = None
    ) -> ShapesConfig:
        n = {**DEFAULT_NUM_RECORDS, **(num_records or {})}
        unknown = set(n) - set(shapes.SPLITS)
        if unknown:
            raise ValueError(f"unknown splits {sorted(unknown)}; expected {shapes.SPLITS}")
        name = f"seed{seed}_size{image_size}_n{n['train']}-{n['eval']}-{n['heldout']}"
        return cls(
            name=name,
            seed=seed,
            image_size=image_size,
            num_train=n["train"],
            num_eval=n["eval"],
            num_heldout=n["heldout"],
        )


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the Shapes testbed; record i of a split is `make_example(seed, split, i)`.

    Writes `array_record` files in index order (no TFDS shuffling), readable without TensorFlow.
    """

    name = "flash_jax_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: dict[str, str] = {"1.0.0": "Initial release."}  # noqa: RUF012
    BUILDER_CONFIGS = [ShapesConfig.make()]  # noqa: RUF012
    # tfds derives a checksums file from the code path and, doing so, imports `importlib_resources`
    # (not a dependency). Nothing is downloaded, so there are no checksums.
    code_path = None

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = {
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
        }
        for key, (shape, dtype) in LABEL_FEATURES.items():
            features[key] = tfds.features.Tensor(shape=shape, dtype=dtype)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Shapes testbed: colored textured shapes with captions and exact labels.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # record i of a split is example i
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        n = {"train": cfg.num_train, "eval": cfg.num_eval, "heldout": cfg.num_heldout}
        return {split: self._generate_examples(split, n[split]) for split in shapes.SPLITS}

    def _generate_examples(self, split: str, num_records: int):
        cfg = self.builder_config
        for i in range(num_records):
            yield i, shapes.make_example(cfg.seed, split, i, cfg.image_size)


def build_shapes_tfds(
    data_dir: str | os.PathLike,
    seed: int = 0,
    image_size: int = 64,
    num_records: Mapping[str, int] | None = None,
) -> Path:
    """Materialises the Shapes splits under `data_dir`; returns the prepared dataset directory.

    `num_records` maps split -> count (missing splits use `DEFAULT_NUM_RECORDS`). Idempotent: an
    already prepared config is left as is.
    """
    config = ShapesConfig.make(seed, image_size, num_records)
    builder = ShapesBuilder(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def find_prepared(data_dir: str | os.PathLike, builder_name: str = ShapesBuilder.name) -> Path:
    """The prepared TFDS dataset directory (the one holding `dataset_info.json`): `data_dir`
    itself, or the only `builder_name` dataset under it."""
    root = Path(data_dir)
    if (root / "dataset_info.json").exists():
        return root
    found = sorted(p.parent for p in root.glob(f"**/{builder_name}/**/dataset_info.json"))
    if len(found) != 1:
        what = f"no prepared {builder_name}" if not found else f"{len(found)} prepared datasets"
        listing = "".join(f"\n  {p}" for p in found)
        raise FileNotFoundError(
            f"{what} under {root}; pass the directory its build function returned{listing}"
        )
    return found[0]


def source_fingerprint(config: Any) -> str:
    """SHA-256 naming the records `config` (a `config.data`) reads: the generator's settings for
    Shapes rendered on the fly, else the prepared dataset's `dataset_info.json` (split sizes and
    bytes) and `metadata.json` (an image–caption dataset's listing fingerprint)."""
    if config.source == "shapes" and not config.data_dir:
        settings = {"shapes": config.seed, "image_size": config.image_size}
        return hashlib.sha256(json.dumps(settings).encode()).hexdigest()
    from flash_jax.data import cache, captions

    names = {"shapes": ShapesBuilder.name, "captions": captions.BUILDER_NAME}
    prepared = find_prepared(config.data_dir, names.get(config.source, cache.BUILDER_NAME))
    digest = hashlib.sha256()
    for name in ("dataset_info.json", "metadata.json"):
        if (prepared / name).is_file():
            digest.update((prepared / name).read_bytes())
    return digest.hexdigest()


def tfds_source(data_dir: str | os.PathLike, split: str, builder_name: str = ShapesBuilder.name):
    """Random-access source over a prepared split (`array_record`, no TensorFlow).

    `data_dir` is the directory `build_shapes_tfds` (or another builder's build function)
    returned, or a root holding exactly one `builder_name` dataset. Elements come out as stored
    (text as bytes); the pipelines normalise them.
    """
    prepared = find_prepared(data_dir, builder_name)
    builder = tfds.builder_from_directory(os.fspath(prepared))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} at {data_dir}")
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        check_record_files(builder.info.splits[split].file_instructions, prepared)
    return builder.as_data_source(split)


def check_record_files(instructions: Any, prepared: Path) -> None:
    """Raises ValueError naming the first `array_record` file of `instructions` (a split's TFDS
    file instructions) that is missing, truncated or does not hold its records; the reader would
    return empty records from it without an error."""
    from array_record.python import array_record_module

    for instruction in instructions:
        reader = array_record_module.ArrayRecordReader(os.fspath(instruction.filename))
        ok = reader.ok()
        count = reader.num_records() if ok else 0
        if ok:  # closing a reader that failed to open raises
            reader.close()
        expected = instruction.examples_in_shard
        if not ok or count != expected:
            problem = (
                f"holds {count} records, not {expected}"
                if ok
                else f"cannot be read (missing, truncated or damaged; it should hold {expected} "
                "records)"
            )
            raise ValueError(
                f"{instruction.filename}: {problem}; delete {prepared} and build the dataset again"
            )


def _normalise(example: dict[str, Any]) -> dict[str, Any]:
    out = {
        k: np.asarray(v, LABEL_FEATURES[k][1]) for k, v in example.items() if k in LABEL_FEATURES
    }
    caption = example["caption"]
    out["caption"] = caption.decode() if isinstance(caption, bytes) else str(caption)
    out["image"] = np.asarray(example["image"], np.uint8)
    return out


# ------------------------------------------------------------------------------ pipeline


def host_shard() -> tuple[int, int]:
    """`(jax.process_index(), jax.process_count())`: this host's shard of the records."""
    import jax  # the data module does not otherwise need jax

    return jax.process_index(), jax.process_count()


def shard_bounds(
    num_records: int, shard_index: int, shard_count: int, drop_remainder: bool = True
) -> tuple[int, int]:
    """`[start, stop)` of a shard: contiguous blocks; equal sizes if `drop_remainder`."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if drop_remainder:
        per = num_records // shard_count
        if per == 0:
            raise ValueError(f"{num_records} records cannot feed {shard_count} shards")
        return shard_index * per, (shard_index + 1) * per
    per, extra = divmod(num_records, shard_count)
    start = shard_index * per + min(shard_index, extra)
    return start, start + per + (shard_index < extra)


def make_pipeline(
    source: Any,
    batch_size: int,
    seed: int,
    transform: Any,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_records: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 2,
) -> grain.IterDataset:
    """The Grain pipeline over any random-access `source`: this shard's contiguous block of
    records -> global shuffle (reshuffled every epoch) -> repeat -> `transform` per record ->
    batch. Arguments as in `make_shapes_dataset` (`num_records`: use only the first ones);
    `transform` must be picklable for `worker_count > 0` (a module-level function or a
    `functools.partial` of one)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = host_shard()
    if num_records is not None and num_records > len(source):
        raise ValueError(f"asked for {num_records} records, the source has {len(source)}")
    total = len(source) if num_records is None else num_records
    start, stop = shard_bounds(total, shard_index, shard_count, drop_remainder)
    if drop_remainder and stop - start < batch_size:
        raise ValueError(f"shard of {stop - start} records is smaller than batch_size {batch_size}")
    ds = grain.MapDataset.source(source)[start:stop]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(transform)
    if worker_count > 0:
        # Workers read interleaved slices of the element stream: batching after them keeps the
        # batches identical to the single-process ones.
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        return ds.batch(batch_size, drop_remainder=drop_remainder)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size)
    return ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)


def make_shapes_dataset(
    data_dir: str | os.PathLike | None,
    split: str,
    batch_size: int,
    seed: int,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    *,
    num_records: int | None = None,
    image_size: int = 64,
    data_seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    read_threads: int = 2,
) -> grain.IterDataset:
    """The Grain pipeline of Shapes batches for this shard. `iter()` it for a resumable iterator.

    Args:
      data_dir: a prepared TFDS directory (see `tfds_source`), or None to render on the fly.
      split: "train", "eval" or "heldout".
      batch_size: examples per batch on THIS shard (per host).
      seed: shuffle seed; each epoch is reshuffled deterministically from it.
      shard_index, shard_count: this host's shard; None for `host_shard()` (jax processes).
      num_records: on the fly: records in the split (default `DEFAULT_NUM_RECORDS[split]`); on disk:
        optionally use only the first `num_records` stored ones.
      image_size, data_seed: on the fly only; the generator's image size and seed.
      shuffle: global shuffle of the shard's records (off: index order).
      num_epochs: passes over the shard; None repeats forever.
      drop_remainder: equal-sized shards and no partial final batch.
      worker_count: >0 renders/decodes in that many processes (needs absl flags parsed and a
        `__main__` guard); 0 reads in `read_threads` threads of this process.

    Returns:
      An `IterDataset` of batch dicts (layout in the module docstring). Its iterators have
      `get_state()` / `set_state(state)`; restoring a state resumes at exactly the next batch.
    """
    if data_dir is None:
        n = DEFAULT_NUM_RECORDS[split] if num_records is None else num_records
        source = ShapesSource(split, n, seed=data_seed, image_size=image_size)
        num_records = None
    else:
        source = tfds_source(data_dir, split)
    return make_pipeline(
        source,
        batch_size,
        seed,
        _normalise,
        shard_index=shard_index,
        shard_count=shard_count,
        num_records=num_records,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
        worker_count=worker_count,
        read_threads=read_threads,
    )


SOURCES = ("shapes", "captions", "cache")


def make_dataset(
    config: Any,
    batch_size: int,
    split: str = "train",
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """The pipeline `config.data` describes (keys: source, data_dir, num_records, image_size,
    seed, shuffle_seed), for this host's shard (`host_shard()` unless given).

    Sources: "shapes" (the testbed, rendered or from `data_dir`), "captions" (an image–caption
    TFDS dataset, flash_jax/data/captions.py), "cache" (latents + text embeddings written by
    flash_jax/data/cache.py; its image size must equal `config.image_size`). `num_records`
    (0 = all) limits the train split only.
    """
    kw = dict(
        shard_index=shard_index,
        shard_count=shard_count,
        num_records=(config.num_records or None) if split == "train" else None,
        shuffle=shuffle,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )
    if config.source == "shapes":
        return make_shapes_dataset(
            config.data_dir or None,
            split,
            batch_size,
            config.shuffle_seed,
            image_size=config.image_size,
            data_seed=config.seed,
            **kw,
        )
    if not config.data_dir:
        raise ValueError(f"config.data.source={config.source!r} needs config.data.data_dir")
    if config.source == "captions":
        from flash_jax.data import captions

        return captions.make_caption_dataset(
            config.data_dir, split, batch_size, config.shuffle_seed, config.image_size, **kw
        )
    if config.source == "cache":
        from flash_jax.data import cache

        return cache.make_cache_dataset(
            config.data_dir, split, batch_size, config.shuffle_seed, config.image_size, **kw
        )
    raise ValueError(f"config.data.source={config.source!r} is not one of {SOURCES}")
