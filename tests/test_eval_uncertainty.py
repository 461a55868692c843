"""Uncertainty of FID-type numbers: the bootstrap intervals cover, paired differences behave, and
the resampled statistics equal the plain ones on the identity resample.

The coverage check runs on an exact model whose probability-flow ODE has a closed form: a
one-component ``GaussianMixture`` N(mu, Sigma).  Per eigendirection of Sigma (eigenvalue l) the
VP marginal at time t is N(alpha_t mu, alpha_t^2 l + sigma_t^2) and the ODE map preserves the
standardised coordinate, so from x_T the exact sample is
``mu + sqrt(l) (x_T - alpha_T mu) / sqrt(alpha_T^2 l + sigma_T^2)``: the exact-ODE samples of fresh
noise cost nothing, and the cell's value can be recomputed on as many fresh noise sets as needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features, frechet_distances, gaussian_stats
from fewstep.eval.kid import mmd2_unbiased
from fewstep.eval.uncertainty import (
    Z95,
    bootstrap_counts,
    compare,
    fd_replicates,
    interval,
    mmd_replicates,
    paired_difference,
    resampled_moments,
)
from fewstep.models import GaussianMixture

D, N, REPS, B = 8, 200, 200, 200


@pytest.fixture(scope="module")
def gaussian(ddpm_schedule):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    cov = a @ a.T / D + 0.05 * torch.eye(D, dtype=torch.float64)
    mu = torch.randn(D, generator=g, dtype=torch.float64)
    model = GaussianMixture([1.0], mu[None], cov[None])
    s = ddpm_schedule
    lam, u = torch.linalg.eigh(cov)
    a_t, s_t = s.alpha(s.t_max), s.sigma(s.t_max)

    def exact(z: torch.Tensor) -> torch.Tensor:
        x = z * s.noise_scale(s.t_max)
        coord = (x - a_t * mu) @ u / torch.sqrt(a_t**2 * lam + s_t**2)
        return mu + (coord * lam.sqrt()) @ u.T

    return model, exact


def test_the_closed_form_is_the_exact_ode(gaussian, ddpm_schedule):
    model, exact = gaussian
    s = ddpm_schedule
    z = torch.randn(16, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    solved = model.ode_solve(z * s.noise_scale(s.t_max), s, s.t_max, s.t_zero)  # scipy DOP853, tolerance 1e-9
    assert float((solved - exact(z)).abs().max()) < 1e-6


def test_intervals_cover_the_value_on_fresh_noise(gaussian, ddpm_schedule):
    # 200 repetitions, each with its own fresh noise (N = 200): the cell is ddim at NFE 4, its FD to
    # the exact-ODE samples of the same noise, with the 95 % interval from 200 bootstrap resamples.
    model, exact = gaussian
    den = model.denoiser(ddpm_schedule)
    values, intervals = [], []
    for r in range(REPS):
        z = torch.randn(N, D, generator=torch.Generator().manual_seed(1000 + r), dtype=torch.float64)
        out, ref = fewstep.sample(den, z, "ddim", 4, schedule=ddpm_schedule), exact(z)
        est = frechet_distance_from_features(out, ref)
        reps = fd_replicates(out.numpy(), bootstrap_counts(N, B, seed=r), paired_with=ref.numpy())[1]
        values.append(est)
        intervals.append(interval(est, reps))
    values = np.array(values)
    target = values.mean()  # what the measurement gives on average over noise seeds at this N
    sd = values.std(ddof=1)
    se = np.array([iv.se for iv in intervals])
    # The bootstrap standard error is the seed-to-seed spread (measured: 0.0619 against 0.0618).
    assert np.mean(se) == pytest.approx(sd, rel=0.15)
    # Coverage of the seed average: 95 % nominal; with 200 repetitions the binomial sd is 1.5 %
    # (measured: 190 of 200 = 95.0 %).
    covered = np.mean([iv.lo <= target <= iv.hi for iv in intervals])
    assert 0.90 <= covered <= 0.99
    # A single fresh value (another seed's number) differs from this one by two draws' noise, so a
    # 95 % interval covers it about 83 % of the time, and the sqrt(2)-wider prediction interval
    # 95 % (measured: 85.5 % and 95.5 %).
    nxt = np.roll(values, -1)
    plain = np.mean([iv.lo <= v <= iv.hi for iv, v in zip(intervals, nxt)])
    wide = np.mean([abs(v - iv.estimate) <= math.sqrt(2) * Z95 * iv.se for iv, v in zip(intervals, nxt)])
    assert 0.75 <= plain <= 0.91 and 0.90 <= wide <= 0.99


def test_paired_differences(gaussian, ddpm_schedule):
    model, exact = gaussian
    den = model.denoiser(ddpm_schedule)
    z = torch.randn(N, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = exact(z).numpy()
    counts = bootstrap_counts(N, B, seed=0)
    est, reps = {}, {}
    for name, nfe in (("ddim", 3), ("dpmpp_3m", 10)):
        out = fewstep.sample(den, z, name, nfe, schedule=ddpm_schedule).numpy()
        est[name] = frechet_distance_from_features(out, ref)
        reps[name] = fd_replicates(out, counts, paired_with=ref)[1]
    # A sampler compared with itself: a difference of exactly 0 with an interval of zero width.
    self_diff = paired_difference(est["ddim"], est["ddim"], reps["ddim"], reps["ddim"])
    assert (self_diff.diff, self_diff.lo, self_diff.hi, self_diff.significant) == (0.0, 0.0, 0.0, False)
    tie = compare({"a": est["ddim"], "b": est["ddim"]}, {"a": reps["ddim"], "b": reps["ddim"]})
    assert not tie.significant and tie.differences["b"].diff == 0.0 and tie.differences["b"].se == 0.0
    # A known worse sampler (first order at 3 NFE against third order at 10) is flagged worse.
    comp = compare(est, reps)
    assert comp.best == "dpmpp_3m" and comp.significant
    worse = comp.differences["ddim"]
    assert worse.significant and worse.lo > 0 and worse.diff == pytest.approx(est["ddim"] - est["dpmpp_3m"])
    assert comp.differences["dpmpp_3m"].diff == 0.0 and comp.differences["dpmpp_3m"].se == 0.0


def test_resampled_statistics_equal_the_plain_ones_on_the_identity_resample():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) + 0.3
    ones = np.ones((1, 40))
    m, s = resampled_moments(x, ones)
    mu, cov = gaussian_stats(x)
    np.testing.assert_allclose(m[0], mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s[0], cov, rtol=1e-12, atol=1e-14)
    my, sy = gaussian_stats(y)
    to_ref, to_pair = fd_replicates(x, ones, mu=my, sigma=sy, paired_with=x + 0.1)
    assert to_ref[0] == pytest.approx(frechet_distance(mu, cov, my, sy), rel=1e-10)
    assert to_pair[0] == pytest.approx(frechet_distance_from_features(x, x + 0.1), rel=1e-8, abs=1e-12)
    assert mmd_replicates(x, y, ones)[0] == pytest.approx(mmd2_unbiased(x, y), rel=1e-10)
    # A resample that takes sample 0 twice and drops sample 1 is the plain statistic of that set.
    c = np.ones((1, 40))
    c[0, 0], c[0, 1] = 2, 0
    picked = np.concatenate([x[:1], x[:1], x[2:]])
    assert mmd_replicates(x, y, c)[0] == pytest.approx(mmd2_unbiased(picked, y), rel=1e-10)
    assert fd_replicates(x, c, mu=my, sigma=sy)[0][0] == pytest.approx(frechet_distance(*gaussian_stats(picked), my, sy), rel=1e-10)
    # Batched Fréchet distances equal one at a time.
    many = np.stack([s[0], cov * 1.5, cov + np.eye(5)])
    mus = np.stack([m[0], m[0] + 1, m[0] - 1])
    np.testing.assert_allclose(frechet_distances(mus, many, my[None], sy[None]),
                               [frechet_distance(a, b, my, sy) for a, b in zip(mus, many)], rtol=1e-12)


def test_bootstrap_counts_are_seeded_resamples():
    c = bootstrap_counts(50, 30, seed=4)
    assert c.shape == (30, 50) and (c.sum(axis=1) == 50).all() and (c >= 0).all()
    assert np.array_equal(c, bootstrap_counts(50, 30, seed=4)) and not np.array_equal(c, bootstrap_counts(50, 30, seed=5))
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_counts(50, 1)


def test_the_sample_space_bootstrap_equals_the_feature_space_one():
    # Fewer samples than dimensions (as Inception features at a few hundred samples): the n x n
    # route gives the same distances as D x D covariances.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 20))
    y = x + 0.2 * rng.normal(size=(12, 20))
    ref = rng.normal(size=(40, 20)) + 0.1
    mu, sigma = gaussian_stats(ref)
    counts = bootstrap_counts(12, 6, seed=2)
    low_ref, low_pair = fd_replicates(x, counts, mu=mu, sigma=sigma, paired_with=y)
    m, s = resampled_moments(x, counts)
    m2, s2 = resampled_moments(y, counts)
    np.testing.assert_allclose(low_ref, frechet_distances(m, s, mu[None], sigma[None]), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(low_pair, frechet_distances(m, s, m2, s2), rtol=1e-8, atol=1e-10)
