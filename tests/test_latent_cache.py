"""Input at scale, end to end on a tiny dataset built here: PNG files + caption listings ->
image–caption TFDS dataset -> latent cache written with a tiny SD-shaped VAE / CLIP text encoder
(loaded from a diffusers folder) -> the Imagine Flash trainer reading the cache."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs.sd import sd15_imagine_flash
from flash_jax import t2i
from flash_jax.data import cache, captions, datasets, sources
from flash_jax.train import loop
from tests import tiny_sd

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a red cat",
    "a blue dog",
    "photo of a cat on the mat",
    "the dog on a red mat",
    "a blue cat",
    "photo of the red dog",
    "a cat",
    "a dog on the mat",
]
SIZES = [(16, 16), (24, 16), (16, 30), (40, 40), (17, 23), (16, 16), (32, 20), (20, 32)]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """6 train + 2 eval PNGs of assorted sizes and modes, listed in train.jsonl / eval.tsv."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "img").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if i == 3 else "RGB")
        image.save(folder / "img" / f"{i}.png")
    lines = [json.dumps({"image": f"img/{i}.png", "caption": CAPTIONS[i]}) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    (folder / "eval.tsv").write_text("".join(f"img/{i}.png\t{CAPTIONS[i]}\n" for i in (6, 7)))
    return folder


@pytest.fixture(scope="module")
def image_tfds(image_folder, tmp_path_factory):
    return captions.build_image_caption_tfds(image_folder, tmp_path_factory.mktemp("tfds"))


def test_decode_image_resizes_the_short_side_and_centre_crops():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(captions.decode_image(png(square), 16), square)
    wide = rng.integers(0, 256, (16, 40, 3), dtype=np.uint8)  # short side already 16: crop only
    np.testing.assert_array_equal(captions.decode_image(png(wide), 16), wide[:, 12:28])
    tall = rng.integers(0, 256, (41, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(captions.decode_image(png(tall), 16), tall[12:28])
    flat = np.full((30, 50, 3), (10, 200, 30), np.uint8)  # any resize keeps a flat colour
    np.testing.assert_array_equal(captions.decode_image(png(flat), 16), flat[:16, :16])
    grey = Image.fromarray(square[..., 0], "L")
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    out = captions.decode_image(buf.getvalue(), 16)
    np.testing.assert_array_equal(out, np.repeat(square[..., :1], 3, axis=-1))


def test_image_caption_dataset(image_folder, image_tfds):
    ds = captions.make_caption_dataset(
        image_tfds, "train", 3, seed=0, image_size=16, shuffle=False, num_epochs=1,
        shard_index=0, shard_count=1,
    )  # fmt: skip
    batches = list(ds)
    assert [b["image"].shape for b in batches] == [(3, 16, 16, 3)] * 2
    assert [c for b in batches for c in b["caption"]] == CAPTIONS[:6]
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), range(6))
    first = np.asarray(Image.open(image_folder / "img" / "0.png"))
    np.testing.assert_array_equal(batches[0]["image"][0], first)  # 16x16: stored losslessly
    evals = next(iter(captions.make_caption_dataset(image_tfds, "eval", 2, 0, 16, shard_count=1,
                                                    shard_index=0)))  # fmt: skip
    assert sorted(evals["caption"]) == sorted(CAPTIONS[6:])
    # Per-host shards are disjoint, equal and cover the split.
    shards = [
        next(iter(captions.make_caption_dataset(
            image_tfds, "train", 3, 0, 16, shard_index=i, shard_count=2, shuffle=False
        )))["index"]
        for i in range(2)
    ]  # fmt: skip
    assert sorted(np.concatenate(shards)) == list(range(6))


def test_bad_listings_are_reported(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"image": "missing.png", "caption": "a cat"}\n')
    with pytest.raises(ValueError, match=r"record 0: cannot read image .*missing\.png"):
        captions.build_image_caption_tfds(tmp_path, tmp_path / "out")
    (tmp_path / "train.jsonl").write_text('{"caption": "a cat"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:1: need an object"):
        list(captions.read_listing(tmp_path / "train.jsonl"))
    (tmp_path / "eval.tsv").write_text("a.png\tb\tc\n")
    with pytest.raises(ValueError, match=r"eval\.tsv:1: need `path<TAB>caption`, got 3"):
        list(captions.read_listing(tmp_path / "eval.tsv"))
    with pytest.raises(FileNotFoundError, match=r"nothing: no such folder"):
        captions.find_listings(tmp_path / "nothing")


@pytest.fixture(scope="module")
def sd_config(tmp_path_factory, image_tfds):
    """configs/sd/sd15_imagine_flash.py with the tiny SD1.5-shaped model and a few steps."""
    folder = tmp_path_factory.mktemp("tiny_sd15")
    dicts = tiny_sd.write_pipeline(folder, "sd15")
    config = sd15_imagine_flash.get_config("1")
    with config.unlocked():
        for part, value in dicts.items():
            config.model[part] = value
        config.model.update(pretrained=str(folder), dtype="float32", remat=False)
        config.data.update(source="captions", data_dir=str(image_tfds), image_size=16)
        config.update(batch_size=2, total_steps=2, log_every=1, checkpoint_every=2)
        config.update(sample_every=2, num_samples=2)
        config.imagine_flash.update(teacher_steps=1, disc_width=8)
    return config


@pytest.fixture(scope="module")
def latent_cache(sd_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    # batch 4 over 6 train records: the last batch is padded and trimmed.
    return cache.write_cache(sd_config, out, ("train", "eval"), batch_size=4, dtype="float32")


def test_cache_holds_the_encodings_in_source_order(sd_config, image_tfds, latent_cache):
    model = t2i.T2I.from_config(sd_config)
    frozen = model.load_pretrained(("text", "vae"))
    stored = datasets.tfds_source(latent_cache, "train", cache.BUILDER_NAME)
    records = [stored[i] for i in range(len(stored))]
    assert [int(r["index"]) for r in records] == list(range(6))
    assert [r["caption"].decode() for r in records] == CAPTIONS[:6]
    raw = next(iter(captions.make_caption_dataset(
        image_tfds, "train", 6, 0, 16, shuffle=False, shard_index=0, shard_count=1
    )))  # fmt: skip
    mean, std = jax.jit(model.latent_moments)(frozen["vae"], raw["image"])
    tokens = model.tokenizer()(list(raw["caption"]))
    embeds, pooled = jax.jit(model.embed_prompts)(frozen["text"], tokens)
    stack = lambda k: np.stack([r[k] for r in records])  # noqa: E731
    np.testing.assert_allclose(stack("latent_mean"), mean, atol=1e-6)
    np.testing.assert_allclose(stack("latent_std"), std, rtol=1e-6)
    np.testing.assert_allclose(stack("prompt_embeds"), embeds, atol=1e-6)
    np.testing.assert_allclose(stack("pooled_prompt_embeds"), pooled, atol=1e-6)
    np.testing.assert_array_equal(stack("tokens"), tokens)

    # A cached batch samples exactly the latents that encoding its images with the same key does.
    batch = {"latent_mean": stack("latent_mean"), "latent_std": stack("latent_std")}
    key = jax.random.key(3)
    np.testing.assert_allclose(
        model.batch_latents(None, batch, key),
        model.to_latents(frozen["vae"], raw["image"], key),
        atol=1e-5,
    )
    context, _ = model.conditioning(None, {**batch, "prompt_embeds": stack("prompt_embeds"),
                                           "pooled_prompt_embeds": stack("pooled_prompt_embeds")})  # fmt: skip
    np.testing.assert_allclose(context, embeds, atol=1e-6)


def test_cached_data_errors(sd_config, latent_cache):
    config = sd_config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(source="cache", data_dir=str(latent_cache), image_size=32)
    with pytest.raises(ValueError, match=r"16px images, but config\.data\.image_size=32"):
        sources.make_dataset(config.data, 2)
    with pytest.raises(ValueError, match=r"config\.data\.source='cache'"):
        cache.write_cache(config, latent_cache.parent / "again")
    model = t2i.T2I.from_config(sd_config)
    raw = {"latent_mean": np.zeros((2, 8, 8, 3)), "latent_std": np.zeros((2, 8, 8, 3)),
           "prompt_embeds": np.zeros((2, 16, 24)), "pooled_prompt_embeds": np.zeros((2, 32)),
           "tokens": np.zeros((2, 16), np.int32)}  # fmt: skip
    with pytest.raises(ValueError, match=r"3 channels[\s\S]*cross_attention_dim"):
        t2i.prepare_batch(raw, model.tokenizer(), model)


@pytest.mark.slow  # compiles the Imagine Flash step and its sampler (~40 s here)
def test_trainer_runs_on_the_cache(sd_config, latent_cache, tmp_path):
    config = sd_config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(source="cache", data_dir=str(latent_cache))
    state = loop.train(config, tmp_path)
    assert int(state.step) == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["finite"] == 1.0 and np.isfinite(r["srl"]) and "disc_loss" in r for r in records)
    assert (tmp_path / "samples" / "step_0000002.png").is_file()


def test_cache_command_line_coexists_with_the_trainer_flags():
    """The cache job's flags are defined only when it runs as a program: the trainer imports the
    module (for source="cache") next to flash_jax.main's own --config."""
    code = "import flash_jax.main, flash_jax.data.cache"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    help_text = subprocess.run(  # absl's --helpshort exits with status 1
        [sys.executable, "-m", "flash_jax.data.cache", "--helpshort"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "--out" in help_text and "--dtype" in help_text


def test_image_size_zero_is_the_caches_or_the_models(sd_config, latent_cache):
    config = sd_config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(source="cache", data_dir=str(latent_cache), image_size=0)
    cache.resolve_image_size(config)
    assert config.data.image_size == 16  # what the cache was written at
    config.data.update(source="captions", image_size=0)
    config.model.unet.sample_size = 12  # metadata only: the nominal latent side
    cache.resolve_image_size(config)  # the cache job: the UNet's sample_size x the VAE's factor 2
    assert config.data.image_size == 24


def test_a_cache_of_a_changed_source_is_refused(sd_config, image_folder, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    config = sd_config.copy_and_resolve_references()
    config.data.data_dir = str(captions.build_image_caption_tfds(folder, tmp_path / "tfds"))
    out = tmp_path / "cache"
    prepared = cache.write_cache(config, out, ("eval",), batch_size=2)
    files = {p: p.stat().st_mtime_ns for p in prepared.iterdir()}
    assert cache.write_cache(config, out, ("eval",), batch_size=2) == prepared  # same: kept
    assert {p: p.stat().st_mtime_ns for p in prepared.iterdir()} == files

    (folder / "eval.tsv").write_text(f"img/6.png\t{CAPTIONS[6]}\nimg/7.png\ta red dog\n")
    captions.build_image_caption_tfds(folder, tmp_path / "tfds")  # rebuilt from the edit
    with pytest.raises(ValueError, match=r"made from something else[\s\S]*source_fingerprint"):
        cache.write_cache(config, out, ("eval",), batch_size=2)
    with pytest.raises(ValueError, match=r"dtype: 'float16' != 'float32'"):
        cache.write_cache(config, out, ("eval",), batch_size=2, dtype="float32")
    assert {p: p.stat().st_mtime_ns for p in prepared.iterdir()} == files  # nothing rewritten
