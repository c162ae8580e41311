"""User image–caption folders in every layout flash_jax.data.captions reads, and the fingerprint
that keeps a prepared dataset from outliving its source: same records from a listing, a Hugging
Face imagefolder `metadata.jsonl` and `.txt` sidecars; an edited caption or image rebuilds; another
folder of the same name is refused."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flash_jax.data import captions, datasets

CAPTIONS = ["a red cat", "a blue dog", "the dog on a red mat", "photo of a cat", "a cat"]


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """`n` random 16x16 PNGs `folder/{i}.png`; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"{i}.png" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    return names


def read_split(prepared: Path, split: str) -> list[tuple[bytes, str]]:
    source = datasets.tfds_source(prepared, split, captions.BUILDER_NAME)
    return [
        (bytes(r["image"]), r["caption"].decode()) for r in (source[i] for i in range(len(source)))
    ]


@pytest.fixture
def three_layouts(tmp_path) -> dict[str, Path]:
    """The same 3 train + 2 eval records as a jsonl listing, an imagefolder and sidecars."""
    listing, imagefolder, sidecars = (tmp_path / n for n in ("listing", "imagefolder", "sidecars"))
    splits = {"train": range(3), "eval": range(3, 5)}
    for split, rows in splits.items():
        names = write_images(imagefolder / split, len(rows), seed=rows[0])
        meta = [
            json.dumps({"file_name": n, "text": CAPTIONS[i]})
            for n, i in zip(names, rows, strict=True)
        ]
        (imagefolder / split / "metadata.jsonl").write_text("\n".join(meta) + "\n")
        write_images(sidecars / split, len(rows), seed=rows[0])
        for name, i in zip(names, rows, strict=True):
            (sidecars / split / name).with_suffix(".txt").write_text(CAPTIONS[i] + "\n")
        write_images(listing / "img" / split, len(rows), seed=rows[0])
        lines = [json.dumps({"image": f"img/{split}/{n}", "caption": CAPTIONS[i]})
                 for n, i in zip(names, rows, strict=True)]  # fmt: skip
        (listing / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"listing": listing, "imagefolder": imagefolder, "sidecars": sidecars}


def test_imagefolder_and_sidecars_give_the_listing_records(three_layouts, tmp_path):
    got = {
        name: {s: read_split(captions.build_image_caption_tfds(folder, tmp_path / name), s)
               for s in ("train", "eval")}
        for name, folder in three_layouts.items()
    }  # fmt: skip
    assert [c for _, c in got["listing"]["train"]] == CAPTIONS[:3]
    assert [c for _, c in got["listing"]["eval"]] == CAPTIONS[3:]
    assert got["imagefolder"] == got["listing"] == got["sidecars"]
    # One split at the top: metadata.jsonl or images + .txt in the folder itself is "train".
    top = three_layouts["sidecars"] / "train"
    assert captions.find_listings(top) == {"train": top}
    assert captions.find_listings(three_layouts["imagefolder"] / "eval") == {
        "train": three_layouts["imagefolder"] / "eval" / "metadata.jsonl"
    }


def test_layout_errors_name_the_file(tmp_path):
    write_images(tmp_path / "side", 2)
    (tmp_path / "side" / "0.txt").write_text("a cat")
    with pytest.raises(ValueError, match=r"1\.png: no caption file 1\.txt"):
        list(captions.read_listing(tmp_path / "side"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: need an object with 'file_name'"):
        list(captions.read_listing(tmp_path / "hf" / "metadata.jsonl"))
    (tmp_path / "train.jsonl").write_text('{"image": "0.png", "caption": null}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:1: 'image' and 'caption' must be strings"):
        list(captions.read_listing(tmp_path / "train.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images with \.txt captions"):
        captions.find_listings(tmp_path / "empty")


def test_a_changed_source_rebuilds_the_prepared_dataset(three_layouts, tmp_path):
    folder, out = three_layouts["sidecars"], tmp_path / "tfds"
    prepared = captions.build_image_caption_tfds(folder, out)
    before = read_split(prepared, "train")
    info = (prepared / "dataset_info.json").stat().st_mtime_ns
    assert captions.build_image_caption_tfds(folder, out) == prepared  # unchanged: kept
    assert (prepared / "dataset_info.json").stat().st_mtime_ns == info

    (folder / "train" / "1.txt").write_text("a blue cat")  # an edited caption
    assert captions.build_image_caption_tfds(folder, out) == prepared
    after = read_split(prepared, "train")
    assert [c for _, c in after] == [CAPTIONS[0], "a blue cat", CAPTIONS[2]]

    write_images(folder / "train", 1, seed=9)  # an image replaced (same name, same caption)
    os.utime(folder / "train" / "0.png", ns=(1, 1))  # even with an old modification time
    captions.build_image_caption_tfds(folder, out)
    rebuilt = read_split(prepared, "train")
    assert rebuilt[0][0] == (folder / "train" / "0.png").read_bytes() != before[0][0]
    assert rebuilt[1:] == after[1:]


def test_another_folder_of_the_same_name_is_refused(three_layouts, tmp_path):
    out = tmp_path / "tfds"
    prepared = captions.build_image_caption_tfds(three_layouts["sidecars"] / "train", out)
    other = tmp_path / "elsewhere" / "train"
    write_images(other, 1, seed=5)
    (other / "0.txt").write_text("a dog")
    with pytest.raises(ValueError, match=r"holds the dataset of .*sidecars/train, not of .*"):
        captions.build_image_caption_tfds(other, out)
    assert [c for _, c in read_split(prepared, "train")] == CAPTIONS[:3]  # left as it was
