"""Improved precision and recall of a generative model (Kynkäänniemi et al. 2019, "Improved
Precision and Recall Metric for Assessing Generative Models", sec. 2, eqs. 1-2).

Each feature set is approximated by the union of balls around its points, the radius of a point
being the distance to its ``k``-th nearest neighbour in its own set (the point itself excluded;
``k = 3`` in the paper).  With

    f(phi, Phi) = 1  if  ||phi - phi'|| <= ||phi' - NN_k(phi', Phi)||  for some phi' in Phi, else 0,

precision is the mean of ``f(phi_g, Phi_r)`` over generated features (how many samples fall on the
real manifold) and recall the mean of ``f(phi_r, Phi_g)`` over real features (how much of the real
manifold the samples cover).  Distances are Euclidean, in float64, computed in blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fewstep.eval.stats import as_features

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def knn_radii(features: Any, k: int = 3, block: int = 2048) -> np.ndarray:
    """Distance of every point to its ``k``-th nearest neighbour in the same set (itself excluded)."""
    f = as_features(features)
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must be between 1 and the number of points - 1 ({f.shape[0] - 1}), got {k}")
    out = np.empty(f.shape[0])
    for lo in range(0, f.shape[0], block):
        d = _sq_dists(f[lo : lo + block], f)
        out[lo : lo + block] = np.sqrt(np.partition(d, k, axis=1)[:, k])  # index 0 is the point itself (distance 0)
    return out


def manifold_coverage(query: Any, support: Any, radii: np.ndarray, block: int = 2048) -> float:
    """Share of ``query`` points inside at least one ball ``(support_j, radii_j)`` (eq. 1's ``f``)."""
    q, s = as_features(query), as_features(support)
    inside = np.empty(q.shape[0], dtype=bool)
    r2 = np.asarray(radii, np.float64) ** 2
    for lo in range(0, q.shape[0], block):
        inside[lo : lo + block] = (_sq_dists(q[lo : lo + block], s) <= r2[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(generated: Any, real: Any, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of ``generated`` features against ``real`` ones (eq. 2)."""
    g, r = as_features(generated), as_features(real)
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"feature dimensions differ: {g.shape[1]} vs {r.shape[1]}")
    return manifold_coverage(g, r, knn_radii(r, k)), manifold_coverage(r, g, knn_radii(g, k))
