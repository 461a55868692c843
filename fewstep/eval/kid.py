"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 4 and app. D):
the unbiased estimate of the squared maximum mean discrepancy under the cubic polynomial kernel

    k(x, y) = (x . y / d + 1)^3,        d = feature dimension,

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(mn) sum_{i,j} k(x_i, y_j)                                            (eq. 2 there)

in float64.  It is a U-statistic, so its expectation is the population MMD^2 whatever the sample
sizes (FID has no unbiased estimator and shrinks with more samples).  As in the paper and in
clean-fid, KID averages the estimate over random subsets of equal size (100 subsets of at most 1000)
and reports the spread; the subsets come from a seeded generator, so the number is reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fewstep.eval.stats import as_features

__all__ = ["polynomial_kernel", "mmd2_from_kernels", "mmd2_unbiased", "kernel_inception_distance"]


def polynomial_kernel(x: Any, y: Any, degree: int = 3, coef0: float = 1.0) -> Any:
    """``(x y^T / d + coef0)^degree`` for x (M, d) and y (N, d): NumPy arrays, or torch tensors
    (differentiable; MMD finetuning, :mod:`fewstep.distill.mmd`)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_from_kernels(kxx: Any, kyy: Any, kxy: Any) -> Any:
    """eq. 2's unbiased MMD^2 from the three kernel matrices (NumPy arrays, or torch tensors: then
    a differentiable 0-d tensor)."""
    m, n = kxx.shape[0], kyy.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2 * kxy.mean()


def mmd2_unbiased(f1: Any, f2: Any, degree: int = 3, coef0: float = 1.0) -> float:
    """The unbiased MMD^2 estimate between feature sets (M, d) and (N, d) (sizes may differ)."""
    x, y = as_features(f1), as_features(f2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    k = lambda a, b: polynomial_kernel(a, b, degree, coef0)  # noqa: E731
    return float(mmd2_from_kernels(k(x, x), k(y, y), k(x, y)))


def kernel_inception_distance(
    f1: Any,
    f2: Any,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID between two feature sets: the mean and standard deviation of :func:`mmd2_unbiased`
    over ``num_subsets`` pairs of random subsets of ``min(subset_size, N1, N2)`` features each
    (drawn without replacement from a ``numpy`` generator seeded with ``seed``)."""
    x, y = as_features(f1), as_features(f2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        vals[i] = mmd2_unbiased(xs, ys)
    return float(vals.mean()), float(vals.std(ddof=1)) if num_subsets > 1 else 0.0
