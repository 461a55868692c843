"""Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, "GANs Trained
by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6), in float64.

``FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2})``.

The trace of the matrix square root is the sum of the singular values of
``S_2^{1/2} S_1^{1/2}`` (:func:`trace_sqrt_product`), each factor from a symmetric
eigendecomposition: real arithmetic throughout, so there is no complex round-off to discard and no
iteration to fail, and small eigenvalues keep their accuracy.  Eigenvalues of a covariance within
rounding error of zero are treated as zero (:func:`_psd_eigh`): covariances of network features are
often singular (dead units, fewer samples than dimensions), and the square root would otherwise
turn rounding noise of 1e-13 into errors of 1e-6 per direction.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distances", "frechet_distance_from_features", "trace_sqrt_product"]


def _np64(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``N - 1``) of ``features`` of shape (N, D), in float64."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_eigh(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of symmetric PSD matrices ``(..., D, D)``, eigenvalues within rounding of zero
    set to zero.

    ``eigh`` returns each eigenvalue with an absolute error of about ``D eps ||S||``; a zero
    eigenvalue (a feature that never varies, such as a dead ReLU unit, or fewer samples than
    dimensions) then comes back as +-1e-13 or so, and its square root, 3e-7, is pure noise that
    adds up over many such directions.  Eigenvalues under that error bound are therefore zeroed
    (the rank decision ``numpy.linalg.matrix_rank`` makes), matrix by matrix."""
    w, v = np.linalg.eigh((s + np.swapaxes(s, -1, -2)) / 2)
    top = np.maximum(w.max(axis=-1, initial=0.0), 0.0)
    tol = s.shape[-1] * np.finfo(np.float64).eps * top
    return np.where(w > tol[..., None], w, 0.0), v


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = _psd_eigh(s)
    return (v * np.sqrt(w)[..., None, :]) @ np.swapaxes(v, -1, -2)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float | np.ndarray:
    """``tr((S_1 S_2)^{1/2})`` for symmetric PSD ``S_1, S_2`` (or stacks ``(..., D, D)`` of them,
    broadcast against each other; then an array of traces).

    The eigenvalues of ``S_1^{1/2} S_2 S_1^{1/2} = A^T A`` with ``A = S_2^{1/2} S_1^{1/2}`` are the
    squared singular values of ``A``, so the trace is the sum of the singular values of ``A``
    (its nuclear norm).  An SVD gives them with absolute error ``~ eps ||A||``; taking square roots
    of the eigenvalues of ``A^T A`` instead would turn the error ``eps ||A||^2`` of a small
    eigenvalue ``lambda`` into ``eps ||A||^2 / (2 sqrt(lambda))``."""
    a = _psd_sqrt(_np64(s2)) @ _psd_sqrt(_np64(s1))
    t = np.linalg.svd(a, compute_uv=False).sum(axis=-1)
    return float(t) if np.ndim(t) == 0 else t


def frechet_distances(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """Fréchet distances between stacks of Gaussians: means ``(..., D)``, covariances
    ``(..., D, D)``, broadcast against each other (e.g. many bootstrap fits against one
    reference); an array of distances."""
    mu1, mu2, s1, s2 = _np64(mu1), _np64(mu2), _np64(s1), _np64(s2)
    d = mu1.shape[-1]
    if mu2.shape[-1] != d or s1.shape[-2:] != (d, d) or s2.shape[-2:] != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    tr = np.trace(s1, axis1=-2, axis2=-1) + np.trace(s2, axis1=-2, axis2=-1)
    return np.maximum(np.sum(diff * diff, axis=-1) + tr - 2 * np.asarray(trace_sqrt_product(s1, s2)), 0.0)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance between ``N(mu1, s1)`` and ``N(mu2, s2)``."""
    mu1, mu2, s1, s2 = _np64(mu1), _np64(mu2), _np64(s1), _np64(s2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    return float(frechet_distances(mu1, s1, mu2, s2))


def frechet_distance_from_features(f1: np.ndarray | torch.Tensor, f2: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (N, D)."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
