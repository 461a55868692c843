"""Uncertainty of FID / KID / FD cells: the bootstrap over the stored per-sample features.

A cell of the FID table is a statistic of ``N`` generated samples, sample ``i`` drawn from noise
``i``; the reference set is held fixed (it is part of what the number is measured against).  The
question a reader asks is how much the number would move with other noise (another seed), and
whether two samplers differ by more than that.  Both come from the nonparametric bootstrap
(Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 6 for standard errors, ch. 12-13
for intervals): draw ``B`` resamples of the sample indices with replacement, recompute the
statistic on each, and read the spread.

* **Multinomial counts.**  A resample is a count vector ``c`` (``c_i`` copies of sample ``i``,
  ``sum c_i = N``; :func:`bootstrap_counts`).  Weighted sums give each statistic without copying
  features: mean ``m = sum c_i f_i / N``, covariance ``(sum c_i (f_i - m)(f_i - m)^T) / (N - 1)``
  (:func:`resampled_moments`), and for a kernel ``K`` the unbiased MMD^2's within-set term
  ``(c^T K c - sum_i c_i K_ii) / (N (N - 1))`` and cross term ``c^T K_xy 1 / (N M)``
  (:func:`mmd_replicates`).
* **Paired resampling.**  Every cell starts sample ``i`` from the same noise, so one count vector
  is applied to every cell (and to the model's own exact-ODE samples) at once.  A difference
  between two cells is then recomputed on each resample with the pairing intact
  (:func:`paired_difference`): most of the noise that moves both cells together cancels.
* **Intervals.**  ``estimate +- z_{0.975} SE`` with ``SE`` the standard deviation of the
  replicates (the normal interval, Efron & Tibshirani eq. 13.5), centred on the estimate itself:
  the bootstrap distribution of FD is shifted upwards (duplicated samples shrink the effective
  sample count, and FD's bias grows as the count falls), so percentile intervals would be shifted
  too.  The target is the value the same measurement gives on average over noise seeds at this
  ``N`` against this reference, not FD at infinitely many samples (FD is biased upwards at finite
  ``N``; Chong & Forsyth 2020).  Lower ends of distances are clipped at 0.
* **Best cell.**  :func:`compare` names the lowest estimate per column and calls it significantly
  best only if its paired interval against *every* other cell excludes 0 (an intersection-union
  test, valid at the 5 % level without a multiple-comparison correction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Hashable

import numpy as np

from fewstep._util import derived_seed
from fewstep.eval.frechet import _psd_sqrt
from fewstep.eval.kid import polynomial_kernel

__all__ = [
    "Z95",
    "DEFAULT_REPLICATES",
    "Interval",
    "Difference",
    "Comparison",
    "bootstrap_counts",
    "resampled_moments",
    "fd_replicates",
    "mmd_replicates",
    "interval",
    "paired_difference",
    "compare",
]

#: The 97.5 % quantile of the standard normal: 95 % two-sided intervals.
Z95 = 1.959963984540054
#: Bootstrap resamples per study (the relative error of a standard error from B resamples is
#: about 1 / sqrt(2 B): 5 % at 200).
DEFAULT_REPLICATES = 200


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap standard error and 95 % normal interval."""

    estimate: float
    se: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Difference:
    """``estimate(cell) - estimate(best)`` with its paired bootstrap interval."""

    diff: float
    se: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0


@dataclass(frozen=True)
class Comparison:
    """One column: the cell with the lowest estimate, whether it is significantly lower than every
    other cell, and each cell's paired difference to it (0 with zero width for itself)."""

    best: Hashable
    significant: bool
    differences: dict


def bootstrap_counts(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """``(replicates, n)`` multinomial counts: row ``b`` says how often each of the ``n`` samples
    appears in resample ``b`` (rows sum to ``n``).  Seeded from ``("fid-bootstrap", seed, n)``,
    so every cell of a study, and every rerun, gets the same resamples."""
    if n < 2 or replicates < 2:
        raise ValueError(f"the bootstrap needs at least 2 samples and 2 resamples, got {n} and {replicates}")
    rng = np.random.default_rng(derived_seed("fid-bootstrap", int(seed), int(n)))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=int(replicates)).astype(np.float64)


def resampled_moments(features: Any, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means ``(B, D)`` and unbiased covariances ``(B, D, D)`` of the resamples ``counts`` (B, N)
    of ``features`` (N, D), in float64 (features are centred on their own mean first, which keeps
    the weighted sums well conditioned)."""
    f = np.asarray(features, dtype=np.float64)
    n = f.shape[0]
    if counts.shape[1] != n:
        raise ValueError(f"counts are for {counts.shape[1]} samples, features hold {n}")
    centre = f.mean(axis=0)
    g = f - centre
    means_c = counts @ g / n
    covs = np.empty((counts.shape[0], f.shape[1], f.shape[1]))
    for b, c in enumerate(counts):
        covs[b] = (g * c[:, None]).T @ g - n * np.outer(means_c[b], means_c[b])
    covs /= n - 1
    return means_c + centre, covs


def _scaled_rows(f: np.ndarray, c: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a resample and ``A`` with ``A^T A`` its covariance: the rows ``sqrt(c_i) (f_i - m)
    / sqrt(n - 1)`` of the samples the resample holds (``c_i > 0``)."""
    keep = c > 0
    m = c @ f / n
    return m, np.sqrt(c[keep])[:, None] * (f[keep] - m) / np.sqrt(n - 1)


def fd_replicates(
    features: Any, counts: np.ndarray, *, mu: Any = None, sigma: Any = None, paired_with: Any = None,
    paired_moments: tuple[np.ndarray, np.ndarray] | None = None, max_bytes: int = 1 << 28,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Fréchet distances of each resample ``(to_reference, to_paired)``: against fixed statistics
    ``(mu, sigma)`` (a reference set), and against ``paired_with``, features of the same sample
    indices resampled with the same counts (the model's exact-ODE samples from the same noises);
    ``None`` for the one not asked.  ``paired_moments``: ``resampled_moments(paired_with, counts)``
    computed once for many cells (used where there are more samples than dimensions).

    With fewer samples than dimensions (Inception's 2048, DINOv2's 1024 at a few hundred samples)
    the work moves to sample space: a resample's covariance is ``A^T A`` with ``A`` its ``n' x D``
    centred, count-weighted rows, and ``tr((S_1 S_2)^{1/2})`` is the nuclear norm of ``A S_2^{1/2}``
    (a fixed reference: ``S_2^{1/2}`` computed once) or of ``A B^T`` (paired: both resampled), the
    identity :func:`fewstep.eval.frechet.trace_sqrt_product` uses, so each resample costs
    ``O(n'^2 D)`` instead of ``O(D^3)``.  Otherwise resamples are processed in chunks of at most
    ``max_bytes`` of ``D x D`` covariances, the trace from the eigenvalues of ``R S R``
    (``R = S_ref^{1/2}``, once) or of ``S^{1/2} S_2 S^{1/2}`` (:func:`_trace_sqrt_eigvals`)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    pf = np.asarray(paired_with, dtype=np.float64) if paired_with is not None else None
    if n < d:
        to_ref, to_pair = [], []
        if mu is not None:
            mu_r, sig_r = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
            root, tr_r = _psd_sqrt(sig_r), float(np.trace(sig_r))
        for c in counts:
            m, a = _scaled_rows(f, c, n)
            if mu is not None:
                nuc = np.linalg.svd(a @ root, compute_uv=False).sum()
                to_ref.append(max(float((m - mu_r) @ (m - mu_r) + (a * a).sum() + tr_r - 2 * nuc), 0.0))
            if pf is not None:
                m2, b = _scaled_rows(pf, c, n)
                nuc = np.linalg.svd(a @ b.T, compute_uv=False).sum()
                to_pair.append(max(float((m - m2) @ (m - m2) + (a * a).sum() + (b * b).sum() - 2 * nuc), 0.0))
        return (np.array(to_ref) if mu is not None else None), (np.array(to_pair) if pf is not None else None)
    step = max(1, int(max_bytes // (8 * d * d)))
    to_ref, to_pair = [], []
    if mu is not None:
        mu_r, sig_r = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        root, tr_r = _psd_sqrt(sig_r), float(np.trace(sig_r))
    for lo in range(0, counts.shape[0], step):
        c = counts[lo : lo + step]
        m, s = resampled_moments(f, c)
        tr_s = np.trace(s, axis1=-2, axis2=-1)
        if mu is not None:
            diff = m - mu_r
            to_ref.append(np.maximum((diff * diff).sum(-1) + tr_s + tr_r - 2 * _trace_sqrt_eigvals(root @ s @ root), 0.0))
        if pf is not None:
            m2, s2 = (paired_moments[0][lo : lo + step], paired_moments[1][lo : lo + step]) if paired_moments is not None \
                else resampled_moments(pf, c)
            a = _psd_sqrt(s)
            diff = m - m2
            tr2 = np.trace(s2, axis1=-2, axis2=-1)
            to_pair.append(np.maximum((diff * diff).sum(-1) + tr_s + tr2 - 2 * _trace_sqrt_eigvals(a @ s2 @ a), 0.0))
    return (np.concatenate(to_ref) if mu is not None else None), (np.concatenate(to_pair) if pf is not None else None)


def _trace_sqrt_eigvals(m: np.ndarray) -> np.ndarray:
    """``tr(M^{1/2})`` of symmetric PSD matrices ``(..., D, D)`` from their eigenvalues alone
    (``eigvalsh``; eigenvalues within rounding of zero set to zero).  For resamples only: with one
    factor's square root fixed or computed once, this is one value-only decomposition per resample
    instead of the two eigendecompositions and one SVD of
    :func:`fewstep.eval.frechet.trace_sqrt_product`; the eigenvalues of ``S^{1/2} S_2 S^{1/2}`` lose
    accuracy only near zero, where the tolerance below zeroes them."""
    w = np.linalg.eigvalsh((m + np.swapaxes(m, -1, -2)) / 2)
    tol = m.shape[-1] * np.finfo(np.float64).eps * np.maximum(w.max(axis=-1, keepdims=True), 0.0)
    return np.sqrt(np.where(w > tol, w, 0.0)).sum(axis=-1)


def mmd_replicates(features: Any, reference: Any, counts: np.ndarray, kernel: Any = polynomial_kernel) -> np.ndarray:
    """The unbiased MMD^2 (KID's statistic with ``kernel=polynomial_kernel``) between each
    resample of ``features`` (N, D) and the whole fixed ``reference`` (M, D)."""
    x, y = np.asarray(features, np.float64), np.asarray(reference, np.float64)
    n, m = x.shape[0], y.shape[0]
    kxx, kxy, kyy = kernel(x, x), kernel(x, y), kernel(y, y)
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    xx = (np.einsum("bi,ij,bj->b", counts, kxx, counts) - counts @ np.diag(kxx)) / (n * (n - 1))
    xy = counts @ kxy.sum(axis=1) / (n * m)
    return xx + yy - 2 * xy


def interval(estimate: float, replicates: np.ndarray, nonnegative: bool = True) -> Interval:
    """``estimate +- Z95 * sd(replicates)`` (lower end clipped at 0 for a distance)."""
    if not math.isfinite(estimate):
        return Interval(estimate, math.nan, math.nan, math.nan)
    se = float(np.std(replicates, ddof=1))
    lo = estimate - Z95 * se
    return Interval(float(estimate), se, max(lo, 0.0) if nonnegative else lo, estimate + Z95 * se)


def paired_difference(estimate_a: float, estimate_b: float, replicates_a: np.ndarray, replicates_b: np.ndarray) -> Difference:
    """``a - b`` with the interval from the paired replicates (the same resamples for both)."""
    diff = float(estimate_a - estimate_b)
    se = float(np.std(np.asarray(replicates_a) - np.asarray(replicates_b), ddof=1))
    return Difference(diff, se, diff - Z95 * se, diff + Z95 * se)


def compare(estimates: Mapping[Hashable, float], replicates: Mapping[Hashable, np.ndarray]) -> Comparison | None:
    """The column's lowest finite estimate, its paired differences to every other finite cell, and
    whether it is significantly lower than all of them (``None`` without a finite cell)."""
    keys: Sequence[Hashable] = [k for k, v in estimates.items() if math.isfinite(v)]
    if not keys:
        return None
    best = min(keys, key=lambda k: estimates[k])
    diffs = {k: paired_difference(estimates[k], estimates[best], replicates[k], replicates[best]) for k in keys}
    others = [d for k, d in diffs.items() if k != best]
    return Comparison(best, bool(others) and all(d.lo > 0 for d in others), diffs)
