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


def params_to_torch(params: Params, *, rename: Rename = lambda name: name) -> StateDict:
    """Inverse of `params_from_torch`: `{torch name: float32-or-native numpy array}`, torch layouts."""
    return {
        rename(flax_path_to_torch_name(path)): _to_torch_layout(
            path[-1], np.asarray(jax.device_get(v))
        )
        for path, v in _flatten(params).items()
    }


def load_safetensors_dir(path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """Reads a diffusers/transformers model folder: `config.json` and every `*.safetensors` in it.

    Returns:
      `(config_dict, state_dict)`; the state dict merges all shards.
    """
    from safetensors.numpy import load_file  # installed with transformers/diffusers

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path}: no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{path}: no *.safetensors files")
    state_dict: StateDict = {}
    for f in files:
        shard = load_file(str(f))
        dup = state_dict.keys() & shard.keys()
        if dup:
            raise WeightsError(f"{f}: tensors also in another shard: {sorted(dup)[:5]}")
        state_dict.update(shard)
    return json.loads(config_file.read_text()), state_dict


# =================================================================================================
# CLIP text encoder: transformers `CLIPTextModel` / `CLIPTextModelWithProjection`.
# Names: transformers 5 `CLIPTextModel.state_dict()` has no `text_model.` prefix; checkpoints saved
# by transformers 4 (every SD `text_encoder/` on the Hub) and `CLIPTextModelWithProjection` have it.
# Import accepts both; flax paths always start with `text_model/`.

_CLIP_TEXT_PREFIX = "text_model."
_CLIP_TEXT_IGNORE = (r"(text_model\.)?embeddings\.position_ids",)  # non-parameter buffer


def _clip_text_abstract(config: Any, with_projection: bool) -> Params:
    from flash_jax.models import text

    return jax.eval_shape(lambda: text.init_params(config, jax.random.key(0), with_projection))


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
    expected = _flatten(_clip_text_abstract(config, with_projection))
    got = _flatten(params)
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
        raise WeightsError(
            "CLIP text encoder params do not match config:\n  " + "\n  ".join(problems)
        )
    keep_prefix = with_projection or legacy_names
    return params_to_torch(
        params,
        rename=(lambda n: n) if keep_prefix else (lambda n: n.removeprefix(_CLIP_TEXT_PREFIX)),
    )


def clip_text_from_pretrained(folder: str | Path, **overrides: Any) -> tuple[Any, Params]:
    """`(CLIPTextConfig, params)` from a transformers text encoder folder (e.g. SD's
    `text_encoder/`, SDXL's `text_encoder_2/`): `config.json` + `*.safetensors`.

    The projection is loaded iff the checkpoint has `text_projection.weight`; use
    `CLIPTextModel(config, with_projection="text_projection" in params)`. `overrides` go to
    `CLIPTextConfig.from_transformers` (`dtype`, `param_dtype`, `remat`).
    """
    from flash_jax.models.text import CLIPTextConfig

    config_dict, state_dict = load_safetensors_dir(folder)
    config = CLIPTextConfig.from_transformers(config_dict, **overrides)
    with_projection = "text_projection.weight" in state_dict
    return config, clip_text_from_transformers(state_dict, config, with_projection)


# ========================================== end CLIP text ========================================
