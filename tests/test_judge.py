"""The judge: targets from labels, the alignment rule (oracle outputs), held-out mixing, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import judge as judge_config
from flash_jax.data import shapes as S
from flash_jax.eval import judge as J
from flash_jax.eval import metrics
from flash_jax.methods import judge as judge_method
from flash_jax.train import loop

RED, GREEN, BLUE, PURPLE = (S.COLORS.index(c) for c in ("red", "green", "blue", "purple"))
CIRCLE, SQUARE, STAR = (S.SHAPES.index(s) for s in ("circle", "square", "star"))
STRIPED, DOTTED = S.TEXTURES.index("striped"), S.TEXTURES.index("dotted")


def _batch(records):
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0] if k != "caption"}


def _by_category(split, n_per_category=60):
    return [
        S.sample_record(0, split, i, category)
        for category in S.CATEGORIES
        for i in range(n_per_category)
    ]


@pytest.fixture(scope="module")
def records():
    return _by_category("train") + _by_category("heldout")


# ------------------------------------------------------------------------------ targets


def _record(objs, category="complex", relation=-1):
    """A hand-made record: objs = [(color, shape, texture, size, (x, y), mentioned(4))]."""
    n, pad = len(objs), S.MAX_OBJECTS - len(objs)
    col = lambda i, fill: np.array([o[i] for o in objs] + [fill] * pad)  # noqa: E731
    return {
        "category": np.int32(S.CATEGORIES.index(category)),
        "num_objects": np.int32(n),
        "object_present": np.arange(S.MAX_OBJECTS) < n,
        "object_color": col(0, -1).astype(np.int32),
        "object_shape": col(1, -1).astype(np.int32),
        "object_texture": col(2, -1).astype(np.int32),
        "object_size": col(3, -1).astype(np.int32),
        "object_xy": np.array([o[4] for o in objs] + [(0.0, 0.0)] * pad, np.float32),
        "object_mentioned": np.array([o[5] for o in objs] + [(False,) * 4] * pad, bool),
        "relation": np.int32(relation),
    }


CS = (True, True, False, False)


def _touching(record, grid=8):
    """Some cell of one object's 2x2 presence block neighbours the other's centroid cell: 3x3
    peak picking in `detect` may then merge or drop one (documented; ~0.1 % of records)."""
    n = int(record["num_objects"])
    xy = record["object_xy"][:n] * grid
    cells, base = np.floor(xy).astype(int), np.floor(xy - 0.5).astype(int)
    blocks = [base[i] + np.array([(0, 0), (0, 1), (1, 0), (1, 1)]) for i in range(n)]
    return any(
        (np.abs(blocks[i] - cells[j]).max(1) <= 1).any()
        for i in range(n)
        for j in range(n)
        if i != j
    )


def test_targets_from_hand_made_labels():
    a = _record(
        [
            (PURPLE, CIRCLE, 0, 0, (0.2, 0.3), CS),
            (PURPLE, CIRCLE, STRIPED, 1, (0.6, 0.7), CS),
            (RED, STAR, DOTTED, 1, (0.8, 0.15), CS),
        ]
    )
    b = _record([(BLUE, SQUARE, 0, 0, (0.5, 0.9), CS)])
    t = J.judge_targets(_batch([a, b]), grid=8)
    assert t["object"].shape == (2, 8, 8) and t["color"].dtype == np.int32
    # Presence: bilinear over the 2x2 cells around the centroid, e.g. (0.2, 0.3) * 8 = (1.6, 2.4)
    # is 0.1 / 0.9 of the way between the centres of columns 1, 2 / rows 1, 2.
    np.testing.assert_allclose(t["object"].sum((1, 2)), [3.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(
        t["object"][0, 1:3, 1:3], [[0.1 * 0.9, 0.1 * 0.1], [0.9 * 0.9, 0.9 * 0.1]], atol=1e-5
    )
    # Attributes and offsets (cells, from the cell's corner) in the centroid's cell [row, col] =
    # [floor(8 y), floor(8 x)] ...
    want = {
        (0, 2, 1): (PURPLE, CIRCLE, 0, 0, (0.6, 0.4)),
        (0, 5, 4): (PURPLE, CIRCLE, STRIPED, 1, (0.8, 0.6)),
        (0, 1, 6): (RED, STAR, DOTTED, 1, (0.4, 0.2)),
        (1, 7, 4): (BLUE, SQUARE, 0, 0, (0.0, 0.2)),
    }
    for cell, (c, s, tx, z, off) in want.items():
        got = tuple(int(t[k][cell]) for k in ("color", "shape", "texture", "size"))
        assert got == (c, s, tx, z), cell
        np.testing.assert_allclose(t["offset"][cell], off, atol=1e-5)
    # ... and in the 3x3 cells around it (clipped at the border).
    assert t["weight"][0].sum() == 9 + 9 + 9 and t["weight"][1].sum() == 6
    assert t["color"][0, 3, 2] == PURPLE and t["texture"][0, 4, 5] == STRIPED
    np.testing.assert_allclose(t["offset"][0, 3, 2], (-0.4, -0.6), atol=1e-5)
    np.testing.assert_allclose(t["offset"][0, 0, 7], (-0.6, 1.2), atol=1e-5)
    off = t["weight"] == 0
    for k in ("object", "color", "shape", "texture", "size", "offset"):
        assert not t[k][off].any(), k
    # A cell within reach of two objects takes the nearer one.
    c = _record([(RED, CIRCLE, 0, 0, (0.2, 0.5), CS), (BLUE, SQUARE, 0, 0, (0.45, 0.5), CS)])
    t = J.judge_targets(_batch([c]), grid=8)
    assert t["color"][0, 4, 2] == RED and t["color"][0, 3, 2] == RED
    assert t["color"][0, 4, 3] == BLUE and t["color"][0, 4, 4] == BLUE


def test_targets_match_generated_records(records):
    labels = _batch(records)
    t = J.judge_targets(labels, grid=8)
    touching = np.array([_touching(r) for r in records])
    mass = t["object"].sum((1, 2))
    np.testing.assert_allclose(mass[~touching], labels["num_objects"][~touching], atol=1e-4)
    det = J.detect(J.oracle_outputs(t))
    pairs = J.pair_outputs(det)
    for r, count, xy, skip in zip(records, pairs["count"], pairs["xy"], touching, strict=True):
        if skip:
            continue
        n = int(r["num_objects"])
        assert count.sum() == n
        for c, s in zip(r["object_color"][:n], r["object_shape"][:n], strict=True):
            same = (r["object_color"][:n] == c) & (r["object_shape"][:n] == s)
            assert count[c, s] == same.sum()
            np.testing.assert_allclose(xy[c, s], r["object_xy"][:n][same].mean(0), atol=1e-5)


def test_oracle_outputs_align_on_every_category(records):
    touching = np.array([_touching(r) for r in records])
    assert touching.mean() < 0.08
    labels = _batch(records)
    result = J.alignment(J.oracle_outputs(J.judge_targets(labels)), labels)
    assert result["all"].shape == (len(records),) and result["all"][~touching].all()
    assert result["all"].mean() > 0.995  # the rare merges (~0.1 % of records) cap the ceiling
    category = labels["category"][~touching]
    for i, name in enumerate(S.CATEGORIES):
        assert result[name].size == 120 and result["all"][~touching][category == i].all(), name


def _absent(values, present):
    return next(v for v in range(values) if v not in present)


def _corrupt_caption(r):
    """A copy of record r whose caption labels state one mentioned attribute wrongly, or None."""
    r = {k: np.array(v) for k, v in r.items()}
    n = int(r["num_objects"])
    m = r["object_mentioned"][0]
    shapes_here = set(r["object_shape"][:n].tolist())
    cat = S.CATEGORIES[int(r["category"])]
    same_shape = r["object_shape"][:n] == r["object_shape"][0]
    if cat == "spatial":
        r["relation"] = {0: 1, 1: 0, 2: 3, 3: 2}[int(r["relation"])]  # the opposite relation
    elif cat == "texture":  # color unmentioned: a texture no object of that shape has
        r["object_texture"][0] = _absent(4, set(r["object_texture"][:n][same_shape].tolist()))
    elif cat == "shape":
        r["object_shape"][0] = _absent(len(S.SHAPES), shapes_here)
    elif cat == "counting":  # ask for one more object of the first group
        group = (r["object_color"][:n] == r["object_color"][0]) & same_shape
        if group.sum() == n and n < 3:
            r["num_objects"] = np.int32(n + 1)
            r["object_present"][n] = True
            for k in ("object_color", "object_shape", "object_texture", "object_size"):
                r[k][n] = r[k][0]
            r["object_mentioned"][n] = r["object_mentioned"][0]
        else:
            return None
    else:  # color / complex: a color no object of that shape has
        assert m[0]
        r["object_color"][0] = _absent(8, set(r["object_color"][:n][same_shape].tolist()))
    return r


def test_one_wrong_mentioned_attribute_fails(records):
    pairs = [(r, _corrupt_caption(r)) for r in records]
    pairs = [(r, c) for r, c in pairs if c is not None]
    assert len(pairs) > 400
    truth = _batch([r for r, _ in pairs])
    oracle = J.oracle_outputs(J.judge_targets(truth))  # what the image shows
    wrong = _batch([c for _, c in pairs])
    result = J.alignment(oracle, wrong)
    for name in S.CATEGORIES:
        assert result[name].size > 0 and not result[name].any(), name


def _image_shows(*objs):
    """Oracle judge outputs for an image holding exactly `objs` (`_record` tuples)."""
    return J.oracle_outputs(J.judge_targets(_batch([_record(list(objs))])))


def _with(obj, **changes):
    fields = ("color", "shape", "texture", "size", "xy", "mentioned")
    return tuple(changes.get(f, v) for f, v in zip(fields, obj, strict=True))


def test_alignment_rule_on_hand_made_images():
    red = (RED, CIRCLE, STRIPED, 1, (0.2, 0.5), (True, True, True, True))
    blue = (BLUE, SQUARE, DOTTED, 0, (0.7, 0.55), (True, True, True, False))
    caption = _batch([_record([red, blue], relation=S.RELATIONS.index("left of"))])

    def aligned(*objs):
        return bool(J.alignment(_image_shows(*objs), caption)["all"][0])

    assert aligned(red, blue)
    assert aligned(red, blue, (PURPLE, STAR, 0, 0, (0.5, 0.9), CS))  # extra objects are ignored
    assert not aligned(blue)  # no red circle
    assert not aligned(_with(red, color=PURPLE), blue)
    assert not aligned(red, _with(blue, shape=STAR))
    assert not aligned(_with(red, texture=DOTTED), blue)
    assert not aligned(_with(red, size=0), blue)  # "large" is mentioned
    assert aligned(red, _with(blue, size=1))  # blue's size is not
    assert aligned(_with(red, xy=(0.45, 0.5)), blue)  # still left of
    assert not aligned(_with(red, xy=(0.9, 0.5)), blue)  # right of
    assert not aligned(_with(red, xy=(0.65, 0.15)), blue)  # x gap 0.05 < margin
    assert not aligned(_with(red, xy=(0.3, 0.05)), blue)  # farther above than left: off the cone

    # Unmentioned color: any color satisfies it, but the texture binds to the same object.
    circle = (RED, CIRCLE, STRIPED, 0, (0.2, 0.5), (False, True, True, False))
    square = (BLUE, SQUARE, DOTTED, 0, (0.7, 0.5), (False, True, True, False))
    caption = _batch([_record([circle, square], "texture")])
    out = _image_shows(_with(circle, color=GREEN), square)
    assert J.alignment(out, caption)["all"].all()
    out = _image_shows(_with(circle, texture=DOTTED), _with(square, texture=STRIPED))
    assert not J.alignment(out, caption)["all"].any()


def test_detect_peaks_and_mass():
    def detections(probs, color_at=None):
        logits = np.full((1, 8, 8), -12.0)
        for cell, p in probs.items():
            logits[(0, *cell)] = np.log(p) - np.log1p(-p)
        out = {
            "object_logits": logits,
            "offset": np.full((1, 8, 8, 2), 0.5),
            **{
                f"{a}_logits": np.zeros((1, 8, 8, n))
                for a, n in (("shape", 6), ("texture", 4), ("size", 2))
            },
            "color_logits": np.zeros((1, 8, 8, 8)),
        }
        for cell, c in (color_at or {}).items():
            out["color_logits"][(0, *cell, c)] = 5.0
        det = J.detect(out)
        return det, np.flatnonzero(det["present"][0])

    assert len(detections({(3, 3): 0.99})[1]) == 1
    assert len(detections({(3, 3): 0.45})[1]) == 0  # not enough alone
    det, found = detections({(3, 3): 0.3, (3, 4): 0.3, (4, 3): 0.2}, {(3, 3): BLUE})
    assert found.tolist() == [3 * 8 + 3] and det["color"][0, found[0]] == BLUE  # split: once
    assert detections({(3, 3): 0.4, (4, 4): 0.4})[1].tolist() == [3 * 8 + 3]  # tie: first wins
    assert len(detections({(3, 3): 0.9, (3, 5): 0.9})[1]) == 2  # two cells apart: two objects
    det, found = detections({(2, 6): 0.9})
    np.testing.assert_allclose(det["xy"][0, found[0]], [6.5 / 8, 2.5 / 8])


def test_counting_needs_the_exact_number():
    two = _record([(PURPLE, CIRCLE, 0, 0, (0.2, 0.5), CS), (PURPLE, CIRCLE, 0, 1, (0.7, 0.5), CS)])
    two["category"] = np.int32(S.CATEGORIES.index("counting"))
    labels = _batch([two])
    out = J.oracle_outputs(J.judge_targets(labels))
    assert J.alignment(out, labels)["all"].all()
    three = {k: v.copy() for k, v in out.items()}
    three["object_logits"][0, 0, 7] = 10.0  # a third purple circle (same attributes as cell 0,0)
    three["color_logits"][0, 0, 7] = 10.0 * np.eye(8)[PURPLE]
    three["shape_logits"][0, 0, 7] = 10.0 * np.eye(6)[CIRCLE]
    assert not J.alignment(three, labels)["all"].any()
    complex_labels = {**labels, "category": np.array([S.CATEGORIES.index("complex")])}
    assert J.alignment(three, complex_labels)["all"].all()  # elsewhere, at least is enough


# ------------------------------------------------------------------------------ augmentation


def test_permute_channels_changes_only_colors():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 4, 4, 3), np.uint8))
    out, mask = judge_method.permute_channels(images, jax.random.PRNGKey(1), 0.5)
    out, mask = np.asarray(out), np.asarray(mask)
    assert out.dtype == np.uint8 and 0.3 < mask.mean() < 0.7
    np.testing.assert_array_equal(out[mask == 1], np.asarray(images)[mask == 1])
    moved = out[mask == 0]
    assert (moved != np.asarray(images)[mask == 0]).any(axis=(1, 2, 3)).all()
    np.testing.assert_array_equal(np.sort(moved, -1), np.sort(np.asarray(images)[mask == 0], -1))
    grey = jnp.full((4, 4, 4, 3), 128, jnp.uint8)
    np.testing.assert_array_equal(
        judge_method.permute_channels(grey, jax.random.PRNGKey(2), 1.0)[0], grey
    )


# ------------------------------------------------------------------------------ network + training


@pytest.fixture(scope="module")
def tiny():
    config = judge_config.get_config("tiny")
    jcfg = J.JudgeConfig.from_dict(config.model.judge.to_dict())
    return config, jcfg, J.init_params(jcfg, jax.random.PRNGKey(0), config.data.image_size)


def test_outputs_shapes_and_config_from_params(tiny):
    _, jcfg, params = tiny
    images = np.zeros((3, 16, 16, 3), np.uint8)
    out = J.apply(params, images)
    g = jcfg.grid(16)
    assert g == 4 and out["object_logits"].shape == (3, g, g)
    for k, n in (("color", 8), ("shape", 6), ("texture", 4), ("size", 2)):
        assert out[f"{k}_logits"].shape == (3, g, g, n), k
    assert out["offset"].shape == (3, g, g, 2)
    assert float(out["offset"].min()) >= -1 and float(out["offset"].max()) <= 2
    assert J.features(params, images).shape == (3, jcfg.features)
    assert J.config_from_params(params) == jcfg
    full = jax.eval_shape(lambda: J.init_params(J.JudgeConfig(), jax.random.PRNGKey(0)))
    assert J.config_from_params(full) == J.JudgeConfig()
    with pytest.raises(ValueError, match="unknown judge config keys"):
        J.JudgeConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="not divisible"):
        jcfg.grid(18)


def test_judge_overfits_a_batch(tiny):
    _, jcfg, params = tiny
    examples = [S.make_example(0, "train", i, 16) for i in range(8)]
    raw = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
    targets = J.judge_targets(raw, jcfg.grid(16))
    tx = optax.adam(1e-2)

    def loss_fn(p):
        return J.judge_loss(J.Judge(jcfg).apply({"params": p}, raw["image"]), targets)[0]

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, s = params, tx.init(params)
    first = None
    for _ in range(40):
        p, s, loss = step(p, s)
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first


def test_tiny_judge_trains_with_the_generic_trainer(tmp_path, tiny):
    config, jcfg, _ = tiny
    loop.train(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, config.total_steps + 1))
    assert all(np.isfinite(r["loss"]) and r["loss_object"] > 0 for r in rows)
    params, loaded_cfg = J.load_judge(tmp_path)
    assert loaded_cfg == jcfg
    images, labels = J.real_examples("heldout", 6, image_size=16)
    report = judge_method.evaluate_judge(params, images, labels, loaded_cfg)
    for k in J.TABLE_COLUMNS:
        assert k in report
    assert report["n"] == 6 and 0.0 <= report["all"] <= 1.0
    table = metrics.markdown_table({"heldout": report}, J.TABLE_COLUMNS)
    assert "| heldout |" in table
    assert params["head"]["conv"]["kernel"].shape[-1] == 16
    more, _ = J.real_examples("eval", 12, image_size=16)
    assert J.fd_judge(params, more, more) == pytest.approx(0.0, abs=1e-6)
    assert J.fd_judge(params, more, more[:, ::-1]) > 0  # vertically flipped images
