"""Fréchet distance against clean-fid, KID's unbiasedness, mergeable running statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cleanfid.fid import frechet_distance as cleanfid_frechet
from cleanfid.fid import kernel_distance as cleanfid_kid

from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats
from fewstep.eval.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel
from fewstep.eval.stats import RunningStats


def _correlated(rng, n, d, scale=1.0):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + rng.normal(size=d)


def test_frechet_agrees_with_cleanfid_on_the_same_features():
    rng = np.random.default_rng(0)
    for n, d in ((400, 16), (300, 64)):
        f1, f2 = _correlated(rng, n, d), _correlated(rng, n, d, 0.5)
        ours = frechet_distance_from_features(f1, f2)
        (m1, s1), (m2, s2) = gaussian_stats(f1), gaussian_stats(f2)
        theirs = cleanfid_frechet(m1, s1, m2, s2)
        assert ours == pytest.approx(theirs, rel=1e-8)


def test_frechet_on_singular_covariances_matches_the_reduced_problem():
    # Digit features have dead ReLU units (constant 0), so both covariances are singular.  Dropping
    # the dimensions that are constant in both sets changes nothing mathematically and leaves a
    # well-conditioned problem, which is the reference value.  Without the rank threshold in the
    # square root, rounding noise in the 16 zero eigenvalues moved the result by 3e-6 relative.
    import warnings

    from fewstep.eval.features import digits_features
    from fewstep.models.embedded import digits_images

    ext = digits_features()
    f1, f2 = ext(digits_images("train")).double().numpy(), ext(digits_images("test")).double().numpy()
    live = (f1.std(0) > 0) | (f2.std(0) > 0)
    assert (~live).sum() >= 1
    reduced = frechet_distance_from_features(f1[:, live], f2[:, live])
    assert frechet_distance_from_features(f1, f2) == pytest.approx(reduced, rel=1e-9)
    (m1, s1), (m2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's sqrtm warns that the product is singular
        assert cleanfid_frechet(m1, s1, m2, s2) == pytest.approx(reduced, rel=1e-8)


def test_kid_equals_cleanfid_when_the_subset_is_the_whole_set():
    # With one subset as large as both sets, clean-fid's random subset is a permutation, and the
    # unbiased MMD^2 does not depend on order: both must give the same number.
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(120, 32)), rng.normal(size=(120, 32)) * 1.2 + 0.1
    theirs = cleanfid_kid(f1, f2, num_subsets=1, max_subset_size=120)
    assert mmd2_unbiased(f1, f2) == pytest.approx(theirs, rel=1e-10)
    assert kernel_inception_distance(f1, f2, num_subsets=3, subset_size=1000)[0] == pytest.approx(theirs, rel=1e-10)


def _exact_mmd2(a, pa, b, pb):
    """Population MMD^2 between two discrete distributions (support a, b; probabilities pa, pb)."""
    return float(pa @ polynomial_kernel(a, a) @ pa + pb @ polynomial_kernel(b, b) @ pb - 2 * pa @ polynomial_kernel(a, b) @ pb)


def test_kid_is_unbiased_on_discrete_distributions():
    # Two distributions with finite support: the population MMD^2 is an exact finite sum.  The
    # average of the estimate over many independent small samples must match it (within 4
    # standard errors), for different and for equal distributions, while the biased
    # V-statistic (diagonal kept) is far off at this sample size.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(6, 4)) + 0.3
    pa, pb = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(6))
    for (sa, qa), (sb, qb) in (((a, pa), (b, pb)), ((a, pa), (a, pa))):
        exact = _exact_mmd2(sa, qa, sb, qb)
        est, biased = [], []
        for _ in range(3000):
            x = sa[rng.choice(len(sa), 8, p=qa)]
            y = sb[rng.choice(len(sb), 7, p=qb)]
            est.append(mmd2_unbiased(x, y))
            biased.append(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean() - 2 * polynomial_kernel(x, y).mean())
        est, biased = np.array(est), np.array(biased)
        se = est.std(ddof=1) / np.sqrt(len(est))
        assert abs(est.mean() - exact) < 4 * se
        assert abs(biased.mean() - exact) > 20 * se


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(300, 8)), rng.normal(size=(250, 8))
    assert kernel_inception_distance(f1, f2, 10, 100, seed=5) == kernel_inception_distance(f1, f2, 10, 100, seed=5)
    mean, std = kernel_inception_distance(f1, f2, 50, 100, seed=5)
    assert abs(mean) < 4 * std / np.sqrt(50) + 1e-12 and std > 0  # same distribution: centred on 0


def test_running_stats_in_chunks_equal_numpy():
    rng = np.random.default_rng(4)
    f = _correlated(rng, 1000, 12)
    stats = RunningStats()
    for chunk in np.array_split(f, [7, 300, 301, 650]):
        stats.update(chunk)
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mean, f.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(f, rowvar=False), rtol=1e-11, atol=1e-12)


def test_running_stats_merge_in_any_order_and_round_trip():
    rng = np.random.default_rng(5)
    parts = [_correlated(rng, n, 6) for n in (5, 40, 1, 300)]
    full = np.concatenate(parts)
    states = [RunningStats.from_features(p) for p in parts]
    for order in itertools.permutations(range(4)):
        merged = RunningStats()
        for i in order:
            merged = merged + states[i]
        np.testing.assert_allclose(merged.cov, np.cov(full, rowvar=False), rtol=1e-11, atol=1e-12)
    restored = RunningStats.from_state(states[3].state())
    np.testing.assert_array_equal(restored.cov, states[3].cov)


def test_running_stats_are_well_conditioned_far_from_the_origin():
    # Features with mean 1e6 and unit spread: the one-pass E[x x^T] - E[x] E[x]^T formula loses
    # every digit (cancellation at 1e12), the pairwise update keeps them.
    rng = np.random.default_rng(6)
    f = rng.normal(size=(2000, 4)) + 1e6
    stats = RunningStats()
    for chunk in np.array_split(f, 20):
        stats.update(chunk)
    exact = np.cov(f, rowvar=False)
    assert np.abs(stats.cov - exact).max() < 1e-8
    naive = (f.T @ f - len(f) * np.outer(f.mean(0), f.mean(0))) / (len(f) - 1)
    assert np.abs(naive - exact).max() > 1e-3


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="dimension mismatch"):
        RunningStats.from_features(np.zeros((3, 2))).update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        RunningStats.from_features(np.zeros((1, 2))).cov
    with pytest.raises(ValueError, match="non-finite|NaN"):
        RunningStats().update(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="dimensions differ"):
        mmd2_unbiased(np.zeros((3, 2)), np.zeros((3, 5)))
