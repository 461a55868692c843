"""Fréchet distance: zero on itself, closed forms for Gaussians (agreement with clean-fid's
sqrtm-based implementation is in test_eval_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

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
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.sum(np.sqrt(a * b)), rel=1e-12)


def test_rank_deficient_covariances_give_the_exact_value():
    # 10 samples in 50 dimensions: a covariance of rank 9.  Shifting every sample by a constant
    # vector leaves the covariance S unchanged, and tr((S S)^{1/2}) = tr(S) for any PSD S, so the
    # distance is exactly the squared mean shift: 50 for a shift of 1 in every dimension.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 50))
    assert frechet_distance_from_features(x, x + 1.0) == pytest.approx(50.0, rel=0, abs=1e-9)
    shift = rng.normal(size=50)
    assert frechet_distance_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=0, abs=1e-9)


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        gaussian_stats(np.zeros(5))
    with pytest.raises(ValueError, match="mismatch"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
