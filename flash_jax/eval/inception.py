"""InceptionV3 pool3 features for FID: the network of pytorch-fid (TF's 2015-12-05 Inception graph).

Architecture: torchvision's InceptionV3 trunk `Conv2d_1a_3x3` … `Mixed_7c` with pytorch-fid's FID
patches (`FIDInceptionA/C/E`): the branch average pools of Mixed_5b-d, 6b-e and 7b exclude the
zero padding from the mean (TF semantics), Mixed_7c's pool branch is a 3×3 max pool; then a global
average pool gives the 2048-d "pool3" features. `BasicConv2d` = conv (no bias) + BatchNorm
(eps 1e-3, running statistics) + ReLU. Layout is NHWC throughout.

Names mirror PyTorch, so a user-supplied `pt_inception-2015-12-05-6726825d.pth` loads
mechanically: torch `Mixed_6b.branch7x7_2.conv.weight` <-> flax params
`Mixed_6b/branch7x7_2/conv/kernel`, `…bn.weight/bias` <-> `…bn/scale/bias`, and
`…bn.running_mean/running_var` <-> the `batch_stats` collection `…bn/mean/var`.
`num_batches_tracked` and the classifier `fc.*` are ignored.

Input convention (pytorch-fid's): images `(N, H, W, 3)`, uint8 in [0, 255] or float in [0, 1];
resized bilinearly (half-pixel centres, no antialiasing, as `F.interpolate(mode="bilinear",
align_corners=False)`) to 299×299 and mapped to [-1, 1].

No weights ship with flash-jax and none can be downloaded here: `load_inception` reads the file
the user supplies (`.pth` through torch when installed, or a `.npz` of the same state dict).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flash_jax.eval.metrics import frechet_distance_from_features
from flash_jax.models.layers import CONV_AXES, constrain_image
from flash_jax.weights import WeightsError, params_from_torch, params_to_torch

Array = jax.Array
Dtype = Any
Variables = dict[str, Any]  # {"params": ..., "batch_stats": ...}

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)
INPUT_SIZE = 299  # what pytorch-fid resizes to
MIN_INPUT_SIZE = 75  # smallest input the stride-2 stages leave at least 1×1
FEATURE_DIM = 2048

# ------------------------------------------------------------------------------ modules


class BasicConv2d(nn.Module):
    """torchvision `BasicConv2d`: conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU.

    `kernel_size`, `padding` are `(h, w)` as in torch (`padding` symmetric per axis).
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            # He init keeps random-weight activations O(1) through the 94 conv layers.
            kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), CONV_AXES),
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=True,
            epsilon=1e-3,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """3×3 stride-1 average pool, padding 1, padded zeros NOT counted (TF / pytorch-fid patch)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, name: str, kernel=(1, 1), strides=1, padding=(0, 0)):
        return BasicConv2d(
            features,
            tuple(kernel),
            strides,
            tuple(padding),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class InceptionA(_Block):
    """Mixed_5b/5c/5d (pytorch-fid `FIDInceptionA`): 64 + 64 + 96 + `pool_features` channels."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(64, "branch1x1")(x)
        b5 = self.conv(48, "branch5x5_1")(x)
        b5 = self.conv(64, "branch5x5_2", (5, 5), padding=(2, 2))(b5)
        b3 = self.conv(64, "branch3x3dbl_1")(x)
        b3 = self.conv(96, "branch3x3dbl_2", (3, 3), padding=(1, 1))(b3)
        b3 = self.conv(96, "branch3x3dbl_3", (3, 3), padding=(1, 1))(b3)
        bp = self.conv(self.pool_features, "branch_pool")(_avg_pool_3x3(x))
        return constrain_image(jnp.concatenate([b1, b5, b3, bp], -1))


class InceptionB(_Block):
    """Mixed_6a (torchvision `InceptionB`, stride 2): 384 + 96 + C_in channels."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(384, "branch3x3", (3, 3), strides=2)(x)
        bd = self.conv(64, "branch3x3dbl_1")(x)
        bd = self.conv(96, "branch3x3dbl_2", (3, 3), padding=(1, 1))(bd)
        bd = self.conv(96, "branch3x3dbl_3", (3, 3), strides=2)(bd)
        return constrain_image(jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], -1))


class InceptionC(_Block):
    """Mixed_6b-6e (pytorch-fid `FIDInceptionC`, factorised 7×7): 4 × 192 channels."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c7 = self.channels_7x7
        b1 = self.conv(192, "branch1x1")(x)
        b7 = self.conv(c7, "branch7x7_1")(x)
        b7 = self.conv(c7, "branch7x7_2", (1, 7), padding=(0, 3))(b7)
        b7 = self.conv(192, "branch7x7_3", (7, 1), padding=(3, 0))(b7)
        bd = self.conv(c7, "branch7x7dbl_1")(x)
        bd = self.conv(c7, "branch7x7dbl_2", (7, 1), padding=(3, 0))(bd)
        bd = self.conv(c7, "branch7x7dbl_3", (1, 7), padding=(0, 3))(bd)
        bd = self.conv(c7, "branch7x7dbl_4", (7, 1), padding=(3, 0))(bd)
        bd = self.conv(192, "branch7x7dbl_5", (1, 7), padding=(0, 3))(bd)
        bp = self.conv(192, "branch_pool")(_avg_pool_3x3(x))
        return constrain_image(jnp.concatenate([b1, b7, bd, bp], -1))


class InceptionD(_Block):
    """Mixed_7a (torchvision `InceptionD`, stride 2): 320 + 192 + C_in channels."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b3 = self.conv(192, "branch3x3_1")(x)
        b3 = self.conv(320, "branch3x3_2", (3, 3), strides=2)(b3)
        b7 = self.conv(192, "branch7x7x3_1")(x)
        b7 = self.conv(192, "branch7x7x3_2", (1, 7), padding=(0, 3))(b7)
        b7 = self.conv(192, "branch7x7x3_3", (7, 1), padding=(3, 0))(b7)
        b7 = self.conv(192, "branch7x7x3_4", (3, 3), strides=2)(b7)
        return constrain_image(jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], -1))


class InceptionE(_Block):
    """Mixed_7b (`FIDInceptionE_1`, `pool="avg"`) / Mixed_7c (`FIDInceptionE_2`, `pool="max"`):
    320 + 768 + 768 + 192 = 2048 channels."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b1 = self.conv(320, "branch1x1")(x)
        b3 = self.conv(384, "branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, "branch3x3_2a", (1, 3), padding=(0, 1))(b3),
                self.conv(384, "branch3x3_2b", (3, 1), padding=(1, 0))(b3),
            ],
            -1,
        )
        bd = self.conv(448, "branch3x3dbl_1")(x)
        bd = self.conv(384, "branch3x3dbl_2", (3, 3), padding=(1, 1))(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, "branch3x3dbl_3a", (1, 3), padding=(0, 1))(bd),
                self.conv(384, "branch3x3dbl_3b", (3, 1), padding=(1, 0))(bd),
            ],
            -1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":  # the FID graph's quirk (torchvision averages here)
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv(192, "branch_pool")(pooled)
        return constrain_image(jnp.concatenate([b1, b3, bd, bp], -1))


class InceptionV3(nn.Module):
    """FID InceptionV3 trunk: `(N, H, W, 3)` float in [-1, 1] (H, W >= 75; 299 for real FID)
    -> `(N, 2048)` pool3 features (global average of the post-ReLU Mixed_7c output, so >= 0).

    Apply with `{"params": ..., "batch_stats": ...}`; BatchNorm always uses the running stats.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects (N, H, W, 3) images, got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"InceptionV3 needs H, W >= {MIN_INPUT_SIZE}, got {x.shape[1:3]}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

        def conv(features, name, kernel=(1, 1), strides=1, padding=(0, 0)):
            return BasicConv2d(features, kernel, strides, padding, name=name, **kw)

        x = constrain_image(x.astype(self.dtype))
        x = conv(32, "Conv2d_1a_3x3", (3, 3), strides=2)(x)
        x = conv(32, "Conv2d_2a_3x3", (3, 3))(x)
        x = conv(64, "Conv2d_2b_3x3", (3, 3), padding=(1, 1))(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, "Conv2d_3b_1x1")(x)
        x = conv(192, "Conv2d_4a_3x3", (3, 3))(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ------------------------------------------------------------------------------ preprocessing


def preprocess(images: Array, image_size: int | None = INPUT_SIZE) -> Array:
    """pytorch-fid's input transform: `(N, H, W, 3)` uint8 [0, 255] or float [0, 1] ->
    float32 `(N, S, S, 3)` in [-1, 1], `S = image_size`.

    The resize is torch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialias,
    also when shrinking). `image_size=None` skips it (tests at 75×75; not comparable FID).
    """
    x = jnp.asarray(images)
    integer = jnp.issubdtype(x.dtype, jnp.integer)
    x = x.astype(jnp.float32)
    if integer:
        x = x / 255.0
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(
            x, (x.shape[0], image_size, image_size, x.shape[3]), "bilinear", antialias=False
        )
    return 2.0 * x - 1.0


# ------------------------------------------------------------------------------ weights


@functools.cache
def _abstract_variables(param_dtype: Any = jnp.float32) -> Variables:
    """Shapes/dtypes of `{"params", "batch_stats"}` (unboxed), traced once per dtype."""
    model = InceptionV3(param_dtype=param_dtype)
    x = jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return flax.core.unfreeze(nn.meta.unbox(abstract))


def init_inception(key: Array, *, param_dtype: Dtype = jnp.float32) -> Variables:
    """Random (He-initialised) `{"params", "batch_stats"}`; for tests, never for a real FID."""
    model = InceptionV3(param_dtype=param_dtype)
    x = jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3))
    return flax.core.unfreeze(nn.meta.unbox(jax.jit(model.init)(key, x)))


def _torch_name(name: str) -> str:
    """Mechanical torch name -> actual: `branch7x7.2.` -> `branch7x7_2.` (no Sequential here)."""
    return re.sub(r"\.(\d+)(?=\.)", r"_\1", name)


_BN_STAT = {"mean": "running_mean", "var": "running_var"}
_IGNORE = (r".*\.num_batches_tracked", r"fc\.(weight|bias)", r".*\.running_(mean|var)")


def inception_from_torch(
    state_dict: Mapping[str, np.ndarray], *, param_dtype: Dtype = jnp.float32
) -> Variables:
    """`{"params", "batch_stats"}` from a pytorch-fid InceptionV3 state dict `{name: array}`.

    `*.conv.weight (O, I, kh, kw)` -> `conv/kernel (kh, kw, I, O)`, `*.bn.weight/bias` ->
    `bn/scale/bias`, `*.bn.running_mean/var` -> `batch_stats …/bn/mean/var`;
    `*.num_batches_tracked` and `fc.*` are ignored.

    Raises:
      WeightsError: naming every missing, unexpected or mis-shaped tensor with both shapes.
    """
    abstract = _abstract_variables(param_dtype)
    problems: list[str] = []
    params = None
    try:
        params = params_from_torch(
            state_dict, abstract["params"], rename=_torch_name, ignore=_IGNORE, what="InceptionV3"
        )
    except WeightsError as e:
        problems += [line.strip() for line in str(e).splitlines()[1:]]  # drop the header

    stats, used = {}, set()
    for path, target in flax.traverse_util.flatten_dict(abstract["batch_stats"]).items():
        *modules, leaf = path
        name = ".".join([*modules, _BN_STAT[leaf]])
        if name not in state_dict:
            problems.append(f"missing {name!r} (expected for batch_stats/{'/'.join(path)})")
            continue
        used.add(name)
        value = np.asarray(state_dict[name])
        if value.shape != tuple(target.shape):
            problems.append(
                f"shape mismatch for {name!r}: checkpoint {value.shape} vs model "
                f"{tuple(target.shape)} at batch_stats/{'/'.join(path)}"
            )
            continue
        stats[path] = value.astype(target.dtype)
    problems += [
        f"unexpected {n!r} shape {tuple(np.shape(state_dict[n]))}"
        for n in sorted(state_dict)
        if re.fullmatch(r".*\.running_(mean|var)", n) and n not in used
    ]
    if problems:
        shown = "\n  ".join(problems)
        raise WeightsError(f"InceptionV3 (FID): {len(problems)} weight problem(s):\n  {shown}")
    return {"params": params, "batch_stats": flax.traverse_util.unflatten_dict(stats)}


def inception_to_torch(variables: Variables) -> dict[str, np.ndarray]:
    """Inverse of `inception_from_torch`: torch names and layouts (no `fc`, no
    `num_batches_tracked`)."""
    state_dict = params_to_torch(variables["params"], rename=_torch_name)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["batch_stats"]))
    for (*modules, leaf), value in flat.items():
        state_dict[".".join([*modules, _BN_STAT[leaf]])] = np.asarray(jax.device_get(value))
    return state_dict


def load_inception(path: str | Path, *, param_dtype: Dtype = jnp.float32) -> Variables:
    """`{"params", "batch_stats"}` from the user's FID Inception weights file.

    Accepts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (needs torch) or an `.npz` of the
    same state dict (`np.savez(out, **{k: v.numpy() for k, v in torch.load(pth).items()})`).

    Raises:
      FileNotFoundError: the file does not exist (the message names it and where to get it).
      ImportError: a `.pth` without torch installed (the message says how to convert to `.npz`).
      WeightsError: the tensors do not match the FID InceptionV3.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 FID weights not found: {path}. flash-jax ships none; download "
            f"{FID_WEIGHTS_URL} (or convert it to .npz) and pass its path."
        )
    if path.suffix == ".npz":
        with np.load(path) as data:
            state_dict = {k: data[k] for k in data.files}
    elif path.suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{path}: reading a .pth needs torch, which is not installed. Convert it once "
                'where torch is available: python -c "import numpy as np, torch; '
                f"np.savez('{path.with_suffix('.npz')}', **{{k: v.numpy() for k, v in "
                f"torch.load('{path}', map_location='cpu').items()}})\" and pass the .npz."
            ) from e
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = {k: v.detach().cpu().numpy() for k, v in loaded.items()}
    else:
        raise WeightsError(f"{path}: expected a .pth/.pt or .npz InceptionV3 state dict")
    return inception_from_torch(state_dict, param_dtype=param_dtype)


# ------------------------------------------------------------------------------ features / FID


@functools.partial(jax.jit, static_argnames=("image_size", "dtype"))
def _features(
    params: Any, batch_stats: Any, images: Array, image_size: int | None, dtype: Any
) -> Array:
    x = preprocess(images, image_size)
    return InceptionV3(dtype=dtype).apply({"params": params, "batch_stats": batch_stats}, x)


def _check_images(x: np.ndarray, image_size: int | None) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {x.shape}")
    if image_size is None and min(x.shape[1:3]) < MIN_INPUT_SIZE:
        raise ValueError(f"without resizing, images need H, W >= {MIN_INPUT_SIZE}: {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and x.size:
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"float images must be in [0, 1] (pytorch-fid convention), got [{lo:.3g}, "
                f"{hi:.3g}]; map [-1, 1] images with (x + 1) / 2 or pass uint8"
            )


def fid_features(
    params: Any,
    batch_stats: Any,
    images: np.ndarray | Iterable[np.ndarray],
    batch_size: int = 50,
    *,
    image_size: int | None = INPUT_SIZE,
    dtype: Dtype = jnp.float32,
) -> np.ndarray:
    """pool3 features `(N, 2048)` float32 of `images`.

    Args:
      params, batch_stats: from `load_inception` / `inception_from_torch`.
      images: `(N, H, W, 3)` uint8 [0, 255] or float [0, 1] (NHWC), or an iterable of such
        chunks (e.g. sample batches), processed in order.
      batch_size: images per jitted forward; the last batch is zero-padded (one compile).
      image_size: resize target (299 for FID); None skips resizing (inputs >= 75×75).
      dtype: compute dtype.
    """
    if image_size is not None and image_size < MIN_INPUT_SIZE:
        raise ValueError(f"image_size must be >= {MIN_INPUT_SIZE}, got {image_size}")
    params, batch_stats = jax.device_put((params, batch_stats))  # once, not per batch
    chunks = [images] if hasattr(images, "ndim") else images
    out = []
    for chunk in chunks:
        chunk = np.asarray(chunk)
        _check_images(chunk, image_size)
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start : start + batch_size]
            n = len(batch)
            if n < batch_size:
                batch = np.concatenate(
                    [batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)]
                )
            out.append(_features(params, batch_stats, batch, image_size, dtype)[:n])
    if not out:
        return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate([np.asarray(f) for f in out])


def fid_from_images(
    weights: Variables | str | Path,
    real: np.ndarray | Iterable[np.ndarray],
    fake: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 50,
    image_size: int | None = INPUT_SIZE,
) -> float:
    """FID between two image sets (each as `fid_features` takes them).

    `weights` is `{"params", "batch_stats"}` or a path for `load_inception`. Comparable to
    published FIDs only with the real pytorch-fid weights, `image_size=299` and enough images
    (>= 2048 per set for a full-rank covariance; 10k-50k is customary).
    """
    if isinstance(weights, (str, Path)):
        weights = load_inception(weights)
    feats = [
        fid_features(
            weights["params"], weights["batch_stats"], s, batch_size, image_size=image_size
        )
        for s in (real, fake)
    ]
    return frechet_distance_from_features(*feats)
