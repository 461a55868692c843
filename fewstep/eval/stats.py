"""Mergeable running statistics: mean and covariance of features accumulated in chunks.

Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for computing sample
variances": two sets ``a`` and ``b`` with counts ``n_a, n_b``, means ``m_a, m_b`` and centred
scatter matrices ``M_a = sum (x - m_a)(x - m_a)^T`` merge exactly into

    n = n_a + n_b,   delta = m_b - m_a,
    m = m_a + delta n_b / n,
    M = M_a + M_b + delta delta^T n_a n_b / n,

in float64, so chunks can be folded in one at a time (each chunk's own scatter is computed around
its own mean, which keeps the sums well conditioned) and the states of several processes merged
(:meth:`RunningStats.all_reduce`).  The covariance is the unbiased ``M / (n - 1)``, as
``numpy.cov`` and clean-fid use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fewstep._util import atomic_savez, atomic_write_bytes  # the one atomic writer, re-exported here

__all__ = ["RunningStats", "as_features", "atomic_write_bytes", "atomic_savez"]


def as_features(features: Any) -> np.ndarray:
    """``features`` as a float64 array of shape (N, D)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().to(torch.float64).numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values (non-finite samples?)")
    return f


class RunningStats:
    """Count, mean and centred scatter matrix of (N, D) features, updated chunk by chunk.

    ``update(chunk)`` folds in a chunk, ``merge(other)`` / ``+`` combines two states,
    :meth:`all_reduce` combines the states of all ``torch.distributed`` processes (in rank order, so
    every process gets the same numbers).  ``mean`` and ``cov`` are float64."""

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self._mean = np.zeros(dim) if dim is not None else None
        self._m2 = np.zeros((dim, dim)) if dim is not None else None

    @classmethod
    def from_features(cls, features: Any) -> "RunningStats":
        return cls().update(features)

    def _merge_moments(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if n_b == 0:
            return
        if self.dim is None:
            self.dim = mean_b.shape[0]
            self._mean, self._m2 = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        if mean_b.shape != (self.dim,):
            raise ValueError(f"feature dimension mismatch: these statistics have D={self.dim}, got D={mean_b.shape[0]}")
        if self.n == 0:
            self.n, self._mean, self._m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def update(self, features: Any) -> "RunningStats":
        """Fold in a chunk of features (N, D); returns ``self``."""
        f = as_features(features)
        if f.shape[0]:
            mean_b = f.mean(axis=0)
            c = f - mean_b
            self._merge_moments(f.shape[0], mean_b, c.T @ c)
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """A new state holding both sets."""
        out = self.copy()
        if other.n:
            out._merge_moments(other.n, other._mean, other._m2)
        return out

    __add__ = merge

    def copy(self) -> "RunningStats":
        out = RunningStats(self.dim)
        out.n = self.n
        if self.dim is not None:
            out._mean, out._m2 = self._mean.copy(), self._m2.copy()
        return out

    @property
    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features accumulated yet")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``M / (n - 1)``."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        m2 = (self._m2 + self._m2.T) / 2
        return m2 / (self.n - 1)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that :meth:`from_state` restores (for saving or sending between processes)."""
        if self.dim is None:
            return {"n": np.array(0)}
        return {"n": np.array(self.n), "mean": self._mean, "m2": self._m2}

    @classmethod
    def from_state(cls, state: Any) -> "RunningStats":
        n = int(np.asarray(state["n"]))
        if n == 0:
            return cls()
        out = cls(int(np.asarray(state["mean"]).shape[0]))
        out._merge_moments(n, np.asarray(state["mean"], dtype=np.float64), np.asarray(state["m2"], dtype=np.float64))
        return out

    def all_reduce(self) -> "RunningStats":
        """The merge of this state over every process of the default ``torch.distributed`` group
        (merged in rank order: identical on every rank).  Without a process group, a copy."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.copy()
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, self.state())
        out = RunningStats()
        for s in states:
            out = out.merge(RunningStats.from_state(s))
        return out

    def __repr__(self) -> str:
        return f"RunningStats(n={self.n}, dim={self.dim})"
