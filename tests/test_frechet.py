"""Fréchet distance: zero on itself, the closed form for Gaussians, scipy's sqrtm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats, trace_sqrt_product


def test_self_distance_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance_from_features(f, f) < 1e-6


def test_closed_form_for_commuting_gaussians():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-10)


def test_agrees_with_scipy_sqrtm_on_general_covariances():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 20)), rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.3
    (m1, s1), (m2, s2) = gaussian_stats(x), gaussian_stats(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expect = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-8)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(covmean), rel=1e-8)


def test_rank_deficient_covariances_stay_finite():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 50))  # fewer samples than dimensions
    assert np.isfinite(frechet_distance_from_features(x, x + 1.0))


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
