"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation", sec. 4): the maximum mean discrepancy between CLIP image embeddings under the
Gaussian RBF kernel ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))`` with ``sigma = 10``, scaled by
1000.

The authors' code (google-research ``cmmd/distance.py``) computes the plug-in (V-statistic)
estimate, the means of the kernel over *all* pairs of each matrix, the diagonal included::

    CMMD = 1000 * ( mean K_xx + mean K_yy - 2 mean K_xy ),

which is what :func:`cmmd` returns; ``unbiased=True`` drops the diagonals (the U-statistic, as KID
uses).  The embeddings are the unit-normalised ``image_embeds`` of a CLIP vision model
(:class:`fewstep.eval.clip.ClipFeatures`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fewstep.eval.stats import as_features

__all__ = ["rbf_kernel", "cmmd", "CMMD_SIGMA", "CMMD_SCALE"]

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def rbf_kernel(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA) -> np.ndarray:
    """``exp(-||x_i - y_j||^2 / (2 sigma^2))`` for x (M, d) and y (N, d)."""
    d2 = np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)
    return np.exp(-d2 / (2 * sigma**2))


def cmmd(x: Any, y: Any, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, unbiased: bool = False) -> float:
    """CMMD between embedding sets (M, d) and (N, d); see the module docstring."""
    a, b = as_features(x), as_features(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    kxx, kyy, kxy = rbf_kernel(a, a, sigma), rbf_kernel(b, b, sigma), rbf_kernel(a, b, sigma)
    if unbiased:
        m, n = a.shape[0], b.shape[0]
        xx, yy = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)), (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return float(scale * (xx + yy - 2 * kxy.mean()))
