"""Reading prepared datasets, shared by every data source: a prepared TFDS `array_record`
dataset as a random-access source (no TensorFlow), and the Grain pipeline over any such source
(per-host contiguous shard -> global shuffle, reshuffled every epoch -> repeat -> per-record
transform -> batch). The order is a pure function of (seed, shard, records); iterators resume
through `get_state()` / `set_state()`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grain
import tensorflow_datasets as tfds


def find_prepared(data_dir: str | os.PathLike, builder_name: str) -> Path:
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


def tfds_source(data_dir: str | os.PathLike, split: str, builder_name: str):
    """Random-access source over a prepared split (`array_record`, no TensorFlow).

    `data_dir` is the directory a builder's build function returned (`sources.build_shapes_tfds`,
    `captions.build_image_caption_tfds`, `cache.write_cache`), or a root holding exactly one
    `builder_name` dataset. Elements come out as stored
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
    batch. Arguments as in `sources.make_shapes_dataset` (`num_records`: use only the first ones);
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
