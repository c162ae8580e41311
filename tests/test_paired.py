"""Paired bootstrap comparisons (flash_jax/eval/paired.py) against the plain metrics and closed
forms: the whole-set values equal `metrics`' pooled ones, weighted moments equal those of the
explicitly resampled data, and the intervals behave (0 inside for equal rows, excluded for a
shift far above the noise, paired by seed)."""

import numpy as np
import pytest

from flash_jax.data import shapes
from flash_jax.eval import metrics, paired


def _record(rng, n=60, s=2, f=5, shift=0.0, chroma_shift=0.0, correct_p=0.5):
    images = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for _ in range(s)]
    features = [rng.normal(size=(n, f)) + shift for _ in range(s)]
    correct = [rng.random(n) < correct_p for _ in range(s)]
    category = np.arange(n) % len(shapes.CATEGORIES)
    rec = paired.make_record(images, features, correct, category)
    if chroma_shift:
        rec = paired.Record(
            rec.features, rec.correct, rec.category, rec.chroma + chroma_shift, rec.contrast
        )
    return rec, images


def test_whole_set_metrics_equal_the_pooled_metrics():
    rng = np.random.default_rng(0)
    rec, images = _record(rng)
    teacher, _ = _record(rng)
    real = rng.normal(size=(60, 5))
    ref = paired.Reference(real, teacher, np.ones((1, 60)))
    got = {k: float(v[0]) for k, v in paired.record_metrics(rec, ref).items()}

    fds = [metrics.frechet_distance_from_features(f, real) for f in rec.features]
    assert got["fd_judge"] == pytest.approx(np.mean(fds), rel=1e-9)
    fdt = [
        metrics.frechet_distance_from_features(a, b)
        for a, b in zip(rec.features, teacher.features, strict=True)
    ]
    assert got["fd_teacher"] == pytest.approx(np.mean(fdt), rel=1e-9)
    dist = np.linalg.norm(rec.features - teacher.features, axis=-1).mean()
    assert got["teacher_dist"] == pytest.approx(dist, rel=1e-6)

    per_seed = [
        {"all": c, **{name: c[rec.category == i] for i, name in enumerate(shapes.CATEGORIES)}}
        for c in rec.correct
    ]
    table = metrics.alignment_table(per_seed)
    for name in (*shapes.CATEGORIES, "mean"):
        assert got[name] == pytest.approx(table[name]["accuracy"], abs=1e-12), name
    colour = metrics.colour_statistics(np.concatenate(images))
    assert got["chroma"] == pytest.approx(colour["chroma"], rel=1e-5)
    assert got["contrast"] == pytest.approx(colour["contrast"], rel=1e-5)
    assert got["diversity"] == pytest.approx(metrics.seed_diversity(rec.features), rel=1e-6)


def test_weighted_moments_equal_the_resampled_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    w = paired.bootstrap_weights(30, 3, rng)
    mu, cov = paired._weighted_moments(x, w)
    for b in range(3):
        repeated = np.repeat(x, w[b].astype(int), axis=0)
        np.testing.assert_allclose(mu[b], repeated.mean(0), rtol=1e-10)
        np.testing.assert_allclose(cov[b], np.cov(repeated, rowvar=False), rtol=1e-9, atol=1e-12)


def _rows(rng, shift_of_b, seeds=(0, 1, 2, 3, 4), n=80):
    ref_records, b_records = [], []
    for _ in seeds:
        r, _ = _record(rng, n=n)
        ref_records.append(r)
        b, _ = _record(rng, n=n, chroma_shift=shift_of_b)
        b_records.append(b)
    return [
        paired.Row("ref", 3, tuple(seeds), tuple(ref_records)),
        paired.Row("b", 3, tuple(seeds), tuple(b_records)),
    ]


def test_interval_excludes_zero_for_a_shift_far_above_the_noise():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(80, 5))
    out = paired.compare(_rows(rng, 20.0), ("ref", 3), real, None, num_resamples=200)
    cell = out[1]["metrics"]["chroma"]
    assert cell["excludes_0"] and cell["ci95"][0] > 15 and cell["diff"] == pytest.approx(20, abs=3)
    assert paired.verdict(cell, "chroma") == "better"  # higher chroma; for FD lower is better
    assert paired.verdict({**cell, "diff": -cell["diff"]}, "fd_judge") == "better"
    assert out[0]["metrics"]["chroma"]["ci95"] == [0.0, 0.0] and out[0]["reference"]
    assert out[1]["paired_by_seed"]


def test_interval_holds_zero_for_identically_distributed_rows():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(80, 5))
    out = paired.compare(_rows(rng, 0.0), ("ref", 3), real, None, num_resamples=300)
    for m in ("fd_judge", "mean", "chroma", "contrast", "diversity"):
        low, high = out[1]["metrics"][m]["ci95"]
        assert low < 0 < high, (m, low, high)
        assert paired.verdict(out[1]["metrics"][m], m) == "not resolved"


def test_identical_row_has_a_zero_width_interval_at_zero():
    rng = np.random.default_rng(4)
    rows = _rows(rng, 0.0)
    twin = paired.Row("twin", 3, rows[0].seeds, rows[0].records)
    real = rng.normal(size=(80, 5))
    out = paired.compare([rows[0], twin], ("ref", 3), real, None, num_resamples=50)
    for m, cell in out[1]["metrics"].items():
        assert cell["diff"] == 0.0 and cell["ci95"] == [0.0, 0.0] and not cell["excludes_0"], m


def test_mismatched_prompt_counts_are_refused():
    rng = np.random.default_rng(5)
    rows = _rows(rng, 0.0, n=40)
    with pytest.raises(ValueError, match="40 prompts, the real set has 80"):
        paired.compare(rows, ("ref", 3), rng.normal(size=(80, 5)), None)


def test_claim_verdicts_read_the_direction_of_each_metric():
    """Removing a component that helps makes FD larger (worse) and alignment lower (worse):
    both read "confirmed"; the opposite reads "refuted"; an interval over 0 "not resolved"."""

    def entry(label, fd, align, excl=True):
        cells = {
            "fd_judge": {"diff": fd, "ci95": [fd - 0.1, fd + 0.1], "excludes_0": excl},
            "mean": {"diff": align, "ci95": [align - 0.01, align + 0.01], "excludes_0": excl},
        }
        return {"label": label, "steps": 3, "seeds": [0, 1, 2, 3, 4], "metrics": cells}

    compared = [
        entry("w/o A", 0.5, -0.05),
        entry("w/o B", -0.5, 0.05),
        entry("w/o C", 0.05, 0, False),
    ]
    claims = {"a": "w/o A", "b": "w/o B", "c": "w/o C", "d": "w/o D"}
    got = {v["claim"]: v for v in paired.claim_verdicts(compared, claims, 3, ("fd_judge", "mean"))}
    assert set(got) == {"a", "b", "c"}
    assert {m: c["verdict"] for m, c in got["a"]["metrics"].items()} == {
        "fd_judge": "confirmed",
        "mean": "confirmed",
    }
    assert {c["verdict"] for c in got["b"]["metrics"].values()} == {"refuted"}
    assert {c["verdict"] for c in got["c"]["metrics"].values()} == {"not resolved"}
