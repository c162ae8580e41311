"""The Shapes testbed: determinism, held-out split, captions vs labels vs pixels, TFDS and Grain."""

import numpy as np
import pytest

from flash_jax.data import datasets, sources
from flash_jax.data import shapes as S

N = 300  # records per split for the statistical checks


@pytest.fixture(scope="module")
def records():
    return {split: [S.sample_record(0, split, i) for i in range(N)] for split in S.SPLITS}


def _pairs(r):
    n = int(r["num_objects"])
    return {
        (int(c), int(s)) for c, s in zip(r["object_color"][:n], r["object_shape"][:n], strict=True)
    }


# ------------------------------------------------------------------------------ determinism


def test_deterministic_and_distinct():
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    a = S.make_example(3, "train", 17)
    b = S.make_example(3, "train", 17)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    assert a.keys() == b.keys()
    for k in a:
        assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
    for other in (S.make_example(3, "train", 18), S.make_example(4, "train", 17)):
        assert other["image"].tobytes() != a["image"].tobytes()
    assert S.make_example(3, "eval", 17)["image"].tobytes() != a["image"].tobytes()
    assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8


def test_layout_and_categories(records):
    recs = records["train"]
    assert {S.CATEGORIES[int(r["category"])] for r in recs} == set(S.CATEGORIES)
    for r in recs:
        n = int(r["num_objects"])
        assert 1 <= n <= S.MAX_OBJECTS
        np.testing.assert_array_equal(r["object_present"], np.arange(S.MAX_OBJECTS) < n)
        for k in ("object_color", "object_shape", "object_texture", "object_size"):
            assert r[k].shape == (S.MAX_OBJECTS,) and r[k].dtype == np.int32
            assert (r[k][n:] == -1).all() and (r[k][:n] >= 0).all()
        assert r["object_xy"].shape == (3, 2) and r["object_xy"].dtype == np.float32
        assert r["object_mentioned"].shape == (3, len(S.ATTRIBUTES))
        assert not r["object_mentioned"][n:].any() and r["object_mentioned"][:n, 1].all()
    for cat in S.CATEGORIES:
        assert S.CATEGORIES[int(S.sample_record(0, "train", 5, category=cat)["category"])] == cat
    with pytest.raises(ValueError, match="split"):
        S.sample_record(0, "test", 0)


# ------------------------------------------------------------------------------ held-out split


def test_heldout_pairs_only_in_heldout(records):
    held = set(S.HELDOUT_PAIRS)
    assert 0.1 < len(held) / (len(S.COLORS) * len(S.SHAPES)) < 0.2
    for split in ("train", "eval"):
        seen = set().union(*(_pairs(r) for r in records[split]))
        assert not seen & held, split
        assert seen == set(S.TRAIN_PAIRS), split  # every training pair does occur
    seen_held = set()
    for r in records["heldout"]:
        assert _pairs(r) & held, r["caption"]
        seen_held |= _pairs(r) & held
    assert seen_held == held


# ------------------------------------------------------------------------------ captions


_WORDS = {
    **{w: ("color", i) for i, w in enumerate(S.COLORS)},
    **{w: ("texture", i) for i, w in enumerate(S.TEXTURES)},
    **{w: ("size", i) for i, w in enumerate(S.SIZES)},
    **{w: ("shape", i) for i, w in enumerate(S.SHAPES)},
    **{w: ("shapes", i) for i, w in enumerate(S.SHAPE_PLURALS)},
}
_DETS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def _parse(caption):
    """Caption -> (objects in order as {attr: value}, relation index or -1), independently."""
    text = caption.replace(",", "")
    relation = -1
    for i, phrase in enumerate(S.RELATION_PHRASES):
        if f" {phrase} " in text:
            assert relation == -1, caption
            relation = i
            text = text.replace(f" {phrase} ", " and ")
    objs, cur, count = [], None, 0
    for word in text.split():
        if word == "and":
            assert cur is None, caption
        elif word in _DETS:
            assert cur is None, caption
            cur, count = {}, _DETS[word]
        else:
            kind, value = _WORDS[word]
            if kind in ("shape", "shapes"):
                assert (kind == "shapes") == (count > 1), caption
                cur["shape"] = value
                objs += [dict(cur) for _ in range(count)]
                cur = None
            else:
                assert kind not in cur, caption
                cur[kind] = value
    assert cur is None, caption
    return objs, relation


def test_caption_agrees_with_labels(records):
    for split in S.SPLITS:
        for r in records[split]:
            objs, relation = _parse(r["caption"])
            assert len(objs) == int(r["num_objects"]), r["caption"]
            assert relation == int(r["relation"]), r["caption"]
            for i, o in enumerate(objs):
                for j, attr in enumerate(S.ATTRIBUTES):
                    assert (attr in o) == bool(r["object_mentioned"][i, j]), r["caption"]
                    if attr in o:
                        assert o[attr] == int(r[f"object_{attr}"][i]), (r["caption"], attr, i)
            if not r["object_mentioned"][:, 2].any():  # unmentioned textures are plain
                assert (r["object_texture"][: len(objs)] == 0).all(), r["caption"]
            if S.CATEGORIES[int(r["category"])] == "counting":
                assert "a" not in r["caption"].split()


def test_an_before_vowel():
    caps = [S.sample_record(0, "train", i)["caption"] for i in range(200)]
    joined = " ".join(caps)
    assert " a orange" not in joined and not joined.startswith("a orange")
    assert "an orange" in joined


# ------------------------------------------------------------------------------ pixels


@pytest.fixture(scope="module")
def rendered(records):
    out = []
    for split in S.SPLITS:
        for r in records[split][:60]:
            out.append((r, *S.render_with_masks(r)))
    for i in range(40):  # enough spatial relations
        r = S.sample_record(1, "train", i, category="spatial")
        out.append((r, *S.render_with_masks(r)))
    return out


def _centroid(mask):
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    w = mask.sum()
    return np.array([(xs * mask).sum() / w + 0.5, (ys * mask).sum() / w + 0.5]) / mask.shape[0]


def test_spatial_relation_matches_rendered_centroids(rendered):
    checked = 0
    for r, _, masks in rendered:
        n = int(r["num_objects"])
        cents = [_centroid(masks[i]) for i in range(n)]
        for i in range(n):  # labels point at the drawn object (area centroid, <1.5 px off)
            assert np.abs(cents[i] - r["object_xy"][i]).max() * 64 < 1.5, r["caption"]
        rel = int(r["relation"])
        if rel < 0:
            continue
        (x0, y0), (x1, y1) = cents[0], cents[1]
        dx, dy = x1 - x0, y1 - y0  # image coordinates: y grows downwards
        expected = {0: dx > abs(dy), 1: -dx > abs(dy), 2: dy > abs(dx), 3: -dy > abs(dx)}
        assert expected[rel], (r["caption"], cents[:2])
        checked += 1
    assert checked >= 30


def test_image_shows_labelled_colors_at_objects(rendered):
    for r, image, masks in rendered:
        n = int(r["num_objects"])
        img = image.astype(np.int32)
        assert np.abs(masks[:n].sum((1, 2)) > 10).all()
        assert masks[n:].sum() == 0
        for i in range(n):
            inside = masks[i] > 0.99
            rgb = S.COLOR_RGB[int(r["object_color"][i])].astype(np.int32)
            close = np.abs(img[inside] - rgb).max(-1) <= 8
            need = 0.95 if int(r["object_texture"][i]) == 0 else 0.2
            assert close.mean() >= need, (r["caption"], i, close.mean())
            # every interior pixel mixes the object color and its texture's pattern color only
            pat = S._pattern_rgb(rgb.astype(np.float32), int(r["background"]))
            d = pat - rgb
            t = np.clip(((img[inside] - rgb) @ d) / max(float(d @ d), 1e-6), 0.0, 1.0)
            off = np.linalg.norm(img[inside] - (rgb + t[:, None] * d), axis=-1)
            assert off.max() <= 3.0, (r["caption"], i, off.max())
            x, y = (r["object_xy"][i] * 64).astype(int)
            window = img[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].reshape(-1, 3)
            assert (np.abs(window - rgb).max(-1) <= 8).any(), (r["caption"], i)
        # outside every object: only grey background, never an object color
        bg = img[masks.sum(0) < 1e-3]
        assert (bg.max(-1) - bg.min(-1)).max() <= 1, r["caption"]


def test_fallback_placement_is_valid():
    r = S.SIZE_RADIUS[0]
    for rel in (-1, 0, 1, 2, 3):
        xy = S._canonical_place(3, rel)
        assert ((xy >= r + S._PAD) & (xy <= 1 - r - S._PAD)).all()
        assert min(np.hypot(*(xy[i] - xy[j])) for i, j in ((0, 1), (0, 2), (1, 2))) >= 2 * r
        assert rel < 0 or S._relation_holds(xy[0], xy[1], r, r, rel)


def test_other_image_sizes():
    for size in (32, 48, 96):
        image, masks = S.render_with_masks(S.sample_record(0, "train", 7), size)
        assert image.shape == (size, size, 3) and masks.shape == (3, size, size)
        assert masks.sum() > 0


def test_cli_writes_grid(tmp_path):
    out = tmp_path / "grid.png"
    S.main(["--out", str(out), "--n", "5", "--cols", "3", "--split", "heldout"])
    from PIL import Image

    assert Image.open(out).size[0] > 3 * 64


# ------------------------------------------------------------------------------ TFDS + Grain


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    return sources.build_shapes_tfds(
        root, seed=0, num_records={"train": 24, "eval": 6, "heldout": 6}
    )


def test_tfds_round_trip(tfds_dir):
    src = datasets.tfds_source(
        tfds_dir.parent.parent.parent, "train", sources.ShapesBuilder.name
    )  # root with one dataset
    assert len(src) == 24
    for i in (0, 5, 23):
        got = sources._normalise(src[i])
        ref = S.make_example(0, "train", i)
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
    assert len(datasets.tfds_source(tfds_dir, "heldout", sources.ShapesBuilder.name)) == 6
    # The disk pipeline and the on-the-fly one yield identical batches.
    kw = dict(split="train", batch_size=5, seed=3, num_records=24)
    _assert_batches_equal(
        _batches(sources.make_shapes_dataset(tfds_dir, **kw), 6),
        _batches(sources.make_shapes_dataset(None, **kw), 6),
    )


def test_iterator_state_resume(tfds_dir):
    for data_dir in (None, tfds_dir):
        ds = sources.make_shapes_dataset(data_dir, "train", 4, seed=7, num_records=12)
        it = iter(ds)
        for _ in range(4):  # crosses an epoch boundary (3 batches per epoch)
            next(it)
        state = it.get_state()
        expected = _batches_from(it, 3)
        fresh = iter(ds)
        fresh.set_state(state)
        _assert_batches_equal(_batches_from(fresh, 3), expected)


def _batches_from(it, n):
    return [next(it) for _ in range(n)]


def test_shards_partition_records_and_epochs_reshuffle():
    per_shard = []
    for shard in range(3):
        ds = sources.make_shapes_dataset(
            None, "eval", 2, seed=1, shard_index=shard, shard_count=3, num_records=31,
            num_epochs=2,
        )  # fmt: skip
        idx = np.concatenate([b["index"] for b in ds])
        assert len(idx) == 20  # 31 // 3 = 10 records per shard, two epochs
        first, second = idx[:10], idx[10:]
        assert sorted(first) == sorted(second) and not np.array_equal(first, second)
        per_shard.append(set(first.tolist()))
    assert sum(map(len, per_shard)) == 30 and len(set().union(*per_shard)) == 30
    unshuffled = sources.make_shapes_dataset(
        None, "eval", 5, seed=1, shard_index=1, shard_count=3, num_records=31, shuffle=False,
        num_epochs=1,
    )  # fmt: skip
    assert np.concatenate([b["index"] for b in unshuffled]).tolist() == list(range(10, 20))
    assert datasets.shard_bounds(31, 2, 3, drop_remainder=False) == (21, 31)
    with pytest.raises(ValueError, match="shard_index"):
        datasets.shard_bounds(31, 3, 3)
