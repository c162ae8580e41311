"""The latent cache: one pass of the frozen VAE encoder and text encoder(s) over an image–caption
dataset, written as a TFDS `array_record` dataset that training then reads instead of images.

  python -m flash_jax.data.cache --config configs/sd/sd15_imagine_flash.py \
      --config.model.pretrained=/models/stable-diffusion-v1-5 \
      --config.data.source=captions --config.data.data_dir=/data/coco_tfds \
      --out /data/coco_sd15_cache [--splits train,eval] [--batch_size 64] [--dtype float16]

The job reads whatever `config.data` describes (any source but "cache": image–caption TFDS data,
or the Shapes testbed), in order, once, resized to `config.data.image_size`. Per record it stores:

  latent_mean, latent_std   (h, w, c)  the VAE posterior's mean and standard deviation, already in
                                       diffusion space: (mean_z − shift)·scale and std_z·scale, so
                                       `mean + std·ε` is exactly the latent that encoding the image
                                       with a key gives (t2i.T2I.batch_latents)
  prompt_embeds             (L, D)     the UNet's text conditioning (SDXL: both encoders, 2048)
  pooled_prompt_embeds      (P,)       the pooled / projected text embedding
  tokens                    (L,) or (2, L)  the prompt's ids (sample grids and text-encoder training)
  caption, index                       the caption and the source record index

Floats are stored as `--dtype` (float16 by default: half the disk and host->device bytes; float32
for bit-exact latents). Training reads the result with `config.data.source="cache"` and
`config.data.data_dir=<--out>`; methods then skip the VAE encoder and the text encoder (except on
the empty prompt and for sample grids).

The job runs in one process and splits each batch over that host's local devices (data parallel).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm import tqdm

from flash_jax import frozen, t2i
from flash_jax.data import cache_reader, sources

BUILDER_NAME = cache_reader.BUILDER_NAME
FLOAT_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds")
DTYPES = ("float16", "float32")


def feature_shapes(model: t2i.T2I, image_size: int, text: bool) -> dict[str, tuple]:
    """`{key: per-record shape}` of the float and token features for `model` at `image_size`."""
    _, h, w, c = model.latent_shape(1, image_size)
    shapes: dict[str, tuple] = {"latent_mean": (h, w, c), "latent_std": (h, w, c)}
    shapes["tokens"] = model.tokenizer()([""]).shape[1:]
    if text:
        params = jax.eval_shape(model.init, jax.random.key(0))["text"]
        embeds, pooled = jax.eval_shape(
            model.embed_prompts, params, jax.ShapeDtypeStruct((1, *shapes["tokens"]), np.int32)
        )
        shapes["prompt_embeds"], shapes["pooled_prompt_embeds"] = embeds.shape[1:], pooled.shape[1:]
    return shapes


class LatentCacheBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the cache (module docstring). Constructed by `write_cache` with the feature
    shapes and, per split, a generator of `(key, record)`; read back with
    `tfds.builder_from_directory` like any prepared dataset (no builder code needed)."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: dict[str, str] = {"1.0.0": "Initial release."}  # noqa: RUF012
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="cache")]  # noqa: RUF012
    code_path = None  # nothing is downloaded: no checksums file (see sources.ShapesBuilder)

    def __init__(
        self,
        *,
        shapes: Mapping[str, tuple],
        dtype: str,
        splits: Mapping[str, Callable[[], Iterator[tuple[int, dict]]]],
        metadata: Mapping[str, Any],
        **kwargs,
    ):
        self._shapes, self._dtype, self._splits = dict(shapes), dtype, dict(splits)
        self._metadata = dict(metadata)
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            k: tfds.features.Tensor(
                shape=shape, dtype=np.int32 if k == "tokens" else np.dtype(self._dtype)
            )
            for k, shape in self._shapes.items()
        }
        features["caption"] = tfds.features.Text()
        features["index"] = tfds.features.Tensor(shape=(), dtype=np.int64)
        return tfds.core.DatasetInfo(
            builder=self,
            description="VAE latent moments and text embeddings of an image–caption dataset.",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # record i of a split is the i-th source record
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str):
        yield from self._splits[split]()


def make_encoder(model: t2i.T2I, text: bool, mesh: Mesh) -> Callable:
    """Jitted `(vae, text_params, images (B,H,W,3) uint8, tokens) -> {FLOAT_KEYS...}` with the
    batch split over `mesh`'s "data" axis and the parameters replicated."""

    def encode(vae, text_params, images, tokens):
        mean, std = model.latent_moments(vae, images)
        out = {"latent_mean": mean, "latent_std": std}
        if text:
            out["prompt_embeds"], out["pooled_prompt_embeds"] = model.embed_prompts(
                text_params, tokens
            )
        return out

    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        encode,
        in_shardings=(replicated, replicated, batch, batch),
        out_shardings=batch,
    )


def encoded_records(
    raw_batches: Iterator[dict[str, Any]],
    encode: Callable,
    params: tuple[Any, Any],
    tokenizer: t2i.Tokenizer,
    batch_size: int,
    dtype: str,
    progress: tqdm | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(index, record)` for every example of `raw_batches` (image + caption batches, the last
    one possibly short: padded to `batch_size` for one compiled shape, the padding dropped)."""
    vae, text_params = params
    for raw in raw_batches:
        n = len(raw["caption"])
        captions = [str(c) for c in raw["caption"]]
        tokens = tokenizer(captions)
        pad = [(0, batch_size - n)]
        images = np.pad(raw["image"], pad + [(0, 0)] * 3)
        padded_tokens = np.pad(tokens, pad + [(0, 0)] * (tokens.ndim - 1))
        out = jax.device_get(encode(vae, text_params, images, padded_tokens))
        for i in range(n):
            record = {k: np.asarray(v[i], dtype) for k, v in out.items()}
            record |= {"tokens": tokens[i], "caption": captions[i], "index": int(raw["index"][i])}
            yield int(raw["index"][i]), record
        if progress is not None:
            progress.update(n)


def build_record(
    config: ml_collections.ConfigDict, splits: tuple[str, ...], dtype: str, text: bool
) -> dict[str, Any]:
    """What a cache is made from, stored in its metadata and compared before reuse: the source
    (`sources.source_fingerprint`, and `num_records` of its train split), the weights folder and
    the model's architecture dicts, the image size, the splits, the storage dtype and whether text
    is cached."""
    model = {
        k: v.to_dict() for k, v in config.model.items() if isinstance(v, ml_collections.ConfigDict)
    }
    return {
        "source": f"{config.data.source}:{config.data.data_dir}",
        "source_fingerprint": sources.source_fingerprint(config.data),
        "num_records": config.data.num_records,
        "pretrained": os.path.abspath(config.model.pretrained) if config.model.pretrained else "",
        "architecture": hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest(),
        "image_size": config.data.image_size,
        "splits": sorted(splits),
        "dtype": dtype,
        "text": bool(text),
    }


def prepared_dir(out: str | os.PathLike) -> Path:
    """Where `write_cache(config, out)` puts the prepared dataset."""
    return Path(out) / BUILDER_NAME / "cache" / str(LatentCacheBuilder.VERSION)


def native_image_size(model: t2i.T2I) -> int:
    """The image size the model was trained at: the UNet's `sample_size` x the VAE's factor."""
    if not model.unet.sample_size:
        raise ValueError("config.model.unet has no sample_size: set config.data.image_size")
    return model.unet.sample_size * model.autoencoder.downsample_factor


def resolve_image_size(config: ml_collections.ConfigDict) -> None:
    """Fills in `config.data.image_size = 0` (in place): the cache's when `config.data` reads a
    cache, else the model's native size (`native_image_size`). A set size is left as is."""
    if config.data.image_size:
        return
    if config.data.source == "cache":
        if not config.data.data_dir:
            raise ValueError("config.data.source='cache' needs config.data.data_dir")
        config.data.image_size = cache_reader.stored_image_size(config.data.data_dir)
    else:
        config.data.image_size = native_image_size(t2i.T2I.from_config(config))


def write_cache(
    config: ml_collections.ConfigDict,
    out: str | os.PathLike,
    splits: tuple[str, ...] = ("train", "eval"),
    batch_size: int = 32,
    dtype: str = "float16",
    text: bool = True,
) -> Path:
    """Encodes `config.data`'s `splits` with `config.model`'s frozen VAE (and text encoder(s) if
    `text`) and writes the cache under `out`; returns the prepared dataset directory.

    Weights: `config.model.pretrained` if set, else `config.autoencoder_workdir` and the text
    encoder of `config.teacher_workdir`. Images are resized to `config.data.image_size` (0: the
    model's native size). A cache already prepared under `out` from the same `build_record` is
    kept as is; one made from anything else is refused, naming what differs.

    Raises:
      ValueError: bad `dtype`, `batch_size`, `config.data.source == "cache"`, or `out` holds a
        cache of another source, model or setting.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
    if config.data.source == "cache":
        raise ValueError(
            "config.data.source='cache': point config.data at the images to encode "
            "(--config.data.source=captions --config.data.data_dir=<image–caption TFDS dir>)"
        )
    devices = jax.local_devices()
    if batch_size <= 0 or batch_size % len(devices):
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of {len(devices)}")
    model = t2i.T2I.from_config(config)
    if text and not model.pretrained and not config.get("teacher_workdir"):
        raise ValueError(
            "no frozen text encoder: set config.model.pretrained or config.teacher_workdir, or "
            "cache latents only (text=False / --notext)"
        )
    config = config.copy_and_resolve_references()
    resolve_image_size(config)
    image_size = config.data.image_size
    record = build_record(config, splits, dtype, text)
    prepared = prepared_dir(out)
    if (prepared / "dataset_info.json").is_file():
        info = tfds.builder_from_directory(os.fspath(prepared)).info
        stored = dict(info.metadata or {}).get("build", {})
        differ = [
            f"{k}: {stored.get(k)!r} != {v!r}" for k, v in record.items() if stored.get(k) != v
        ]
        if differ:
            raise ValueError(
                f"{prepared} holds a cache made from something else (stored != now):\n  "
                + "\n  ".join(differ)
                + "\nremove it or choose another --out"
            )
        return prepared
    shapes = feature_shapes(model, image_size, text)
    vae = frozen.load_autoencoder(config, model)
    text_params = frozen.load_teacher(config, model, parts=("text",))["text"] if text else None
    mesh = Mesh(np.asarray(devices), ("data",))
    encode = make_encoder(model, text, mesh)
    tokenizer = model.tokenizer()

    def records(split: str) -> Iterator[tuple[int, dict]]:
        ds = sources.make_dataset(
            config.data,
            batch_size,
            split,
            shuffle=False,
            num_epochs=1,
            drop_remainder=False,
            shard_index=0,
            shard_count=1,
        )
        with tqdm(desc=f"cache {split}", unit="img") as progress:
            yield from encoded_records(
                iter(ds), encode, (vae, text_params), tokenizer, batch_size, dtype, progress
            )

    metadata = {
        "image_size": image_size,
        "latent_space": "diffusion: (mean_z - shift_factor) * scaling_factor, std_z * scaling_factor",
        "scaling_factor": model.autoencoder.scaling_factor,
        "shift_factor": model.autoencoder.shift_factor or 0.0,
        "pretrained": model.pretrained,
        "source": f"{config.data.source}:{config.data.data_dir}",
        "text": bool(text),
        "build": record,
    }
    builder = LatentCacheBuilder(
        shapes=shapes,
        dtype=dtype,
        splits={s: functools.partial(records, s) for s in splits},
        metadata=metadata,
        data_dir=os.fspath(out),
    )
    builder.download_and_prepare()
    return Path(builder.data_dir)


# ------------------------------------------------------------------------------ command line


def _define_flags() -> dict[str, Any]:
    """The command's flags; defined only when run as a program (the trainer imports this module
    next to its own `--config` flag)."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", None, "config file[:variant]", lock_config=True
        ),
        "out": flags.DEFINE_string("out", None, "output directory of the cache"),
        "splits": flags.DEFINE_list("splits", ["train", "eval"], "splits of config.data"),
        "batch_size": flags.DEFINE_integer("batch_size", 32, "images per call (all devices)"),
        "dtype": flags.DEFINE_enum("dtype", "float16", list(DTYPES), "storage dtype of floats"),
        "text": flags.DEFINE_bool("text", True, "also cache the text embeddings"),
    }


def main(argv: list[str], flag_values: dict[str, Any]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    v = {k: f.value for k, f in flag_values.items()}
    path = write_cache(
        v["config"], v["out"], tuple(v["splits"]), v["batch_size"], v["dtype"], v["text"]
    )
    print(f"wrote the cache to {path}")


if __name__ == "__main__":
    _FLAGS = _define_flags()
    flags.mark_flags_as_required(["config", "out"])
    app.run(functools.partial(main, flag_values=_FLAGS))
