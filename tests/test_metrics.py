"""Fréchet distance against closed forms, alignment tables, colour statistics on constructed images."""

import numpy as np
import pytest

from flash_jax.eval import metrics as M


def _random_cov(rng, n, rank=None):
    a = rng.normal(size=(n, rank or n))
    return a @ a.T / (rank or n)


# ------------------------------------------------------------------------------ Fréchet distance


def test_fd_identical_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), _random_cov(rng, 8)
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    singular = _random_cov(rng, 8, rank=3)  # rank-deficient covariances are fine too
    assert M.frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-9)


def test_fd_shift_only_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.normal(size=6), rng.normal(size=6), _random_cov(rng, 6)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert M.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_commuting_and_1d():
    # Same eigenvectors: FD = |Δμ|² + Σ (√λ1 − √λ2)²; in 1-D: (μ1−μ2)² + (σ1−σ2)².
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    l1, l2 = rng.uniform(0.1, 2, 4), rng.uniform(0.1, 2, 4)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expected = np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert M.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, rel=1e-8)
    got = M.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert got == pytest.approx(4.0 + 1.0)


def test_fd_symmetric_nonnegative_and_sensitive():
    rng = np.random.default_rng(4)
    for _ in range(5):
        mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
        s1, s2 = _random_cov(rng, 7), _random_cov(rng, 7, rank=4)
        ab, ba = M.frechet_distance(mu1, s1, mu2, s2), M.frechet_distance(mu2, s2, mu1, s1)
        assert ab >= 0 and ab == pytest.approx(ba, rel=1e-7)
        assert ab > 1e-3


def test_fd_from_samples_matches_truth():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + 1.0  # N(1, 4I)
    # Closed form: 3·1² + 3·(2 − 1)² = 6.
    assert M.frechet_distance_from_features(a, b) == pytest.approx(6.0, rel=0.05)
    mu, sigma = M.feature_statistics(a)
    assert mu.shape == (3,) and sigma.shape == (3, 3) and mu.dtype == np.float64


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        M.feature_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------ alignment table


def test_alignment_table_merges_batches():
    r1 = {
        "all": np.array([1, 0, 1], bool),
        "color": np.array([1, 0], bool),
        "shape": np.array([1], bool),
    }
    r2 = {"all": np.array([1], bool), "color": np.array([1], bool), "shape": np.zeros(0, bool)}
    t = M.alignment_table([r1, r2])
    assert t["all"] == {"accuracy": 0.75, "n": 4}
    assert t["color"]["accuracy"] == pytest.approx(2 / 3) and t["color"]["n"] == 3
    assert t["shape"] == {"accuracy": 1.0, "n": 1}
    assert t["mean"]["accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)
    empty = M.alignment_table({"all": np.zeros(0, bool)})
    assert np.isnan(empty["all"]["accuracy"])


def test_markdown_table():
    text = M.markdown_table({"eval": {"color": 0.98765, "n": 10}}, ["color", "n"])
    assert text.splitlines() == ["| | color | n |", "|---|---|---|", "| eval | 0.9877 | 10 |"]


# ------------------------------------------------------------------------------ colour


def _flat(rgb, n=2, size=8):
    return np.broadcast_to(np.array(rgb, np.uint8), (n, size, size, 3)).copy()


def test_lab_reference_values():
    lab = M.srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.02)  # sRGB red in CIELAB D65


def test_colour_statistics_constructed_images():
    grey = M.colour_statistics(_flat((128, 128, 128)))
    assert grey["chroma"] < 1e-3 and grey["contrast"] < 1e-9
    pastel = M.colour_statistics(_flat((200, 150, 150)))
    red = M.colour_statistics(_flat((230, 20, 20)))
    assert 5 < pastel["chroma"] < red["chroma"]
    half = np.zeros((1, 8, 8, 3), np.uint8)
    half[:, :, 4:] = 255  # half black, half white: L*/100 is 0 or 1, std 0.5
    stats = M.colour_statistics(half)
    assert stats["contrast"] == pytest.approx(0.5, abs=1e-4)
    assert stats["chroma"] < 1e-3 and stats["lightness"] == pytest.approx(50.0, abs=1e-3)
    # Lower contrast when the two halves move toward mid-grey.
    soft = np.where(half > 0, 170, 85).astype(np.uint8)
    assert 0 < M.colour_statistics(soft)["contrast"] < stats["contrast"]
    with pytest.raises(ValueError):
        M.colour_statistics(np.zeros((8, 8, 3), np.uint8))
