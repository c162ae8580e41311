"""User image–caption datasets (COCO / LAION style) as TFDS `array_record`, and their Grain pipeline.

No TensorFlow is needed, to write or to read. The input is a folder in one of three layouts:

  listings     FOLDER/<split>.jsonl   one JSON object per line: {"image": "images/0001.jpg",
                                      "caption": "..."}; any `<split>.jsonl` becomes a split
               FOLDER/<split>.tsv     or: `path<TAB>caption` per line
  imagefolder  FOLDER/metadata.jsonl  Hugging Face imagefolder: {"file_name": ..., "text": ...}
               per line, the split "train"; or FOLDER/<split>/metadata.jsonl, one per split
  sidecars     FOLDER/<split>/0001.jpg + FOLDER/<split>/0001.txt (the caption), one folder per
               split; or the images and .txt files in FOLDER itself, the split "train"

The first layout found, in that order, is the folder's (they are not mixed). Image paths are
relative to the listing's folder (or absolute). `build_image_caption_tfds(FOLDER, DATA_DIR)`
writes every split in listing order (sidecars: file name order), storing each image file's
original bytes (JPEG, PNG, WebP...: no re-encoding; every file is decoded once to check it), its
caption and its record number, with a fingerprint of the listing (`listing_fingerprint`): building
again after the listing, a caption or an image changed rebuilds the dataset.

`make_caption_dataset` reads a split through the same Grain pipeline as the Shapes data
(`datasets.make_pipeline`): per-host shard, shuffle, repeat, then per record decode -> RGB ->
resize the shorter side to `image_size` (bicubic) -> centre crop, and batch. Batches have the
Shapes layout that every method reads: `image uint8 (B, S, S, 3)`, `caption <U (B,)`,
`index int64 (B,)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from flash_jax.data import datasets

BUILDER_NAME = "flash_jax_image_captions"
METADATA = "metadata.jsonl"  # Hugging Face imagefolder's listing
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _json_record(line: str, where: str, keys: tuple[str, str]) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict) or not set(keys) <= set(record):
        raise ValueError(f"{where}: need an object with {' and '.join(map(repr, keys))} keys")
    image, caption = (record[k] for k in keys)
    if not isinstance(image, str) or not isinstance(caption, str):
        raise ValueError(f"{where}: {keys[0]!r} and {keys[1]!r} must be strings, got {record}")
    return image, caption


def _sidecar_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_listing(path: str | os.PathLike) -> Iterator[tuple[Path, str]]:
    """`(image path, caption)` per record of a listing: a `.jsonl` / `.tsv` file, an imagefolder
    `metadata.jsonl`, or a folder of images with `.txt` sidecars (module docstring). Paths are
    resolved against the listing's folder; blank lines are skipped.

    Raises:
      ValueError: a malformed line (naming the file and line number), a caption that is not a
        string, an image without its `.txt`.
    """
    path = Path(path)
    if path.is_dir():
        for image in _sidecar_images(path):
            sidecar = image.with_suffix(".txt")
            if not sidecar.is_file():
                raise ValueError(f"{image}: no caption file {sidecar.name} beside it")
            yield image, sidecar.read_text(encoding="utf-8").strip()
        return
    keys = ("file_name", "text") if path.name == METADATA else ("image", "caption")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            if path.suffix == ".jsonl":
                name, caption = _json_record(line, where, keys)
            else:
                fields = line.rstrip("\n").split("\t")
                if len(fields) != 2:
                    raise ValueError(f"{where}: need `path<TAB>caption`, got {len(fields)} fields")
                name, caption = fields
            yield path.parent / name, caption


def _split_name(path: Path, split: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", split):
        raise ValueError(f"{path}: split name {split!r} must be lowercase letters/digits/_")
    return split


def find_listings(folder: str | os.PathLike) -> dict[str, Path]:
    """`{split: listing}` of `folder` in the first layout it has (module docstring): listing
    files, else imagefolder `metadata.jsonl` files, else folders of images with sidecars."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images and captions")
    found: dict[str, Path] = {}
    files = [*folder.glob("*.jsonl"), *folder.glob("*.tsv")]
    for path in sorted(p for p in files if p.name != METADATA):
        split = _split_name(path, path.stem)
        if split in found:
            raise ValueError(f"{folder}: split {split!r} listed twice ({found[split]}, {path})")
        found[split] = path
    if found:
        return found
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if (folder / METADATA).is_file():
        found["train"] = folder / METADATA
    found |= {_split_name(p, p.name): p / METADATA for p in subfolders if (p / METADATA).is_file()}
    if found:
        return found
    if _sidecar_images(folder):
        return {"train": folder}
    found = {_split_name(p, p.name): p for p in subfolders if _sidecar_images(p)}
    if not found:
        raise FileNotFoundError(
            f"{folder}: no <split>.jsonl or <split>.tsv listing, no {METADATA}, no images with "
            ".txt captions"
        )
    return found


def listing_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over every split's records: image path (relative to `folder`), caption, and the
    image file's size and modification time. It changes when a record, a caption or an image
    does.

    Raises:
      ValueError: a listed image that does not exist, naming the listing and record.
    """
    folder = Path(folder).absolute()
    digest = hashlib.sha256()
    for split, listing in sorted(find_listings(folder).items()):
        digest.update(f"split {split}\n".encode())
        for i, (image, caption) in enumerate(read_listing(listing)):
            try:
                stat = (folder / image).stat()
            except OSError as e:
                raise ValueError(f"{listing} record {i}: cannot read image {image}: {e}") from None
            name = os.path.relpath(folder / image, folder)
            line = json.dumps([name, caption, stat.st_size, stat.st_mtime_ns])
            digest.update(line.encode() + b"\n")
    return digest.hexdigest()


@dataclasses.dataclass(eq=False)
class ImageCaptionConfig(tfds.core.BuilderConfig):
    """The folder whose listings and images are written, and its `listing_fingerprint`."""

    source_dir: str = ""
    fingerprint: str = ""


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
            metadata=tfds.core.MetadataDict(
                source_dir=self.builder_config.source_dir,
                fingerprint=self.builder_config.fingerprint,
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        listings = find_listings(self.builder_config.source_dir)
        return {split: self._generate_examples(path) for split, path in listings.items()}

    def _generate_examples(self, listing: Path):
        for i, (path, caption) in enumerate(read_listing(listing)):
            try:
                data = path.read_bytes()
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"{listing} record {i}: cannot read image {path}: {e}") from None
            yield i, {"image": data, "caption": caption, "index": i}


def build_image_caption_tfds(source_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Writes every split listed in `source_dir` under `data_dir`; returns the prepared dataset
    directory (pass it as `config.data.data_dir`). A dataset prepared there from the same listing
    (`listing_fingerprint`) is kept; one prepared from an earlier state of the listing is rebuilt.

    Raises:
      ValueError: the directory holds a dataset of another folder of the same name.
    """
    source_dir = Path(source_dir).absolute()
    name = re.sub(r"[^\w.-]", "_", source_dir.name) or "images"
    config = ImageCaptionConfig(
        name=name, source_dir=os.fspath(source_dir), fingerprint=listing_fingerprint(source_dir)
    )
    builder = ImageCaptionBuilder(data_dir=os.fspath(data_dir), config=config)
    prepared = Path(builder.data_dir)
    if (prepared / "dataset_info.json").is_file():
        stored = dict(tfds.builder_from_directory(os.fspath(prepared)).info.metadata or {})
        if stored.get("source_dir") != config.source_dir:
            raise ValueError(
                f"{prepared} holds the dataset of {stored.get('source_dir', 'another folder')}, "
                f"not of {source_dir}: pass another data_dir"
            )
        if stored.get("fingerprint") == config.fingerprint:
            return prepared
        logging.warning("%s: the listing or its images changed since %s was built: rebuilding",
                        source_dir, prepared)  # fmt: skip
        shutil.rmtree(prepared)
        builder = ImageCaptionBuilder(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare()
    return prepared


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
    shard; `kwargs` as in `datasets.make_pipeline` (shard_index, shuffle, num_epochs, ...)."""
    source = datasets.tfds_source(data_dir, split, BUILDER_NAME)
    transform = functools.partial(_decode_example, image_size=image_size)
    return datasets.make_pipeline(source, batch_size, seed, transform=transform, **kwargs)
