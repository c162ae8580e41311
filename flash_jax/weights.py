"""Import and export of model weights by name, between flash-jax params and PyTorch state dicts.

A PyTorch state dict here is `{name: numpy array}` exactly as safetensors / torch name and lay out
the tensors (NCHW-era layouts: Linear `(out, in)`, Conv2d `(out, in, kh, kw)`). flash-jax params
are the plain nested dicts that `flax.linen` `init` returns (Dense kernel `(in, out)`, Conv kernel
`(kh, kw, in, out)`).

The flax modules are named after the PyTorch ones, so the mapping is mechanical: the flax path
`down_blocks_0/resnets_1/conv1/kernel` is the torch name `down_blocks.0.resnets.1.conv1.weight`.
Per-model exceptions go through a `rename` function from flax-derived torch name to actual torch
name. Every mismatch (missing, unexpected, wrongly shaped tensor) is an error naming the tensor and
both shapes; nothing is ever silently skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np

StateDict = dict[str, np.ndarray]
Params = dict[str, Any]
Rename = Callable[[str], str]

# Flax leaf name -> torch leaf name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class WeightsError(ValueError):
    """A state dict does not match the model it is loaded into (or exported from)."""


def flax_path_to_torch_name(path: tuple[str, ...]) -> str:
    """`('down_blocks_0', 'resnets_1', 'conv1', 'kernel')` -> `'down_blocks.0.resnets.1.conv1.weight'`."""
    *modules, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise WeightsError(f"no torch name for flax parameter {'/'.join(path)!r} (leaf {leaf!r})")
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join([*parts, _LEAF_TO_TORCH[leaf]])


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:  # Linear (out, in) -> (in, out)
        return array.T
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def _flatten(params: Params) -> dict[tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(flax.linen.meta.unbox(params)))


def params_from_torch(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Params,
    *,
    rename: Rename = lambda name: name,
    ignore: Iterable[str] = (),
    what: str = "model",
) -> Params:
    """Builds flax params shaped like `abstract_params` from a torch-named state dict.

    Args:
      state_dict: `{torch name: array}`, torch layouts.
      abstract_params: the target pytree (arrays or `jax.ShapeDtypeStruct`, e.g. from
        `jax.eval_shape(init)`); gives every expected path, shape and dtype.
      rename: maps the mechanically derived torch name to the name used in `state_dict`.
      ignore: regular expressions of state-dict names that are allowed to be left unused
        (buffers such as `position_ids`).
      what: model name used in error messages.

    Returns:
      Nested dict of numpy arrays with the dtypes of `abstract_params`.

    Raises:
      WeightsError: listing every missing, unexpected or mis-shaped tensor with both shapes.
    """
    ignore_patterns = [re.compile(p) for p in ignore]
    flat = _flatten(abstract_params)
    out, problems, used = {}, [], set()
    for path, target in flat.items():
        name = rename(flax_path_to_torch_name(path))
        if name not in state_dict:
            problems.append(
                f"missing {name!r} (expected for {'/'.join(path)}, shape {tuple(target.shape)})"
            )
            continue
        used.add(name)
        value = _to_flax_layout(path[-1], np.asarray(state_dict[name]))
        if value.shape != tuple(target.shape):
            problems.append(
                f"shape mismatch for {name!r}: checkpoint {tuple(np.shape(state_dict[name]))} "
                f"(as flax {value.shape}) vs model {tuple(target.shape)} at {'/'.join(path)}"
            )
            continue
        out[path] = value.astype(target.dtype)
    unexpected = [
        n for n in state_dict if n not in used and not any(p.fullmatch(n) for p in ignore_patterns)
    ]
    problems += [
        f"unexpected {n!r} shape {tuple(np.shape(state_dict[n]))}" for n in sorted(unexpected)
    ]
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise WeightsError(f"{what}: {len(problems)} weight problem(s):\n  {shown}{more}")
    return flax.traverse_util.unflatten_dict(out)


def check_params_match(params: Params, abstract: Params, what: str) -> None:
    """Raises WeightsError listing every missing, unexpected or mis-shaped parameter of `params`
    against the expected tree `abstract` (arrays or ShapeDtypeStructs)."""
    expected, got = _flatten(abstract), _flatten(params)
    problems = [
        f"missing {'/'.join(p)} shape {tuple(v.shape)}" for p, v in expected.items() if p not in got
    ]
    problems += [
        f"unexpected {'/'.join(p)} shape {np.shape(v)}" for p, v in got.items() if p not in expected
    ]
    problems += [
        f"shape mismatch for {'/'.join(p)}: params {np.shape(got[p])} vs config {tuple(v.shape)}"
        for p, v in expected.items()
        if p in got and tuple(np.shape(got[p])) != tuple(v.shape)
    ]
    if problems:
        raise WeightsError(f"{what} params do not match config:\n  " + "\n  ".join(problems))


def params_to_torch(params: Params, *, rename: Rename = lambda name: name) -> StateDict:
    """Inverse of `params_from_torch`: `{torch name: float32-or-native numpy array}`, torch layouts."""
    return {
        rename(flax_path_to_torch_name(path)): _to_torch_layout(
            path[-1], np.asarray(jax.device_get(v))
        )
        for path, v in _flatten(params).items()
    }


def _weight_variant(file: Path) -> str:
    """`""` for `model.safetensors` / `model-00001-of-00002.safetensors`; `"fp16"` for
    `model.fp16.safetensors` / `model.fp16-00001-of-00002.safetensors` (diffusers' naming)."""
    parts = file.name.split(".")
    return "" if len(parts) == 2 else re.sub(r"-\d+-of-\d+$", "", parts[-2])


def load_safetensors_dir(
    path: str | Path, variant: str = "", *, allow_non_finite: bool = False
) -> tuple[dict[str, Any], StateDict]:
    """Reads a diffusers/transformers model folder: `config.json` and the `*.safetensors` of one
    weight variant in it.

    Args:
      path: the folder.
      variant: `""` reads the plain files (`model.safetensors`, or its shards); `"fp16"` reads
        `*.fp16.safetensors` (and shards). Hub snapshots often hold several variants side by side
        (`diffusion_pytorch_model.safetensors`, `.fp16.`, `.non_ema.`); only one is read.
      allow_non_finite: accept tensors holding NaN/inf (by default they are refused by name:
        damaged bytes in a weight file usually decode to them).

    Returns:
      `(config_dict, state_dict)`; the state dict merges all shards.

    Raises:
      WeightsError: naming the file (and tensor): missing, truncated, empty or unreadable files,
        non-finite values, tensors in two shards.
    """
    from safetensors.numpy import load_file  # installed with transformers/diffusers

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path}: no config.json")
    try:
        config_dict = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{config_file}: not valid JSON ({e})") from None
    every = sorted(path.glob("*.safetensors"))
    files = [f for f in every if _weight_variant(f) == variant]
    if not files:
        found = sorted({_weight_variant(f) for f in every})
        raise WeightsError(
            f"{path}: no *.safetensors files of variant {variant!r} (variants there: {found})"
        )
    state_dict: StateDict = {}
    for f in files:
        try:
            shard = load_file(str(f))
        except Exception as e:  # safetensors' own error type for truncated or empty files
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
        if not allow_non_finite:
            for name, array in shard.items():
                if array.dtype.kind not in "biu" and not np.isfinite(array).all():
                    count = int(array.size - np.isfinite(array).sum())
                    raise WeightsError(
                        f"{f}: tensor {name!r} has {count} non-finite values (a damaged file?); "
                        "allow_non_finite=True loads it anyway"
                    )
        dup = state_dict.keys() & shard.keys()
        if dup:
            raise WeightsError(f"{f}: tensors also in another shard: {sorted(dup)[:5]}")
        state_dict.update(shard)
    return config_dict, state_dict


# =================================================================================================
# CLIP text encoder: transformers `CLIPTextModel` / `CLIPTextModelWithProjection`.
# Names: transformers 5 `CLIPTextModel.state_dict()` has no `text_model.` prefix; checkpoints saved
# by transformers 4 (every SD `text_encoder/` on the Hub) and `CLIPTextModelWithProjection` have it.
# Import accepts both; flax paths always start with `text_model/`.

_CLIP_TEXT_PREFIX = "text_model."
_CLIP_TEXT_IGNORE = (r"(text_model\.)?embeddings\.position_ids",)  # non-parameter buffer


_CLIP_TEXT_ABSTRACT: dict[tuple[Any, bool], Params] = {}  # traced once per (config, projection)


def _clip_text_abstract(config: Any, with_projection: bool) -> Params:
    from flash_jax.models import text

    key = (config, with_projection)
    if key not in _CLIP_TEXT_ABSTRACT:
        _CLIP_TEXT_ABSTRACT[key] = jax.eval_shape(
            lambda: text.init_params(config, jax.random.key(0), with_projection)
        )
    return _CLIP_TEXT_ABSTRACT[key]


def clip_text_from_transformers(
    state_dict: Mapping[str, np.ndarray], config: Any, with_projection: bool = False
) -> Params:
    """flash-jax `CLIPTextModel` params from a transformers CLIP text state dict.

    Args:
      state_dict: `{name: array}` of a `CLIPTextModel` (with or without the `text_model.` prefix)
        or, with `with_projection`, a `CLIPTextModelWithProjection` (adds `text_projection.weight`,
        `(P, D)`). `embeddings.position_ids` is ignored.
      config: `flash_jax.models.text.CLIPTextConfig`; its `param_dtype` is the params' dtype.
      with_projection: whether the model has `text_projection`.

    Returns:
      Params for `CLIPTextModel(config, with_projection)`.

    Raises:
      WeightsError: naming every missing, unexpected or mis-shaped tensor and both shapes.
    """
    prefixed = any(name.startswith(_CLIP_TEXT_PREFIX) for name in state_dict)
    return params_from_torch(
        state_dict,
        _clip_text_abstract(config, with_projection),
        rename=(lambda n: n) if prefixed else (lambda n: n.removeprefix(_CLIP_TEXT_PREFIX)),
        ignore=_CLIP_TEXT_IGNORE,
        what="CLIP text encoder",
    )


def clip_text_to_transformers(
    params: Params, config: Any, *, legacy_names: bool = False
) -> StateDict:
    """transformers state dict from flash-jax CLIP text params (inverse of the importer).

    Names are those of transformers 5 `CLIPTextModel.state_dict()` (no prefix), or, when `params`
    has `text_projection`, of `CLIPTextModelWithProjection` (`text_model.` prefix). With
    `legacy_names`, `CLIPTextModel` names also get the `text_model.` prefix (transformers 4 layout).

    Raises:
      WeightsError: if `params` does not match `config` (names the param and both shapes).
    """
    with_projection = "text_projection" in params
    check_params_match(params, _clip_text_abstract(config, with_projection), "CLIP text encoder")
    keep_prefix = with_projection or legacy_names
    return params_to_torch(
        params,
        rename=(lambda n: n) if keep_prefix else (lambda n: n.removeprefix(_CLIP_TEXT_PREFIX)),
    )


def clip_text_from_pretrained(
    folder: str | Path, variant: str = "", **overrides: Any
) -> tuple[Any, Params]:
    """`(CLIPTextConfig, params)` from a transformers text encoder folder (e.g. SD's
    `text_encoder/`, SDXL's `text_encoder_2/`): `config.json` + `*.safetensors`.

    The projection is loaded iff the checkpoint has `text_projection.weight`; use
    `CLIPTextModel(config, with_projection="text_projection" in params)`. `overrides` go to
    `CLIPTextConfig.from_transformers` (`dtype`, `param_dtype`, `remat`); `variant` selects the
    weight files (see `load_safetensors_dir`).
    """
    from flash_jax.models.text import CLIPTextConfig

    config_dict, state_dict = load_safetensors_dir(folder, variant)
    config = CLIPTextConfig.from_transformers(config_dict, **overrides)
    with_projection = "text_projection.weight" in state_dict
    return config, clip_text_from_transformers(state_dict, config, with_projection)


# ========================================== end CLIP text ========================================


# =================================================================================================
# diffusers UNet2DConditionModel and AutoencoderKL.
# Names are mechanical (flax modules carry the diffusers names). Two checkpoint variations are
# adapted on import: 1x1-conv vs Linear layouts of the same weight (SD1 `proj_in`/`proj_out` are
# convs, SD2/SDXL Linear; old VAE attention weights may be 1x1 convs), and the pre-0.14 diffusers
# VAE attention names `query/key/value/proj_attn`.

_VAE_OLD_ATTENTION = re.compile(r"(mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_VAE_NEW_ATTENTION = {"query": "to_q.", "key": "to_k.", "value": "to_v.", "proj_attn": "to_out.0."}
_UNET_LINEAR = re.compile(r"^(time_embedding|add_embedding)\.linear\.(\d)\.")


def _unet_rename(name: str) -> str:
    """`time_embedding.linear.1.weight` (mechanical) -> `time_embedding.linear_1.weight`."""
    return _UNET_LINEAR.sub(r"\1.linear_\2.", name)


_MODEL_ABSTRACT: dict[tuple[str, Any], Params] = {}  # tracing a full-size UNet takes seconds


def model_abstract(kind: str, config: Any) -> Params:
    """Shapes and dtypes (`jax.ShapeDtypeStruct` leaves) of the params of `config`'s model, `kind`
    "unet" or "autoencoder"; cached per config, so checking a load costs no second trace."""
    if (kind, config) not in _MODEL_ABSTRACT:
        if kind == "unet":
            from flash_jax.models import unet as module
        else:
            from flash_jax.models import autoencoder as module
        _MODEL_ABSTRACT[kind, config] = jax.eval_shape(
            lambda: module.init_params(config, jax.random.key(0))
        )
    return _MODEL_ABSTRACT[kind, config]


def _match_1x1_layouts(
    state_dict: Mapping[str, np.ndarray], abstract: Params, rename: Rename = lambda n: n
) -> StateDict:
    """Reshapes `(O, I, 1, 1)` conv weights where the model has a Linear and vice versa."""
    out = dict(state_dict)
    for path, target in _flatten(abstract).items():
        if path[-1] != "kernel":
            continue
        name = rename(flax_path_to_torch_name(path))
        if name not in out:
            continue
        value = np.asarray(out[name])
        if len(target.shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            out[name] = value.reshape(value.shape[:2])
        elif len(target.shape) == 4 and target.shape[:2] == (1, 1) and value.ndim == 2:
            out[name] = value.reshape(*value.shape, 1, 1)
    return out


def _pretrained_folder(folder: str | Path, subfolder: str) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / subfolder / "config.json").is_file():
        return folder / subfolder  # a whole pipeline folder
    return folder


def unet_from_diffusers(state_dict: Mapping[str, np.ndarray], config: Any) -> Params:
    """flash-jax `UNet` params from a diffusers `UNet2DConditionModel` state dict.

    Args:
      state_dict: `{name: array}` as `UNet2DConditionModel.state_dict()` / safetensors name and
        lay them out (NCHW-era: Linear `(out, in)`, Conv2d `(out, in, kh, kw)`). `proj_in` /
        `proj_out` may be 1x1 convs or Linears whatever `config.use_linear_projection` says.
      config: `flash_jax.models.unet.UNetConfig`; its `param_dtype` is the params' dtype.

    Returns:
      Params (plain nested dicts of numpy arrays) for `UNet(config)`.

    Raises:
      WeightsError: naming every missing, unexpected or mis-shaped tensor and both shapes.
    """
    abstract = model_abstract("unet", config)
    return params_from_torch(
        _match_1x1_layouts(state_dict, abstract, _unet_rename),
        abstract,
        rename=_unet_rename,
        what="UNet2DConditionModel",
    )


def unet_to_diffusers(params: Params, config: Any) -> StateDict:
    """diffusers `UNet2DConditionModel` state dict (numpy, torch layouts) from flash-jax params;
    loads with `strict=True` into `UNet2DConditionModel(**config.to_diffusers())`.

    Raises:
      WeightsError: if `params` does not match `config` (names the param and both shapes).
    """
    check_params_match(params, model_abstract("unet", config), "UNet")
    return params_to_torch(params, rename=_unet_rename)


def autoencoder_from_diffusers(state_dict: Mapping[str, np.ndarray], config: Any) -> Params:
    """flash-jax `AutoencoderKL` params from a diffusers `AutoencoderKL` state dict.

    Accepts the current names and the old mid-block attention names (`query`, `key`, `value`,
    `proj_attn`), with Linear or 1x1-conv layouts.

    Raises:
      WeightsError: naming every missing, unexpected or mis-shaped tensor and both shapes.
    """
    renamed = {
        _VAE_OLD_ATTENTION.sub(lambda m: m.group(1) + _VAE_NEW_ATTENTION[m.group(2)], name): value
        for name, value in state_dict.items()
    }
    if len(renamed) != len(state_dict):
        raise WeightsError("AutoencoderKL: state dict has both old and new attention names")
    abstract = model_abstract("autoencoder", config)
    return params_from_torch(_match_1x1_layouts(renamed, abstract), abstract, what="AutoencoderKL")


def autoencoder_to_diffusers(params: Params, config: Any) -> StateDict:
    """diffusers `AutoencoderKL` state dict (current names, torch layouts) from flash-jax params;
    loads with `strict=True` into `AutoencoderKL(**config.to_diffusers())`.

    Raises:
      WeightsError: if `params` does not match `config` (names the param and both shapes).
    """
    check_params_match(params, model_abstract("autoencoder", config), "AutoencoderKL")
    return params_to_torch(params)


def unet_from_pretrained(
    folder: str | Path, variant: str = "", **overrides: Any
) -> tuple[Any, Params]:
    """`(UNetConfig, params)` from a diffusers UNet folder (`config.json` + `*.safetensors`), or a
    pipeline folder holding `unet/`. `overrides` go to `UNetConfig.from_diffusers` (`dtype`,
    `param_dtype`, `remat`, ...); `variant` selects the weight files (`load_safetensors_dir`)."""
    from flash_jax.models.unet import UNetConfig

    config_dict, state_dict = load_safetensors_dir(_pretrained_folder(folder, "unet"), variant)
    config = UNetConfig.from_diffusers(config_dict, **overrides)
    return config, unet_from_diffusers(state_dict, config)


def autoencoder_from_pretrained(
    folder: str | Path, variant: str = "", **overrides: Any
) -> tuple[Any, Params]:
    """`(AutoencoderConfig, params)` from a diffusers AutoencoderKL folder, or a pipeline folder
    holding `vae/`. `overrides` go to `AutoencoderConfig.from_diffusers`; `variant` selects the
    weight files (`load_safetensors_dir`)."""
    from flash_jax.models.autoencoder import AutoencoderConfig

    config_dict, state_dict = load_safetensors_dir(_pretrained_folder(folder, "vae"), variant)
    config = AutoencoderConfig.from_diffusers(config_dict, **overrides)
    return config, autoencoder_from_diffusers(state_dict, config)


# ===================================== end UNet / AutoencoderKL ===================================
