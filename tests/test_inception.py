"""FID InceptionV3 with random weights: torch names/shapes, import/export, parity with a functional
PyTorch transcription of pytorch-fid's forward, preprocessing vs `F.interpolate`, features, FID.

Inputs are 75×75 (the smallest InceptionV3 takes) with resizing skipped; one compiled forward
(batch 4) is shared by every test.
"""

import ctypes
import glob
import os
import re
import sys

import flax
import numpy as np
import pytest

from flash_jax.eval import inception as inc
from flash_jax.weights import WeightsError

SIZE, BATCH = inc.MIN_INPUT_SIZE, 4

# torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696) and fc
# (2,049,000) leaves the trunk pytorch-fid uses.
TRUNK_PARAMS = 21_785_568
# A few tensors of pt_inception-2015-12-05-6726825d.pth (torchvision layer definitions).
KNOWN_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_2b_3x3.bn.running_mean": (64,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5d.branch5x5_1.conv.weight": (48, 288, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.running_var": (192,),
}
NAME = re.compile(
    r"(Conv2d_\w+|Mixed_\d[a-e]\.branch\w+)\.(conv\.weight|bn\.(weight|bias|running_mean|running_var))"
)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded_blas():
    """One OpenBLAS thread: on 2 busy cores a threaded 2048×2048 eigh (inside the FD) spins for
    ~10 s of CPU instead of ~2 s. Restored afterwards; a no-op where the symbols differ."""
    import numpy

    libs = glob.glob(
        os.path.join(os.path.dirname(numpy.__file__), "..", "numpy.libs", "*openblas*")
    )
    try:
        lib = ctypes.CDLL(libs[0])
        get, set_ = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
    except (IndexError, OSError, AttributeError):
        yield
        return
    before = get()
    set_(1)
    yield
    set_(before)


@pytest.fixture(scope="module")
def variables():
    """Random weights in every tensor (BN stats and affine too, so a swap would show), He-scaled
    so activations stay O(1) through the 94 layers."""
    rng = np.random.default_rng(0)
    out = {}
    for collection, tree in inc._abstract_variables().items():
        flat = {}
        for path, v in flax.traverse_util.flatten_dict(tree).items():
            leaf, shape = path[-1], v.shape
            if leaf == "kernel":
                x = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:3]))
            elif leaf in ("scale", "var"):
                x = rng.uniform(0.5, 1.5, shape)
            else:  # bias, mean
                x = 0.1 * rng.standard_normal(shape)
            flat[path] = x.astype(np.float32)
        out[collection] = flax.traverse_util.unflatten_dict(flat)
    return out


@pytest.fixture(scope="module")
def state_dict(variables):
    return inc.inception_to_torch(variables)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(variables, images):
    return inc.fid_features(
        variables["params"], variables["batch_stats"], images, BATCH, image_size=None
    )


def _assert_same_tree(a, b):
    fa, fb = (flax.traverse_util.flatten_dict(t) for t in (a, b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ------------------------------------------------------------------------------ names / import


def test_torch_names_shapes_and_round_trip(variables, state_dict):
    assert all(NAME.fullmatch(n) for n in state_dict), [
        n for n in state_dict if not NAME.fullmatch(n)
    ]
    convs = [n for n in state_dict if n.endswith(".conv.weight")]
    assert len(convs) == 94 and len(state_dict) == 94 * 5
    trainable = sum(v.size for n, v in state_dict.items() if "running" not in n)
    assert trainable == TRUNK_PARAMS
    for name, shape in KNOWN_SHAPES.items():
        assert state_dict[name].shape == shape, name
    # torch layout: conv (O, I, kh, kw) is the flax (kh, kw, I, O) kernel transposed.
    kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        state_dict["Mixed_6b.branch7x7_2.conv.weight"], kernel.transpose(3, 2, 0, 1)
    )
    np.testing.assert_array_equal(
        state_dict["Mixed_5b.branch1x1.bn.running_var"],
        variables["batch_stats"]["Mixed_5b"]["branch1x1"]["bn"]["var"],
    )
    # The real checkpoint also has the 1008-way classifier and maybe num_batches_tracked: ignored.
    extra = {
        "fc.weight": np.zeros((1008, 2048), np.float32),
        "fc.bias": np.zeros(1008, np.float32),
        "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0, np.int64),
    }
    back = inc.inception_from_torch({**state_dict, **extra})
    assert back.keys() == {"params", "batch_stats"}
    _assert_same_tree(back, variables)


def test_bad_state_dict_names_tensor_and_shapes(state_dict):
    bad = dict(state_dict)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    bad["Mixed_7c.branch1x1.bn.running_mean"] = np.zeros(3, np.float32)
    del bad["Mixed_5b.branch_pool.bn.bias"]
    bad["Mixed_5b.extra.bn.running_var"] = np.zeros(2, np.float32)
    with pytest.raises(WeightsError) as e:
        inc.inception_from_torch(bad)
    msg = str(e.value)
    assert "4 weight problem(s)" in msg
    assert "'Mixed_6b.branch7x7_2.conv.weight'" in msg and "(128, 128, 7, 1)" in msg
    assert "(1, 7, 128, 128)" in msg  # the model's (flax) shape
    assert "'Mixed_7c.branch1x1.bn.running_mean'" in msg and "(3,)" in msg and "(320,)" in msg
    assert "missing 'Mixed_5b.branch_pool.bn.bias'" in msg
    assert "unexpected 'Mixed_5b.extra.bn.running_var'" in msg


def test_load_inception_files(tmp_path, state_dict, variables, monkeypatch):
    missing = tmp_path / inc.FID_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        inc.load_inception(missing)
    npz = tmp_path / "inception.npz"
    np.savez(npz, **state_dict)
    _assert_same_tree(inc.load_inception(npz), variables)
    with pytest.raises(WeightsError, match=r"\.pth/\.pt or \.npz"):
        inc.load_inception(npz.rename(tmp_path / "inception.bin"))
    pth = tmp_path / "inception.pth"
    pth.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"Convert.*\.npz"):
        inc.load_inception(pth)


def test_load_inception_pth(tmp_path, state_dict, variables):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "inception.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth)
    _assert_same_tree(inc.load_inception(pth), variables)


# ------------------------------------------------------------------------------ numerics


def test_preprocess_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for shape in [(2, 40, 56, 3), (1, 320, 411, 3)]:  # up- and down-sampling (no antialias)
        u8 = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255,
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(inc.preprocess(u8)), ref, atol=1e-6)
        np.testing.assert_allclose(np.asarray(inc.preprocess(u8 / 255.0)), ref, atol=1e-6)
    x = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(inc.preprocess(x, None)), x / 127.5 - 1, atol=1e-6)


def _torch_reference(state_dict, x):
    """pytorch-fid's forward (torchvision trunk + FIDInceptionA/C/E_1/E_2) in torch functional
    form, NCHW, from the state dict alone."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in state_dict.items()}

    def c(name, x, stride=1, padding=0):
        x = F.conv2d(x, t[f"{name}.conv.weight"], stride=stride, padding=padding)
        bn = [t[f"{name}.bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.relu(F.batch_norm(x, *bn, training=False, eps=0.001))

    def avg(x):
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def block_a(p, x):
        b5 = c(f"{p}.branch5x5_2", c(f"{p}.branch5x5_1", x), padding=2)
        bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
        bd = c(f"{p}.branch3x3dbl_3", bd, padding=1)
        bp = c(f"{p}.branch_pool", avg(x))
        return torch.cat([c(f"{p}.branch1x1", x), b5, bd, bp], 1)

    def block_b(p, x):
        b3 = c(f"{p}.branch3x3", x, stride=2)
        bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
        bd = c(f"{p}.branch3x3dbl_3", bd, stride=2)
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)

    def block_c(p, x):
        b7 = c(f"{p}.branch7x7_1", x)
        b7 = c(f"{p}.branch7x7_2", b7, padding=(0, 3))
        b7 = c(f"{p}.branch7x7_3", b7, padding=(3, 0))
        bd = c(f"{p}.branch7x7dbl_1", x)
        for i, pad in zip(range(2, 6), [(3, 0), (0, 3), (3, 0), (0, 3)], strict=True):
            bd = c(f"{p}.branch7x7dbl_{i}", bd, padding=pad)
        bp = c(f"{p}.branch_pool", avg(x))
        return torch.cat([c(f"{p}.branch1x1", x), b7, bd, bp], 1)

    def block_d(p, x):
        b3 = c(f"{p}.branch3x3_2", c(f"{p}.branch3x3_1", x), stride=2)
        b7 = c(f"{p}.branch7x7x3_1", x)
        b7 = c(f"{p}.branch7x7x3_2", b7, padding=(0, 3))
        b7 = c(f"{p}.branch7x7x3_3", b7, padding=(3, 0))
        b7 = c(f"{p}.branch7x7x3_4", b7, stride=2)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    def block_e(p, x, pool):
        b3 = c(f"{p}.branch3x3_1", x)
        b3 = [
            c(f"{p}.branch3x3_2a", b3, padding=(0, 1)),
            c(f"{p}.branch3x3_2b", b3, padding=(1, 0)),
        ]
        bd = c(f"{p}.branch3x3dbl_2", c(f"{p}.branch3x3dbl_1", x), padding=1)
        bd = [
            c(f"{p}.branch3x3dbl_3a", bd, padding=(0, 1)),
            c(f"{p}.branch3x3dbl_3b", bd, padding=(1, 0)),
        ]
        bp = c(f"{p}.branch_pool", pool(x))
        return torch.cat([c(f"{p}.branch1x1", x), *b3, *bd, bp], 1)

    with torch.no_grad():
        x = c("Conv2d_1a_3x3", x, stride=2)
        x = c("Conv2d_2a_3x3", x)
        x = F.max_pool2d(c("Conv2d_2b_3x3", x, padding=1), 3, stride=2)
        x = c("Conv2d_3b_1x1", x)
        x = F.max_pool2d(c("Conv2d_4a_3x3", x), 3, stride=2)
        for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            x = block_a(p, x)
        x = block_b("Mixed_6a", x)
        for p in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = block_c(p, x)
        x = block_d("Mixed_7a", x)
        x = block_e("Mixed_7b", x, avg)
        x = block_e("Mixed_7c", x, lambda x: F.max_pool2d(x, 3, stride=1, padding=1))
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1).numpy()


def test_features_match_torch_reference(state_dict, images, features):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    ref = _torch_reference(state_dict, x)
    got = features[:2]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_features_shape_range_and_batching(variables, images, features):
    assert features.shape == (6, inc.FEATURE_DIM) and features.dtype == np.float32
    assert np.all(np.isfinite(features)) and np.all(features >= 0)  # post-ReLU average pool
    assert features.std(0).mean() > 1e-3  # not a constant: depends on the image
    p, s = variables["params"], variables["batch_stats"]
    # Zero-padding of the last batch and chunked input change nothing.
    np.testing.assert_allclose(
        inc.fid_features(p, s, images[:2], BATCH, image_size=None),
        features[:2],
        rtol=1e-5,
        atol=1e-6,
    )
    chunks = [images[:3], images[3:]]
    np.testing.assert_allclose(
        inc.fid_features(p, s, iter(chunks), BATCH, image_size=None), features, rtol=1e-5, atol=1e-6
    )
    # (float [0, 1] input = uint8 input is checked on `preprocess`; a float batch would compile
    # the forward again.) Out-of-range floats are refused before anything runs.
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inc.fid_features(p, s, images / 127.5 - 1, BATCH, image_size=None)
    with pytest.raises(ValueError, match="75"):
        inc.fid_features(p, s, images[:, :64, :64], BATCH, image_size=None)


@pytest.mark.slow  # each 2048-d Fréchet distance is ~4 s of eigendecompositions here
def test_fid_self_zero_and_grows_with_perturbation(variables, images):
    real = images
    noise = np.random.default_rng(3).integers(-60, 61, images.shape)
    fake = np.clip(images.astype(int) + noise, 0, 255).astype(np.uint8)
    same = inc.fid_from_images(variables, real, real, batch_size=BATCH, image_size=None)
    diff = inc.fid_from_images(variables, real, fake, batch_size=BATCH, image_size=None)
    assert diff > 1e-3
    assert same < 1e-4 * diff
