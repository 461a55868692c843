"""Tests of the exact Gaussian-mixture model (fewstep/models/mixture.py).

References here are written independently of the module: densities and posterior means by
dense linear solves (no eigendecomposition), the probability-flow ODE in other variables
(half log-SNR for VP, time for flow matching, sigma for EDM), and Monte-Carlo estimates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp, trapezoid
from scipy.special import expit, logsumexp
from scipy.stats import multivariate_normal

from fewstep.models.mixture import (
    DIGITS_REG_COVAR,
    GaussianMixture,
    MixtureDenoiser,
    _digits_split_indices,
    _load_digits_npz,
    digits_data,
)
from fewstep.schedules import EDM, FlowMatching, VPContinuous, VPDiscrete, diffusers_betas

# ---------------------------------------------------------------------------------------------
# Fixtures and independent references
# ---------------------------------------------------------------------------------------------


def _random_spd(rng: np.random.Generator, d: int, lo: float, hi: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * rng.uniform(lo, hi, d)) @ q.T


def _mixture_params(d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 1.5, k)
    w /= w.sum()
    mu = 1.5 * rng.standard_normal((k, d))
    cov = np.stack([_random_spd(rng, d, 0.05, 0.6) for _ in range(k)])
    return w, mu, cov


@pytest.fixture(scope="module")
def mix2():
    w, mu, cov = _mixture_params(2, 3, seed=1)
    return GaussianMixture(w, mu, cov), (w, mu, cov)


@pytest.fixture(scope="module")
def mix3():
    w, mu, cov = _mixture_params(3, 4, seed=2)
    return GaussianMixture(w, mu, cov), (w, mu, cov)


def ref_log_joint(params, x: np.ndarray, a: float, sg: float) -> np.ndarray:
    """(B, K) log w_k + log N(x; a mu_k, a^2 Sigma_k + sg^2 I), with scipy."""
    w, mu, cov = params
    d = mu.shape[1]
    return np.stack(
        [
            np.log(w[k]) + np.atleast_1d(multivariate_normal(a * mu[k], a * a * cov[k] + sg * sg * np.eye(d)).logpdf(x))
            for k in range(len(w))
        ],
        axis=1,
    )


def ref_posterior_mean(params, x: np.ndarray, a: float, sg: float) -> np.ndarray:
    """E[x0 | a x0 + sg eps = x] by Bayes per component with dense solves."""
    w, mu, cov = params
    d = mu.shape[1]
    lj = ref_log_joint(params, x, a, sg)
    r = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
    out = np.zeros_like(x)
    for k in range(len(w)):
        c = a * a * cov[k] + sg * sg * np.eye(d)
        mk = mu[k] + (a * cov[k] @ np.linalg.solve(c, (x - a * mu[k]).T)).T
        out += r[:, k : k + 1] * mk
    return out


def ref_neg_score(params, y: np.ndarray, s: float) -> np.ndarray:
    """sum_k r_k (Sigma_k + s I)^{-1} (y - mu_k) for y = x0 + sqrt(s) eps."""
    w, mu, cov = params
    d = mu.shape[1]
    lj = ref_log_joint(params, y, 1.0, math.sqrt(s))
    r = np.exp(lj - logsumexp(lj, axis=1, keepdims=True))
    out = np.zeros_like(y)
    for k in range(len(w)):
        out += r[:, k : k + 1] * np.linalg.solve(cov[k] + s * np.eye(d), (y - mu[k]).T).T
    return out


def _ivp(fun, span, x: np.ndarray) -> np.ndarray:
    b, d = x.shape
    sol = solve_ivp(lambda t, v: fun(t, v.reshape(b, d)).ravel(), span, x.ravel(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success, sol.message
    return sol.y[:, -1].reshape(b, d)


def ref_vp_flow(params, x: np.ndarray, lam_from: float, lam_to: float) -> np.ndarray:
    """VP PF-ODE in the half log-SNR: dx/dlambda = -alpha^2 x + alpha D(x), alpha^2 = sigmoid(2 lambda)
    (from dx/dlambda = (d log sigma / d lambda) x + alpha D, with log sigma = log sigmoid(-2 lambda) / 2)."""

    def f(lam, x):
        a2 = expit(2 * lam)
        a, sg = math.sqrt(a2), math.sqrt(expit(-2 * lam))
        return -a2 * x + a * ref_posterior_mean(params, x, a, sg)

    return _ivp(f, (lam_from, lam_to), x)


def ref_ve_to_data(params, y: np.ndarray, sig_from: float) -> np.ndarray:
    """VE PF-ODE (Karras et al. 2022, eq. 4 with the score written out, regular at 0):
    dy/dsigma = sigma * sum_k r_k (Sigma_k + sigma^2 I)^{-1} (y - mu_k), from sig_from to 0."""
    return _ivp(lambda sg, y: sg * ref_neg_score(params, y, sg * sg), (sig_from, 0.0), y)


# ---------------------------------------------------------------------------------------------
# Posterior mean
# ---------------------------------------------------------------------------------------------


def test_posterior_mean_matches_monte_carlo(mix3):
    mix, _ = mix3
    a, sg = 0.8, 0.6
    x = mix.sample_marginal(4, 0.0, VPContinuous(), generator=torch.Generator().manual_seed(3))  # clean points
    x = a * x + sg * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x0 = mix.sample(400_000, generator=torch.Generator().manual_seed(5))
    exact = mix.posterior_mean(x, a, sg)
    for i in range(len(x)):
        logw = -0.5 * ((x[i] - a * x0) ** 2).sum(1) / sg**2  # N(x; a x0, sg^2 I) up to a constant
        wts = torch.softmax(logw, 0)
        est = wts @ x0
        # Standard error of the self-normalised importance-sampling estimate (delta method).
        se = torch.sqrt((wts[:, None] ** 2 * (x0 - est) ** 2).sum(0))
        ess = 1.0 / float((wts**2).sum())
        assert ess > 1000
        assert torch.all((exact[i] - est).abs() < 5 * se + 1e-12), (exact[i], est, se)


def test_posterior_mean_single_gaussian_is_wiener_filter():
    rng = np.random.default_rng(7)
    d = 4
    mu = rng.standard_normal(d)
    cov = _random_spd(rng, d, 0.1, 2.0)
    g = GaussianMixture([1.0], mu[None], cov[None])
    x = rng.standard_normal((6, d))
    for a, sg in [(1.0, 0.1), (0.7, 0.7), (0.05, 1.0), (1.0, 30.0)]:
        wiener = mu + (a * cov @ np.linalg.solve(a * a * cov + sg * sg * np.eye(d), (x - a * mu).T)).T
        got = g.posterior_mean(torch.tensor(x), a, sg).numpy()
        np.testing.assert_allclose(got, wiener, rtol=0, atol=1e-10)


def test_posterior_mean_matches_dense_reference(mix2):
    mix, params = mix2
    rng = np.random.default_rng(0)
    x = 2 * rng.standard_normal((16, 2))
    for a, sg in [(1.0, 0.01), (0.9, 0.3), (0.3, 0.95), (0.006, 1.0), (1.0, 80.0)]:
        got = mix.posterior_mean(torch.tensor(x), a, sg).numpy()
        np.testing.assert_allclose(got, ref_posterior_mean(params, x, a, sg), rtol=0, atol=1e-10)
    # Per-sample coefficients, as (B,) tensors, agree with row-by-row scalar calls.
    a = torch.linspace(0.1, 1.0, 16, dtype=torch.float64)
    sg = torch.sqrt(1 - a**2) + 0.01
    got = mix.posterior_mean(torch.tensor(x), a, sg)
    for i in range(16):
        row = ref_posterior_mean(params, x[i : i + 1], float(a[i]), float(sg[i]))
        np.testing.assert_allclose(got[i].numpy(), row[0], rtol=0, atol=1e-10)
    # A per-sample alpha with a shared sigma broadcasts too.
    got2 = mix.posterior_mean(torch.tensor(x), a, 0.5)
    ref2 = np.stack([ref_posterior_mean(params, x[i : i + 1], float(a[i]), 0.5)[0] for i in range(16)])
    np.testing.assert_allclose(got2.numpy(), ref2, rtol=0, atol=1e-10)


def test_posterior_mean_shapes_and_dtypes():
    w, mu, cov = _mixture_params(4, 2, seed=3)
    g = GaussianMixture(w, mu, cov)
    x = torch.randn(5, 1, 2, 2)
    out = g.posterior_mean(x, 0.6, torch.tensor(0.8))
    assert out.shape == x.shape and out.dtype == torch.float32
    flat = g.posterior_mean(x.reshape(5, 4).double(), 0.6, 0.8)
    torch.testing.assert_close(out.reshape(5, 4).double(), flat, rtol=1e-6, atol=1e-6)
    out64 = g.posterior_mean(x.double(), torch.full((5,), 0.6, dtype=torch.float64), 0.8)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.reshape(5, 4), flat, rtol=0, atol=1e-12)


def test_posterior_mean_limits(mix2):
    mix, _ = mix2
    x = torch.randn(7, 2, dtype=torch.float64) * 50
    # Zero SNR: the data mean, exactly and finite even far from the data.
    out = mix.posterior_mean(x, 0.0, 1.0)
    torch.testing.assert_close(out, mix.mean.expand(7, 2), rtol=0, atol=0)
    # No noise: x / alpha.
    torch.testing.assert_close(mix.posterior_mean(x, 1.0, 0.0), x, rtol=0, atol=0)
    torch.testing.assert_close(mix.posterior_mean(x, 0.5, 0.0), x / 0.5, rtol=0, atol=0)
    # Mixed per-sample limits.
    a = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    sg = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    out = mix.posterior_mean(x, a, sg)
    torch.testing.assert_close(out[0], mix.mean, rtol=0, atol=0)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)
    # Near the limits the formula is continuous and finite.
    assert torch.isfinite(mix.posterior_mean(x, 1e-12, 1.0)).all()
    torch.testing.assert_close(mix.posterior_mean(x[:2] / 50, 1.0, 1e-9), x[:2] / 50, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="both 0"):
        mix.posterior_mean(x, 0.0, 0.0)


def test_denoiser_interface(mix2):
    mix, _ = mix2
    sched = VPContinuous("linear")
    den = mix.denoiser(sched)
    assert isinstance(den, MixtureDenoiser)
    assert den.schedule is sched and den.prediction_type == "sample"
    x = torch.randn(3, 2, dtype=torch.float64)
    t = 0.4
    a, sg = sched.alpha_sigma(t)
    want = mix.posterior_mean(x, a, sg)
    torch.testing.assert_close(den(x, t), want, rtol=0, atol=1e-14)
    torch.testing.assert_close(den(x, torch.tensor(t, dtype=torch.float64)), want, rtol=0, atol=1e-14)
    tb = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    per = den(x, tb)
    for i in range(3):
        torch.testing.assert_close(per[i : i + 1], den(x[i : i + 1], float(tb[i])), rtol=0, atol=1e-14)
    assert den.nfe == 6
    with pytest.raises(TypeError, match="guidance_scale"):
        den(x, t, guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------
# Probability-flow ODE
# ---------------------------------------------------------------------------------------------


VP_SCHEDULES = [
    pytest.param(VPContinuous("linear"), id="vp-continuous-linear"),
    pytest.param(VPDiscrete.from_betas(diffusers_betas(1000, 1e-4, 0.02, "linear")), id="vp-discrete-ddpm"),
]


@pytest.mark.parametrize("sched", VP_SCHEDULES)
def test_ode_matches_independent_solve_vp(mix2, sched):
    mix, params = mix2
    x = mix.sample_marginal(8, sched.t_max, sched, generator=torch.Generator().manual_seed(11))
    lam_max, lam_min = float(sched.lambda_(sched.t_max)), float(sched.lambda_(sched.t_min))
    ref_min = ref_vp_flow(params, x.numpy(), lam_max, lam_min)
    got_min = mix.ode_solve(x, sched, sched.t_max, sched.t_min)
    assert got_min.dtype == torch.float64 and got_min.shape == x.shape
    np.testing.assert_allclose(got_min.numpy(), ref_min, rtol=0, atol=1e-8)
    # On to clean data: from t_min, in y = x / alpha against sigma / alpha.
    a_min, s_min = sched.alpha_sigma(sched.t_min)
    ref_zero = ref_ve_to_data(params, ref_min / a_min, s_min / a_min)
    got_zero = mix.ode_solve(x, sched, sched.t_max, sched.t_zero)
    np.testing.assert_allclose(got_zero.numpy(), ref_zero, rtol=0, atol=1e-8)
    # Composition: t_max -> t_min -> t_zero equals t_max -> t_zero.
    np.testing.assert_allclose(mix.ode_solve(got_min, sched, sched.t_min, sched.t_zero).numpy(), ref_zero, rtol=0, atol=1e-8)


def test_ode_from_zero_snr_matches_independent_solve(mix2):
    """Flow matching starts at alpha = 0; in time, dx/dt = alpha' D + sigma' eps_hat = (x - D) / t."""
    mix, params = mix2
    sched = FlowMatching()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))

    def f(t, x):
        return (x - ref_posterior_mean(params, x, 1.0 - t, t)) / t

    ref = _ivp(f, (1.0, sched.t_min), x.numpy())
    got = mix.ode_solve(x, sched, sched.t_max, sched.t_min)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-8)


def test_ode_edm_matches_independent_solve(mix2):
    """EDM: dx/dsigma = (x - D(x; 1, sigma)) / sigma (Karras et al. 2022, eq. 4)."""
    mix, params = mix2
    sched = EDM()
    x = sched.sigma_max * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    ref = _ivp(lambda sg, x: (x - ref_posterior_mean(params, x, 1.0, sg)) / sg, (sched.t_max, sched.t_min), x.numpy())
    got = mix.ode_solve(x, sched, sched.t_max, sched.t_min)
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-8)


def test_ode_round_trip_and_trivial_cases(mix2):
    mix, _ = mix2
    sched = VPContinuous("cosine")
    x0 = mix.sample(20, generator=torch.Generator().manual_seed(14))
    xt = mix.ode_solve(x0, sched, sched.t_zero, sched.t_max)  # encode
    back = mix.ode_solve(xt, sched, sched.t_max, sched.t_zero)  # decode
    np.testing.assert_allclose(back.numpy(), x0.numpy(), rtol=0, atol=1e-7)
    torch.testing.assert_close(mix.ode_solve(x0, sched, 0.3, 0.3), x0, rtol=0, atol=0)
    # Zero SNR at both ends of a flow-matching path (encode all the way to pure noise and back).
    fm = FlowMatching()
    z = mix.ode_solve(x0, fm, fm.t_zero, fm.t_max)
    np.testing.assert_allclose(mix.ode_solve(z, fm, fm.t_max, fm.t_zero).numpy(), x0.numpy(), rtol=0, atol=1e-7)


def _assert_moments_match(mix: GaussianMixture, x: torch.Tensor, n_se: float = 5.0) -> None:
    n = len(x)
    m, c = mix.mean, mix.covariance
    mean_se = torch.sqrt(torch.diagonal(c) / n)
    assert torch.all((x.mean(0) - m).abs() < n_se * mean_se), (x.mean(0), m, mean_se)
    dev = x - m
    prods = dev[:, :, None] * dev[:, None, :]  # (n, D, D); their mean estimates the covariance
    cov_se = prods.std(0) / math.sqrt(n)
    assert torch.all((prods.mean(0) - c).abs() < n_se * cov_se), (prods.mean(0), c, cov_se)


def test_ode_pushforward_reproduces_data_distribution(mix2):
    mix, _ = mix2
    sched = VPContinuous("linear")
    xt = mix.sample_marginal(2000, sched.t_max, sched, generator=torch.Generator().manual_seed(15))
    x0 = mix.ode_solve(xt, sched, sched.t_max, sched.t_zero, rtol=1e-8, atol=1e-8)
    _assert_moments_match(mix, x0)
    # From exact pure noise at zero SNR (flow matching's t = 1).
    fm = FlowMatching()
    z = torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    _assert_moments_match(mix, mix.ode_solve(z, fm, fm.t_max, fm.t_zero, rtol=1e-8, atol=1e-8))


# ---------------------------------------------------------------------------------------------
# Density and sampling
# ---------------------------------------------------------------------------------------------


def test_log_prob_matches_scipy_and_normalises(mix2):
    mix, params = mix2
    rng = np.random.default_rng(5)
    x = 2 * rng.standard_normal((10, 2))
    for a, sg in [(1.0, 0.0), (0.7, 0.5), (0.0, 1.0)]:
        ref = logsumexp(ref_log_joint(params, x, a, sg), axis=1)
        np.testing.assert_allclose(mix.log_prob(torch.tensor(x), a, sg).numpy(), ref, rtol=0, atol=1e-10)
        # Integrates to one on a grid (trapezoid rule over a box holding all the mass).
        g = np.linspace(-8.0, 8.0, 801)
        xx, yy = np.meshgrid(g, g, indexing="ij")
        pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1))
        dens = torch.exp(mix.log_prob(pts, a, sg)).numpy().reshape(801, 801)
        total = trapezoid(trapezoid(dens, g, axis=1), g)
        assert abs(total - 1.0) < 1e-6, total


def test_sample_moments_and_determinism(mix3):
    mix, _ = mix3
    x = mix.sample(100_000, generator=torch.Generator().manual_seed(17))
    assert x.shape == (100_000, 3) and x.dtype == torch.float64
    _assert_moments_match(mix, x)
    torch.testing.assert_close(mix.sample(10, torch.Generator().manual_seed(3)), mix.sample(10, torch.Generator().manual_seed(3)))
    sched = VPContinuous("linear")
    t = 0.5
    a, sg = sched.alpha_sigma(t)
    xt = mix.sample_marginal(100_000, t, sched, generator=torch.Generator().manual_seed(18))
    noised = GaussianMixture(mix.weights, a * mix.means, a * a * mix.covariances + sg * sg * torch.eye(3))
    _assert_moments_match(noised, xt)


def test_mean_and_covariance_closed_form(mix2):
    mix, (w, mu, cov) = mix2
    m = w @ mu
    c = sum(w[k] * (cov[k] + np.outer(mu[k] - m, mu[k] - m)) for k in range(len(w)))
    np.testing.assert_allclose(mix.mean.numpy(), m, atol=1e-14)
    np.testing.assert_allclose(mix.covariance.numpy(), c, atol=1e-14)
    assert mix.dim == 2 and mix.num_components == 3
    assert "num_components=3" in repr(mix) and "dim=2" in repr(mix)


def test_fit_recovers_a_known_mixture():
    truth = GaussianMixture([0.4, 0.6], [[-3.0, 0.0], [3.0, 1.0]], [np.eye(2) * 0.5, [[1.0, 0.3], [0.3, 0.4]]])
    data = truth.sample(4000, generator=torch.Generator().manual_seed(19))
    fit = GaussianMixture.fit(data, n_components=2, seed=0)
    order = torch.argsort(fit.means[:, 0])
    torch.testing.assert_close(fit.means[order], truth.means, rtol=0, atol=0.1)
    torch.testing.assert_close(fit.weights[order], truth.weights, rtol=0, atol=0.03)
    torch.testing.assert_close(fit.covariances[order], truth.covariances, rtol=0, atol=0.1)


# ---------------------------------------------------------------------------------------------
# The shipped digits mixture
# ---------------------------------------------------------------------------------------------


def test_digits_mixture():
    g = GaussianMixture.digits()
    assert g.dim == 64 and g.num_components == 10
    assert abs(float(g.weights.sum()) - 1.0) < 1e-12
    # reg_covar is a floor on every eigenvalue (up to the float32 storage) and is attained.
    assert DIGITS_REG_COVAR * (1 - 1e-5) <= g.min_eigenvalue < DIGITS_REG_COVAR * 1.01
    assert float(_load_digits_npz()["reg_covar"]) == DIGITS_REG_COVAR
    # The mixture is a fit to the digits: held-out images are far likelier than noise.
    test = digits_data("test")
    assert float(g.log_prob(test).mean()) > float(g.log_prob(torch.rand(359, 64, dtype=torch.float64) * 2 - 1).mean()) + 50
    # The exact ODE runs from the DDPM start (sigma/alpha ~ 157) to clean data, on image-shaped input.
    sched = VPDiscrete.from_betas(diffusers_betas())
    xt = g.sample_marginal(8, sched.t_max, sched, generator=torch.Generator().manual_seed(20)).reshape(8, 1, 8, 8)
    x0 = g.ode_solve(xt, sched, sched.t_max, sched.t_zero)
    assert x0.shape == (8, 1, 8, 8) and torch.isfinite(x0).all()
    den = g.denoiser(sched)
    assert den(xt.float(), torch.tensor(float(sched.t_max))).shape == (8, 1, 8, 8)


def test_digits_data_splits():
    full, labels = digits_data(return_labels=True)
    train, test = digits_data("train"), digits_data("test")
    assert full.shape == (1797, 64) and full.dtype == torch.float64 and labels.shape == (1797,)
    assert float(full.min()) == -1.0 and float(full.max()) == 1.0
    assert len(train) + len(test) == len(full) and len(test) == 359
    tr_idx, te_idx = _digits_split_indices(len(full))
    assert not set(tr_idx.tolist()) & set(te_idx.tolist())
    assert sorted(tr_idx.tolist() + te_idx.tolist()) == list(range(len(full)))
    torch.testing.assert_close(train, full[torch.as_tensor(tr_idx)], rtol=0, atol=0)
    torch.testing.assert_close(test, full[torch.as_tensor(te_idx)], rtol=0, atol=0)
    # The split the shipped fit used is the split digits_data gives.
    assert np.array_equal(_load_digits_npz()["train_index"].astype(np.int64), tr_idx)
    torch.testing.assert_close(digits_data("all"), full)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_constructor_errors():
    eye = np.eye(2)
    with pytest.raises(ValueError, match=r"weights must have shape \(K,\)"):
        GaussianMixture([[0.5, 0.5]], np.zeros((2, 2)), np.stack([eye, eye]))
    with pytest.raises(ValueError, match=r"means must have shape \(K, D\)"):
        GaussianMixture([0.5, 0.5], np.zeros((3, 2)), np.stack([eye, eye]))
    with pytest.raises(ValueError, match=r"covariances must have shape \(K, D, D\) = \(2, 2, 2\)"):
        GaussianMixture([0.5, 0.5], np.zeros((2, 2)), np.stack([eye, eye])[:, :1])
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture([1.0, 1.0], np.zeros((2, 2)), np.stack([eye, eye]))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([1.5, -0.5], np.zeros((2, 2)), np.stack([eye, eye]))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture([1.0], np.zeros((1, 2)), [[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianMixture([1.0], np.zeros((1, 2)), [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianMixture([1.0], np.zeros((1, 2)), [np.diag([1.0, 0.0])])
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture([1.0], [[0.0, float("nan")]], [eye])
    with pytest.raises(TypeError, match="weights must be a tensor or array"):
        GaussianMixture("abc", np.zeros((1, 2)), [eye])


def test_call_errors(mix2):
    mix, _ = mix2
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        mix.posterior_mean(torch.randn(4, 3), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        mix.posterior_mean(torch.randn(2), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"\(4,\) tensor"):
        mix.posterior_mean(x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        mix.posterior_mean(x, -0.5, 0.5)
    with pytest.raises(TypeError, match="alpha must be a float or a tensor"):
        mix.posterior_mean(x, "0.5", 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        mix.posterior_mean(torch.ones(4, 2, dtype=torch.long), 0.5, 0.5)
    sched = VPContinuous()
    with pytest.raises(ValueError, match="outside the schedule's time range"):
        mix.ode_solve(x, sched, 2.0, 0.0)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        mix.ode_solve(x, "vp", 1.0, 0.0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        mix.denoiser(sched)(x, 0.5, class_labels=None)
    with pytest.raises(ValueError, match=r"data must have shape \(N, D\)"):
        GaussianMixture.fit(torch.randn(10), n_components=2)
    with pytest.raises(ValueError, match="split"):
        digits_data("validation")
