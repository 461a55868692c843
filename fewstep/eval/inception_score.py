"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 4):

    IS = exp( E_x KL( p(y | x) || p(y) ) ),    p(y) = E_x p(y | x),

computed, as in the authors' code, on ``splits`` consecutive equal parts of the samples (10), each
part with its own marginal ``p(y)``, and reported as the mean and standard deviation over the
parts.  The class probabilities are the softmax of the classifier's logits, in float64 from the
logits (log-softmax, so no probability underflows to ``log 0``).  For Inception the logits are the
pool features times the output layer's weight *without its bias*, as the authors' TensorFlow code
(and StyleGAN2-ADA's ``no_output_bias=True``, torch-fidelity's ``logits_unbiased``) computes them:
:meth:`fewstep.eval.features.InceptionFeatures.logits_from_features`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["inception_score"]


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """``(mean, std)`` of the Inception Score over ``splits`` consecutive parts of ``logits`` (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < splits or splits < 1:
        raise ValueError(f"need logits (N, C) with N >= splits = {splits}, got shape {z.shape}")
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    n = z.shape[0]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
