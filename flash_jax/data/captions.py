"""User image–caption datasets (COCO / LAION style) as TFDS `array_record`, and their Grain pipeline.

No TensorFlow is needed, to write or to read. The input is a folder with one listing per split:

  FOLDER/train.jsonl   one JSON object per line: {"image": "images/0001.jpg", "caption": "..."}
  FOLDER/eval.jsonl    (any `<split>.jsonl` becomes a split)
  FOLDER/<split>.tsv   or: `path<TAB>caption` per line

Image paths are relative to FOLDER (or absolute). `build_image_caption_tfds(FOLDER, DATA_DIR)`
writes every split in listing order, storing each image file's original bytes (JPEG, PNG, WebP...:
no re-encoding; every file is decoded once to check it), its caption and its line number.

`make_caption_dataset` reads a split through the same Grain pipeline as the Shapes data
(`sources.make_pipeline`): per-host shard, shuffle, repeat, then per record decode -> RGB ->
resize the shorter side to `image_size` (bicubic) -> centre crop, and batch. Batches have the
Shapes layout that every method reads: `image uint8 (B, S, S, 3)`, `caption <U (B,)`,
`index int64 (B,)`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from flash_jax.data import sources

BUILDER_NAME = "flash_jax_image_captions"


def read_listing(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """`(image path, caption)` per line of a `.jsonl` or `.tsv` listing (blank lines skipped).

    Raises:
      ValueError: a malformed line, naming the file and line number.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not JSON ({e})") from None
                if not isinstance(record, dict) or not {"image", "caption"} <= set(record):
                    raise ValueError(f'{where}: need an object with "image" and "caption" keys')
                yield str(record["image"]), str(record["caption"])
            else:
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{where}: need `path<TAB>caption`, got {len(fields)} fields")
                yield fields[0], fields[1]


def find_listings(folder: str | os.PathLike) -> dict[str, Path]:
    """`{split: listing file}` for the `<split>.jsonl` / `<split>.tsv` files in `folder`."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for path in sorted([*folder.glob("*.jsonl"), *folder.glob("*.tsv")]):
        split = path.stem
        if not re.fullmatch(r"[a-z][a-z0-9_]*", split):
            raise ValueError(f"{path}: split name {split!r} must be lowercase letters/digits/_")
        if split in found:
            raise ValueError(f"{folder}: split {split!r} listed twice ({found[split]}, {path})")
        found[split] = path
    if not found:
        raise FileNotFoundError(f"{folder}: no <split>.jsonl or <split>.tsv listing")
    return found


@dataclasses.dataclass(eq=False)
class ImageCaptionConfig(tfds.core.BuilderConfig):
    """The folder whose listings and images are written."""

    source_dir: str = ""


class ImageCaptionBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for a folder of images + caption listings (module docstring); record i of a
    split is non-blank line i of its listing (no TFDS shuffling)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: dict[str, str] = {"1.0.0": "Initial release."}  # noqa: RUF012
    code_path = None  # nothing is downloaded: no checksums file (see sources.ShapesBuilder)

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Images (original encoded bytes) with captions.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.bytes_),
                    "caption": tfds.features.Text(),
                    "index": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        listings = find_listings(self.builder_config.source_dir)
        return {split: self._generate_examples(path) for split, path in listings.items()}

    def _generate_examples(self, listing: Path):
        folder = Path(self.builder_config.source_dir)
        for i, (name, caption) in enumerate(read_listing(listing)):
            path = folder / name
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"{listing} record {i}: cannot read image {path}: {e}") from None
            yield i, {"image": data, "caption": caption, "index": i}


def build_image_caption_tfds(source_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Writes every split listed in `source_dir` under `data_dir`; returns the prepared dataset
    directory (pass it as `config.data.data_dir`). Idempotent: a prepared dataset is kept."""
    source_dir = Path(source_dir).absolute()
    name = re.sub(r"[^\w.-]", "_", source_dir.name) or "images"
    config = ImageCaptionConfig(name=name, source_dir=os.fspath(source_dir))
    builder = ImageCaptionBuilder(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 `(image_size, image_size, 3)`: RGB, shorter side resized to
    `image_size` (bicubic; no resize when it already is), centre crop of the longer side."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    w, h = image.size
    if min(w, h) != image_size:
        scale = image_size / min(w, h)
        w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)


def _decode_example(example: dict[str, Any], image_size: int) -> dict[str, Any]:
    caption = example["caption"]
    return {
        "image": decode_image(example["image"], image_size),
        "caption": caption.decode() if isinstance(caption, bytes) else str(caption),
        "index": np.int64(example["index"]),
    }


def make_caption_dataset(
    data_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    seed: int,
    image_size: int,
    **kwargs: Any,
) -> grain.IterDataset:
    """Batches of a prepared image–caption split (layout in the module docstring), for this host's
    shard; `kwargs` as in `sources.make_pipeline` (shard_index, shuffle, num_epochs, ...)."""
    source = sources.tfds_source(data_dir, split, BUILDER_NAME)
    transform = functools.partial(_decode_example, image_size=image_size)
    return sources.make_pipeline(source, batch_size, seed, transform=transform, **kwargs)
