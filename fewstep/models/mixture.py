r"""An exact Gaussian-mixture model: closed-form denoiser, density, samples and probability-flow map.

The data distribution is ``p_0 = sum_k w_k N(mu_k, Sigma_k)`` on ``R^D`` with full covariances.
Under the forward process ``x_t = alpha x_0 + sigma eps`` (``eps ~ N(0, I)``) every marginal is
again a mixture,

.. math::

    p_t(x) = \sum_k w_k \, N(x;\ \alpha \mu_k,\ \alpha^2 \Sigma_k + \sigma^2 I),

so the denoiser ``D(x, t) = E[x_0 | x_t = x]`` is known in closed form at every noise level
(Bayes' rule for a linear-Gaussian observation, per component, then mixed with the posterior
component probabilities).  With the eigendecomposition ``Sigma_k = U_k diag(s_k) U_k^T``, done once,
every noise level costs two batched matrix products and no solve:

* ``z_k = U_k^T (x - alpha mu_k)``,  ``v_k = alpha^2 s_k + sigma^2``  (eigenvalues of the marginal covariance);
* ``log r_k = log w_k - 1/2 sum_j log(2 pi v_kj) - 1/2 sum_j z_kj^2 / v_kj``, normalised by log-sum-exp;
* ``E[x_0 | x, k] = mu_k + U_k diag(alpha s_k / v_k) z_k``  (the Wiener filter of component ``k``);
* ``E[x_0 | x] = sum_k r_k E[x_0 | x, k]``.

This makes the probability-flow ODE solvable to ~1e-9 with scipy, so a sampler's error on this
model is pure discretisation error (DESIGN.md, "The exact testbed").  :meth:`GaussianMixture.digits`
gives a 10-component, 64-dimensional mixture fitted to scikit-learn's 8x8 digits, shipped in the
package.

The probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
eq. 13) is solved in two well-conditioned variables (derivations in :meth:`GaussianMixture.ode_solve`):

* low noise: ``y = x / alpha`` against ``s = (sigma / alpha)^2 = exp(-2 lambda)``,
  ``dy/ds = (y - D) / (2 s) = 1/2 sum_k r_k(y, s) (Sigma_k + s I)^{-1} (y - mu_k)``, regular at
  ``s = 0`` (clean data), integrated in ``u = log(s + c)``;
* high noise: ``w = x / sigma`` against ``tau = alpha / sigma = exp(lambda)``,
  ``dw/dtau = E[x_0 | w = tau x_0 + eps]``, regular at ``tau = 0`` (zero SNR).

**Flow-matching form.**  Under rectified flow (Liu et al. 2023; Lipman et al. 2023; Esser et al.
2024), ``x_t = (1 - t) x_0 + t eps`` on ``t in [0, 1]``: the same closed-form denoiser with
``alpha = 1 - t``, ``sigma = t``, and the velocity a flow network is trained to output is
``u(x, t) = E[eps - x_0 | x_t = x] = (x - D(x, t)) / t`` (:meth:`GaussianMixture.flow_velocity`).  The
probability-flow ODE in flow time is ``dx/dt = u(x, t)``; its exact solution is the same map as
above (it depends on the schedule only through ``lambda = log((1 - t) / t)`` at the two ends), and
it starts at ``t = 1`` (``sigma = 1``, zero SNR) from the noise itself
(:meth:`GaussianMixture.flow_ode_solve`).  :class:`MixtureVelocity` is the velocity as a diffusers
flow network sees it (timestep ``N t``).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from fewstep.schedules import NoiseSchedule

__all__ = [
    "GaussianMixture",
    "MixtureDenoiser",
    "MixtureVelocity",
    "digits_data",
    "DIGITS_REG_COVAR",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]
Scalar = Union[float, int, torch.Tensor]

#: ``reg_covar`` of the shipped digits fit (a variance, in [-1, 1] pixel units).  It is added to
#: every fitted covariance, so it bounds every covariance eigenvalue from below (and is attained:
#: the smallest is 0.02 up to float32 rounding).  Some digits pixels (the border columns) are
#: blank in nearly every image, so without it those directions get variance ~1e-6: the denoiser
#: then changes on the scale ``sigma / alpha ~ 1e-3``, below ``t_min`` of common schedules, and
#: the probability-flow ODE in ``s = (sigma / alpha)^2`` has rate up to ``1 / (2 s_min)`` there.
#: :meth:`GaussianMixture.ode_solve` copes either way (it integrates in ``log(s + s_min)``), but a
#: few-step sampler under test would spend its error on that artefact.  0.02 is a pixel standard
#: deviation of 0.14, about one grey level of 16.  The held-out log-likelihood is no guide (it
#: keeps rising as ``reg_covar`` shrinks, rewarding the near-constant pixels); see
#: ``scripts/fit_digits_gmm.py``.
DIGITS_REG_COVAR = 2e-2
#: Seed of the fixed train/test permutation of the digits (``numpy.random.RandomState``, whose
#: stream NumPy keeps frozen across versions, NEP 19).
DIGITS_SPLIT_SEED = 0
#: Fraction of the digits held out as the test split.
DIGITS_TEST_FRACTION = 0.2

_DIGITS_FILE = "digits_gmm.npz"
_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------


def _to_float64(value: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device="cpu")
    else:
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}: {exc}") from exc
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; pass finite numbers")
    return t


class _Params(NamedTuple):
    """Precomputed parameters on one device (all float64)."""

    log_w: torch.Tensor  # (K,)
    mu: torch.Tensor  # (K, D)
    s: torch.Tensor  # (K, D) covariance eigenvalues
    u_cat: torch.Tensor  # (D, K*D): u_cat[:, k*D + j] = U_k[:, j]
    u_mu: torch.Tensor  # (K, D): U_k^T mu_k
    mean: torch.Tensor  # (D,) overall data mean


def _compute_device(device: torch.device) -> torch.device:
    # Apple's MPS has no float64: compute there on the CPU.
    return torch.device("cpu") if device.type == "mps" else device


# ---------------------------------------------------------------------------------------------
# The mixture
# ---------------------------------------------------------------------------------------------


class GaussianMixture:
    """``p_0 = sum_k w_k N(mu_k, Sigma_k)`` in ``R^D`` with full covariances, exact under noising.

    Args:
        weights: (K,) positive mixture weights summing to 1 (within 1e-4; renormalised exactly).
        means: (K, D) component means.
        covariances: (K, D, D) symmetric positive-definite component covariances.

    Parameters are stored as float64 CPU tensors (``weights``, ``means``, ``covariances``), with
    the eigendecomposition ``Sigma_k = U_k diag(s_k) U_k^T`` (``eigenvectors`` (K, D, D),
    ``eigenvalues`` (K, D)) computed once.  All computation runs in float64.
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, covariances: ArrayLike):
        w = _to_float64(weights, "weights")
        mu = _to_float64(means, "means")
        cov = _to_float64(covariances, "covariances")
        if w.ndim != 1 or w.numel() < 1:
            raise ValueError(f"weights must have shape (K,) with K >= 1 components, got shape {tuple(w.shape)}")
        k = w.numel()
        if mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] < 1:
            raise ValueError(
                f"means must have shape (K, D) = ({k}, D) to match {k} weights, got shape {tuple(mu.shape)}"
            )
        d = mu.shape[1]
        if tuple(cov.shape) != (k, d, d):
            raise ValueError(
                f"covariances must have shape (K, D, D) = ({k}, {d}, {d}) to match weights (K={k}) and means "
                f"(D={d}), got shape {tuple(cov.shape)}"
            )
        if bool((w <= 0).any()):
            raise ValueError(
                f"weights must all be positive, got {w.tolist()}; drop components with zero weight"
            )
        total = float(w.sum())
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"weights must sum to 1, they sum to {total!r}; divide them by their sum")
        w = w / w.sum()
        scale = float(cov.abs().amax())
        asym = float((cov - cov.transpose(1, 2)).abs().amax())
        if asym > 1e-6 * scale:
            raise ValueError(
                f"covariances must be symmetric; the largest |Sigma - Sigma^T| is {asym:.3g} "
                f"(largest entry {scale:.3g}); symmetrise them with (S + S^T) / 2"
            )
        cov = 0.5 * (cov + cov.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(cov)
        smin = evals.amin(dim=1)
        smax = evals.amax(dim=1)
        bad = smin <= 1e-13 * smax.clamp_min(torch.finfo(torch.float64).tiny)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"covariance {i} is not positive definite (smallest eigenvalue {float(smin[i]):.3g}, largest "
                f"{float(smax[i]):.3g}); add a small multiple of the identity (e.g. reg_covar * I) to it"
            )
        self.weights: torch.Tensor = w
        self.means: torch.Tensor = mu
        self.covariances: torch.Tensor = cov
        self.eigenvalues: torch.Tensor = evals  # (K, D), ascending
        self.eigenvectors: torch.Tensor = evecs  # (K, D, D), columns
        self._cache: dict[str, _Params] = {}

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        data: ArrayLike,
        n_components: int = 10,
        reg_covar: float = 1e-6,
        seed: int = 0,
        *,
        n_init: int = 1,
        max_iter: int = 500,
        tol: float = 1e-4,
    ) -> GaussianMixture:
        """Maximum-likelihood fit by EM (``sklearn.mixture.GaussianMixture(covariance_type="full")``).

        Args:
            data: (N, D) samples.
            n_components: number of components K.
            reg_covar: added to the diagonal of every covariance; it is a lower bound on every
                covariance eigenvalue.  scikit-learn's default 1e-6 is kept, but data with
                (near-)constant coordinates then get eigenvalues that small, so the denoiser
                varies fastest at tiny noise levels (``sigma / alpha ~ sqrt(reg_covar)``), where
                samplers under test would spend their error; pick it on the scale of the data's
                noise floor (the digits fit uses :data:`DIGITS_REG_COVAR`).
            seed: ``random_state`` of the k-means initialisation.
            n_init, max_iter, tol: passed to scikit-learn.
        """
        from sklearn.mixture import GaussianMixture as _SkGMM

        x = _to_float64(data, "data")
        if x.ndim != 2:
            raise ValueError(f"data must have shape (N, D), got shape {tuple(x.shape)}; flatten each sample first")
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components!r}")
        if x.shape[0] < n_components:
            raise ValueError(f"need at least n_components={n_components} samples to fit, got {x.shape[0]}")
        if not reg_covar >= 0:
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar!r}")
        gm = _SkGMM(
            n_components=int(n_components),
            covariance_type="full",
            reg_covar=float(reg_covar),
            random_state=int(seed),
            n_init=int(n_init),
            max_iter=int(max_iter),
            tol=float(tol),
        )
        gm.fit(x.numpy())
        return cls(gm.weights_, gm.means_, gm.covariances_)

    @classmethod
    def digits(cls) -> GaussianMixture:
        """The shipped 10-component full-covariance fit to scikit-learn's 8x8 digits (D = 64).

        Pixels are scaled from [0, 16] to [-1, 1] (``x / 8 - 1``), as :func:`digits_data` returns
        them.  The fit used the ``"train"`` split of :func:`digits_data` and
        ``reg_covar = DIGITS_REG_COVAR`` (every covariance eigenvalue is >= 0.02, up to float32
        rounding of the stored covariances); it is stored
        in ``fewstep/models/data/digits_gmm.npz`` (float32) by ``scripts/fit_digits_gmm.py``, so
        it does not depend on the installed scikit-learn.
        """
        arrays = _load_digits_npz()
        return cls(arrays["weights"], arrays["means"], arrays["covariances"])

    # -- basic properties -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Data dimension D."""
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return int(self.weights.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """Overall data mean ``sum_k w_k mu_k``, (D,) float64."""
        return self.weights @ self.means

    @property
    def covariance(self) -> torch.Tensor:
        """Overall data covariance ``sum_k w_k (Sigma_k + mu_k mu_k^T) - m m^T`` (law of total
        covariance), (D, D) float64."""
        m = self.mean
        dm = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covariances) + torch.einsum(
            "k,ki,kj->ij", self.weights, dm, dm
        )

    @property
    def min_eigenvalue(self) -> float:
        """Smallest eigenvalue over all component covariances."""
        return float(self.eigenvalues.amin())

    def __repr__(self) -> str:
        return (
            f"GaussianMixture(num_components={self.num_components}, dim={self.dim}, "
            f"eigenvalues in [{self.min_eigenvalue:.3g}, {float(self.eigenvalues.amax()):.3g}])"
        )

    # -- internals --------------------------------------------------------------------------------
    def _params(self, device: torch.device) -> _Params:
        key = str(device)
        p = self._cache.get(key)
        if p is None:
            k, d = self.num_components, self.dim
            u = self.eigenvectors
            p = _Params(
                log_w=torch.log(self.weights),
                mu=self.means,
                s=self.eigenvalues,
                u_cat=u.permute(1, 0, 2).reshape(d, k * d).contiguous(),
                u_mu=torch.einsum("kdj,kd->kj", u, self.means),
                mean=self.mean,
            )
            p = _Params(*(t.to(device) for t in p))
            self._cache[key] = p
        return p

    def _flatten(self, x: ArrayLike, name: str = "x") -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, D) float64 view of ``x`` (on its compute device) and ``x``'s shape.  Not detached:
        :meth:`posterior_mean` is differentiable in ``x`` (sampling plans are tuned through it)."""
        if not isinstance(x, torch.Tensor):
            x = _to_float64(x, name)
        if not (x.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        shape = tuple(x.shape)
        if x.ndim < 2 or math.prod(shape[1:]) != self.dim:
            raise ValueError(
                f"{name} must have shape (B, {self.dim}) or (B, ...) with {self.dim} values per sample "
                f"(the mixture's dimension), got shape {shape}"
            )
        dev = _compute_device(x.device)
        return x.to(device=dev, dtype=torch.float64).reshape(shape[0], self.dim), shape

    @staticmethod
    def _coef(value: Scalar, batch: int, device: torch.device, name: str) -> torch.Tensor:
        """A noise coefficient as a float64 tensor of shape () or (B,)."""
        if isinstance(value, torch.Tensor):
            v = value.detach().to(device=device, dtype=torch.float64)
            if v.numel() == 1:
                v = v.reshape(())
            elif v.numel() == batch:
                v = v.reshape(batch)
            else:
                raise ValueError(
                    f"{name} must be a number, a 0-d tensor or a ({batch},) tensor (one per sample), "
                    f"got shape {tuple(value.shape)}"
                )
        elif isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
            v = torch.tensor(float(value), dtype=torch.float64, device=device)
        else:
            raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0, got {v.tolist()}")
        return v

    def _coefs(self, alpha: Scalar, sigma: Scalar, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._coef(alpha, batch, device, "alpha")
        s = self._coef(sigma, batch, device, "sigma")
        if bool(((a == 0) & (s == 0)).any()):
            raise ValueError("alpha and sigma are both 0, which is no noise level; at least one must be positive")
        return a, s

    @staticmethod
    def _terms(
        p: _Params, x: torch.Tensor, alpha: torch.Tensor, sigma2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component quantities of the marginal ``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma2 I)``.

        ``x`` (B, D); ``alpha``, ``sigma2`` of shape () or (B,).  With ``v_k = alpha^2 s_k + sigma2``
        (the eigenvalues of component ``k``'s marginal covariance) returns

        * ``zt`` (B, K, D): the whitened residuals ``v_k^{-1/2} * U_k^T (x - alpha mu_k)``;
        * ``isv`` (K, D), or (B, K, D) for per-sample noise: ``v_k^{-1/2}``;
        * ``log_joint`` (B, K): ``log w_k + log N(x; alpha mu_k, U_k diag(v_k) U_k^T)``.

        For a shared noise level the whitening is folded into the (D, K*D) matrix of the single
        matrix product, so the only (B, K, D) pass is the squared norm."""
        b = x.shape[0]
        k, d = p.mu.shape
        if alpha.ndim == 0 and sigma2.ndim == 0:
            isv = torch.rsqrt(alpha * alpha * p.s + sigma2)  # (K, D)
            isv_flat = isv.reshape(1, k * d)
            bias = (-alpha) * p.u_mu.reshape(1, k * d) * isv_flat
            zt = torch.addmm(bias, x, p.u_cat * isv_flat).view(b, k, d)
            half_logdet = -torch.log(isv).sum(-1)  # (K,)
        else:
            a = alpha.expand(b).reshape(b, 1, 1)
            isv = torch.rsqrt(a * a * p.s + sigma2.expand(b).reshape(b, 1, 1))  # (B, K, D)
            zt = (x @ p.u_cat).view(b, k, d).sub_(a * p.u_mu).mul_(isv)
            half_logdet = -torch.log(isv).sum(-1)  # (B, K)
        quad = torch.linalg.vector_norm(zt, dim=-1).square()
        log_joint = p.log_w - half_logdet - 0.5 * (quad + d * _LOG_2PI)
        return zt, isv, log_joint

    @staticmethod
    def _mix(p: _Params, zt: torch.Tensor, r: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``sum_k r_k U_k (factor_k * zt_k)`` (B, D) for ``factor`` (K, D) or (B, K, D)."""
        b, k, d = zt.shape
        if factor.ndim == 2:
            weighted = (zt * r.unsqueeze(-1)).view(b, k * d)
            return weighted @ (p.u_cat * factor.reshape(1, k * d)).T
        return (zt * factor * r.unsqueeze(-1)).view(b, k * d) @ p.u_cat.T

    def _posterior_mean64(self, p: _Params, x: torch.Tensor, alpha: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
        """``E[x_0 | alpha x_0 + sigma eps = x]`` for (B, D) float64 ``x``, no special cases.

        Wiener gain in the eigenbasis: ``alpha s_k / v_k`` on ``U_k^T (x - alpha mu_k) = zt_k sqrt(v_k)``."""
        zt, isv, log_joint = self._terms(p, x, alpha, sigma2)
        r = torch.softmax(log_joint, dim=-1)  # (B, K) posterior component probabilities
        a = alpha.reshape(-1, 1, 1) if alpha.ndim else alpha
        return torch.addmm(self._mix(p, zt, r, a * p.s * isv), r, p.mu)

    def _neg_score64(self, p: _Params, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``-grad log p_s(y) = sum_k r_k (Sigma_k + s I)^{-1} (y - mu_k)`` for ``y = x_0 + sqrt(s) eps``."""
        zt, isv, log_joint = self._terms(p, y, torch.ones((), dtype=torch.float64, device=y.device), s)
        r = torch.softmax(log_joint, dim=-1)
        return self._mix(p, zt, r, isv)

    # -- public maths -----------------------------------------------------------------------------
    def posterior_mean(self, x: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
        """The exact denoiser ``E[x_0 | x_t = x]`` for ``x_t = alpha x_0 + sigma eps``.

        Per component this is the Wiener filter ``mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2
        I)^{-1} (x - alpha mu_k)``; the components are mixed with the posterior probabilities
        ``r_k(x) ∝ w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` (log-sum-exp).  Everything
        runs in float64 in the eigenbases (no linear solve).

        Args:
            x: (B, D) or (B, ...) with D values per sample.
            alpha, sigma: floats, 0-d tensors or (B,) tensors, ``>= 0`` and not both 0.  At
                ``alpha = 0`` the result is the data mean; at ``sigma = 0`` it is ``x / alpha``.

        Returns:
            x0_hat with ``x``'s shape, dtype and device.
        """
        xf, shape = self._flatten(x)
        dev = xf.device
        p = self._params(dev)
        a, s = self._coefs(alpha, sigma, xf.shape[0], dev)
        out = self._posterior_mean64(p, xf, a, s * s)
        # The limits exactly (the general formula gets them to rounding error).
        if bool((s == 0).any()):
            a_safe = torch.where(a == 0, torch.ones_like(a), a)
            exact = xf / (a_safe.reshape(-1, 1) if a.ndim else a_safe)
            out = torch.where((s == 0).reshape(-1, 1) if s.ndim else (s == 0), exact, out)
        if bool((a == 0).any()):
            out = torch.where((a == 0).reshape(-1, 1) if a.ndim else (a == 0), p.mean.expand_as(out), out)
        if isinstance(x, torch.Tensor):
            return out.reshape(shape).to(device=x.device, dtype=x.dtype)
        return out.reshape(shape)

    def log_prob(self, x: ArrayLike, alpha: Scalar = 1.0, sigma: Scalar = 0.0) -> torch.Tensor:
        """``log p(x)`` of the noised marginal ``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``.

        Args:
            x: (B, D) or (B, ...).
            alpha, sigma: floats, 0-d or (B,) tensors (default: the data distribution itself).

        Returns:
            (B,) float64 log-densities (on ``x``'s compute device).
        """
        xf, _ = self._flatten(x)
        p = self._params(xf.device)
        a, s = self._coefs(alpha, sigma, xf.shape[0], xf.device)
        _, _, log_joint = self._terms(p, xf, a, s * s)
        return torch.logsumexp(log_joint, dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples of ``p_0``, (n, D) float64 on the CPU.

        The component indices are drawn first (``torch.multinomial``), then standard normals
        ``eps`` (n, D), mapped through ``mu_k + U_k diag(sqrt(s_k)) eps``; a seeded CPU
        ``generator`` makes the result deterministic."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        if n:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            comp = torch.zeros(0, dtype=torch.long)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        out = torch.empty(n, self.dim, dtype=torch.float64)
        root = self.eigenvalues.sqrt()
        for k in range(self.num_components):
            idx = torch.nonzero(comp == k).flatten()
            if idx.numel():
                out[idx] = self.means[k] + (eps[idx] * root[k]) @ self.eigenvectors[k].T
        return out

    def sample_marginal(
        self, n: int, t: float, schedule: NoiseSchedule, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` exact samples of ``x_t = alpha(t) x_0 + sigma(t) eps``, (n, D) float64.

        ``x_0`` is drawn with :meth:`sample`, then ``eps``, both from ``generator``."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fewstep.schedules.NoiseSchedule, got {type(schedule).__name__}")
        t = float(t)
        schedule.check_time(t, "t")
        alpha, sigma = schedule.alpha_sigma(t)
        x0 = self.sample(n, generator=generator)
        eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        return alpha * x0 + sigma * eps

    def denoiser(self, schedule: NoiseSchedule) -> MixtureDenoiser:
        """The exact denoiser ``D(x, t) = E[x_0 | x_t = x]`` in ``schedule``'s time (see
        :class:`MixtureDenoiser`)."""
        return MixtureDenoiser(self, schedule)

    # -- the flow-matching form ----------------------------------------------------------------------
    def flow_denoiser(self, shift: float = 1.0, num_train_timesteps: int = 1000) -> MixtureDenoiser:
        """The exact denoiser in rectified-flow time (``alpha = 1 - t``, ``sigma = t``; ``shift`` only
        places the default grid, see :class:`fewstep.schedules.FlowMatching`)."""
        from fewstep.schedules import FlowMatching

        return MixtureDenoiser(self, FlowMatching(shift, num_train_timesteps))

    def flow_velocity(self, x: torch.Tensor, t: Scalar) -> torch.Tensor:
        """The exact flow-matching velocity ``u(x, t) = E[eps - x_0 | (1 - t) x_0 + t eps = x]
        = (x - D(x, t)) / t`` for ``t in (0, 1]`` (a float, 0-d or (B,) tensor); at ``t = 1`` it is
        ``x - E[x_0]``.  This is the target of conditional flow matching (Lipman et al. 2023, eq. 23
        with the rectified path), in ``x``'s dtype."""
        xf, shape = self._flatten(x)
        tt = self._coef(t, xf.shape[0], xf.device, "t")
        if bool((tt <= 0).any()) or bool((tt > 1).any()):
            raise ValueError(f"flow time t must be in (0, 1] (t = 0 is clean data, where the velocity is not defined), got {tt.tolist()}")
        d = self.posterior_mean(xf, 1.0 - tt, tt)
        tb = tt.reshape(-1, 1) if tt.ndim else tt
        out = ((xf - d) / tb).reshape(shape)
        return out.to(device=x.device, dtype=x.dtype) if isinstance(x, torch.Tensor) else out

    def flow_ode_solve(self, x: ArrayLike, t_from: float = 1.0, t_to: float = 0.0, rtol: float = 1e-9, atol: float = 1e-9) -> torch.Tensor:
        """The exact solution of ``dx/dt = u(x, t)`` in flow time from ``t_from`` (default 1: pure
        noise, ``x`` is the noise itself) to ``t_to`` (default 0: the sample): :meth:`ode_solve` on the
        rectified-flow schedule, whose change of variables is exact at both ends."""
        from fewstep.schedules import FlowMatching

        return self.ode_solve(x, FlowMatching(), t_from, t_to, rtol=rtol, atol=atol)

    # -- the exact probability-flow ODE ------------------------------------------------------------
    def ode_solve(
        self,
        x: ArrayLike,
        schedule: NoiseSchedule,
        t_from: float,
        t_to: float,
        rtol: float = 1e-9,
        atol: float = 1e-9,
    ) -> torch.Tensor:
        r"""The exact probability-flow ODE map ``x_{t_from} -> x_{t_to}``, solved with scipy.

        The PF-ODE (Song et al. 2021, eq. 13) in data-prediction form is
        ``dx/dlambda = (d log sigma / d lambda) x + alpha D(x, lambda)`` with ``lambda = log(alpha /
        sigma)`` (Lu et al. 2022, DPM-Solver++, eq. 8; equivalently ``dx/dt = alpha' D + sigma'
        eps_hat``).  Its solution depends on the schedule only through ``lambda`` at the two ends.
        Two changes of variable make it regular at both ends of the noise range:

        * ``y = x / alpha``, ``s = (sigma / alpha)^2 = e^{-2 lambda}``.  Then ``y = x_0 + sqrt(s) eps``
          is a variance-exploding process and ``dy/ds = (y - D) / (2 s)`` (Karras et al. 2022,
          eq. 4 with ``sigma^2 = s``).  Per component, ``y - E[x_0 | y, k] = s (Sigma_k + s I)^{-1}
          (y - mu_k)``, so

          .. math:: \frac{dy}{ds} = \tfrac12 \sum_k r_k(y, s)\, (\Sigma_k + s I)^{-1} (y - \mu_k)
                    = -\tfrac12 \nabla_y \log p_s(y),

          which is smooth down to ``s = 0`` (clean data) because each ``Sigma_k`` is positive
          definite.  It is integrated in ``u = log(s + c)``, ``c`` = the smallest covariance
          eigenvalue: the linear part of ``dy/du = (s + c) dy/ds`` then has rate at most 1/2 for
          every ``s >= 0`` — not stiff at small ``s`` and not slow at huge ``s``.
        * ``w = x / sigma``, ``tau = alpha / sigma = e^{lambda} = s^{-1/2}``.  Then ``w = tau x_0 +
          eps`` and ``dw/dtau = D(w; alpha = tau, sigma = 1)`` (from ``dy/ds`` with ``y = w /
          tau``), smooth down to ``tau = 0``, i.e. zero SNR (``alpha = 0``), where ``D`` is the
          data mean.  This form is used wherever ``s > 1`` (noise above signal).

        The whole batch is one flattened system solved by ``scipy.integrate.solve_ivp`` (DOP853,
        Hairer et al.) in float64, with the local error norm taken per sample and maximised over
        the batch (scipy's own norm is the RMS over the whole system, which would let single
        samples of a large batch be ~sqrt(B) times less accurate).  ``rtol``/``atol`` act on ``y``
        or ``w``, both of the data's scale; the end-to-end error is of the order of ``rtol``.

        Args:
            x: (B, D) or (B, ...) states at time ``t_from``.
            schedule: the noise schedule whose time ``t_from`` and ``t_to`` are in.
            t_from, t_to: times in ``[t_zero, t_max]``.  Usually ``t_to < t_from`` (denoising; ``t_to``
                may be ``schedule.t_zero``, sigma = 0), but the map is solved in either direction
                (``t_to > t_from`` encodes data into noise).  Zero SNR (``alpha = 0``) is allowed at
                either end.
            rtol, atol: scipy tolerances.

        Returns:
            (B, ...) float64 tensor in ``x``'s shape (on ``x``'s device).
        """
        from scipy.integrate import solve_ivp

        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fewstep.schedules.NoiseSchedule, got {type(schedule).__name__}")
        xf, shape = self._flatten(x)
        xf = xf.detach().cpu()
        t_from, t_to = float(t_from), float(t_to)
        schedule.check_time(t_from, "t_from")
        schedule.check_time(t_to, "t_to")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol!r}, atol={atol!r}")
        out_device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        if t_from == t_to:
            return xf.clone().reshape(shape).to(out_device)

        p = self._params(torch.device("cpu"))
        b, d = xf.shape
        c = self.min_eigenvalue
        lam_from, lam_to = float(schedule.lambda_(t_from)), float(schedule.lambda_(t_to))
        a_from, sg_from = schedule.alpha_sigma(t_from)
        a_to, sg_to = schedule.alpha_sigma(t_to)
        if math.isnan(lam_from) or math.isnan(lam_to):
            raise ValueError(f"the schedule's log-SNR is undefined at t_from={t_from} or t_to={t_to}")
        s_from, s_to = math.exp(-2.0 * lam_from), math.exp(-2.0 * lam_to)  # inf at zero SNR, 0 on clean data
        s_switch = 1.0  # w-form above, y-form below (lambda = 0)

        # Path in s, split where it crosses the switch.
        points = [s_from]
        if min(s_from, s_to) < s_switch < max(s_from, s_to):
            points.append(s_switch)
        points.append(s_to)

        if s_from > s_switch or (s_from == s_switch and s_to > s_switch):
            form, state = "w", (xf / sg_from)
        else:
            form, state = "y", (xf / a_from)
        one_b = torch.ones((), dtype=torch.float64)

        def rhs_y(u: float, yv: np.ndarray) -> np.ndarray:
            e_u = math.exp(u)  # = s + c = ds/du
            s = torch.tensor(max(e_u - c, 0.0), dtype=torch.float64)
            g = self._neg_score64(p, torch.from_numpy(yv).view(b, d), s)
            return g.mul_(0.5 * e_u).numpy().ravel()

        def rhs_w(tau: float, wv: np.ndarray) -> np.ndarray:
            w = torch.from_numpy(wv).view(b, d)
            return self._posterior_mean64(p, w, torch.tensor(tau, dtype=torch.float64), one_b).numpy().ravel()

        for s_a, s_b in zip(points[:-1], points[1:]):
            seg_form = "w" if min(s_a, s_b) >= s_switch else "y"
            if seg_form != form:  # change of variables at s = s_a (finite, positive)
                state = state * math.sqrt(s_a) if form == "w" else state / math.sqrt(s_a)
                form = seg_form
            if form == "w":
                span = (_inv_sqrt(s_a), _inv_sqrt(s_b))
                fun = rhs_w
            else:
                span = (math.log(s_a + c), math.log(s_b + c))
                fun = rhs_y
            if span[0] == span[1]:
                continue
            sol = solve_ivp(fun, span, state.numpy().ravel(), **_dop853_per_sample(b, d, rtol, atol))
            if not sol.success:
                raise RuntimeError(f"the probability-flow ODE solve failed ({sol.message}); try looser rtol/atol")
            state = torch.from_numpy(sol.y[:, -1].copy()).view(b, d)
        out = state * (sg_to if form == "w" else a_to)
        return out.reshape(shape).to(out_device)


def _inv_sqrt(s: float) -> float:
    return 0.0 if math.isinf(s) else 1.0 / math.sqrt(s)


@functools.lru_cache(maxsize=1)
def _block_dop853() -> type | None:
    """scipy's DOP853 with the error norm taken per sample (block of D components) and maximised
    over the batch, instead of the RMS over the whole flattened system, so that ``rtol``/``atol``
    hold for every sample of a batch rather than on average.  ``None`` if this scipy's DOP853 does
    not have the (private) hook this relies on."""
    from scipy.integrate import DOP853

    if not (hasattr(DOP853, "_estimate_error_norm") and hasattr(DOP853, "E5") and hasattr(DOP853, "E3")):
        return None

    class _PerSampleDOP853(DOP853):  # type: ignore[misc, valid-type]
        def __init__(self, fun: Any, t0: float, y0: np.ndarray, t_bound: float, block: int = 1, **kwargs: Any):
            self._block = int(block)
            super().__init__(fun, t0, y0, t_bound, **kwargs)

        def _estimate_error_norm(self, K: np.ndarray, h: float, scale: np.ndarray) -> float:
            # DOP853's blended 5th/3rd-order estimate (Hairer et al., Solving ODEs I, sec. II.10),
            # as scipy computes it, but per block.
            err5 = ((K.T @ self.E5) / scale).reshape(-1, self._block)
            err3 = ((K.T @ self.E3) / scale).reshape(-1, self._block)
            e5 = np.einsum("ij,ij->i", err5, err5)
            e3 = np.einsum("ij,ij->i", err3, err3)
            denom = (e5 + 0.01 * e3) * self._block
            safe = np.where(denom > 0, denom, 1.0)
            return float(np.max(np.where(denom > 0, abs(h) * e5 / np.sqrt(safe), 0.0)))

    return _PerSampleDOP853


def _dop853_per_sample(batch: int, dim: int, rtol: float, atol: float) -> dict[str, Any]:
    """``solve_ivp`` options for a batch of ``batch`` independent ``dim``-dimensional systems."""
    method = _block_dop853()
    if method is None or batch == 1:
        # Fallback: the RMS over B samples is at least the worst sample's RMS / sqrt(B).
        f = math.sqrt(batch)
        return {"method": "DOP853", "rtol": rtol / f, "atol": atol / f}
    return {"method": method, "rtol": rtol, "atol": atol, "block": dim}


# ---------------------------------------------------------------------------------------------
# The denoiser object
# ---------------------------------------------------------------------------------------------


class MixtureDenoiser:
    """``D(x, t) = E[x_0 | x_t = x]`` of a :class:`GaussianMixture`, in ``schedule``'s time.

    ``t`` is a Python float, a 0-d tensor or a (B,) tensor; the result is
    ``mixture.posterior_mean(x, schedule.alpha(t), schedule.sigma(t))`` in ``x``'s dtype.  The
    mixture takes no conditioning, so any keyword argument is a TypeError (a misspelt option is
    never silently ignored).  ``nfe`` counts the calls.
    """

    prediction_type = "sample"

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fewstep.schedules.NoiseSchedule, got {type(schedule).__name__}")
        self.mixture = mixture
        self.schedule = schedule
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: Scalar, **kwargs: Any) -> torch.Tensor:
        if kwargs:
            raise TypeError(
                f"the Gaussian-mixture denoiser takes no conditioning, got unexpected keyword argument(s) "
                f"{', '.join(sorted(kwargs))}; call it as D(x, t)"
            )
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(t, torch.Tensor):
            t = t.detach()
        elif not isinstance(t, (float, int, np.floating, np.integer)) or isinstance(t, bool):
            raise TypeError(f"t must be a float or a tensor, got {type(t).__name__}")
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        self.nfe += 1
        return self.mixture.posterior_mean(x, alpha, sigma)

    def __repr__(self) -> str:
        return f"MixtureDenoiser({self.mixture!r}, {self.schedule!r})"


class MixtureVelocity:
    """The exact flow velocity as a diffusers flow network outputs it: ``net(x, timestep)`` with
    ``timestep = N t`` (``N = num_train_timesteps``, SD3 / Wan / SANA units; pass
    ``timestep_scale=1`` for Flux's ``t``).  Time-independent of any shift: the shift moves a
    scheduler's grid, not the process.  ``nfe`` counts the calls."""

    def __init__(self, mixture: GaussianMixture, num_train_timesteps: int = 1000, timestep_scale: float | None = None):
        self.mixture = mixture
        self.scale = float(timestep_scale) if timestep_scale is not None else float(num_train_timesteps)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, timestep: Scalar, **kwargs: Any) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"the mixture velocity takes no conditioning, got {', '.join(sorted(kwargs))}")
        ts = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().flatten()
        t = ts[0] if ts.numel() == 1 or bool((ts == ts[0]).all()) else ts
        self.nfe += 1
        return self.mixture.flow_velocity(x, t / self.scale)


# ---------------------------------------------------------------------------------------------
# The digits data and shipped fit
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 8.0 - 1.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digits_split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(DIGITS_TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def digits_data(split: str | None = None, *, return_labels: bool = False) -> Any:
    """scikit-learn's 8x8 digits (1797 images, bundled in its wheel) as a float64 (N, 64) tensor,
    pixels scaled from [0, 16] to [-1, 1] (``x / 8 - 1``).

    Args:
        split: ``None`` or ``"all"`` (all 1797), ``"train"`` (1438) or ``"test"`` (359).  The split
            is a fixed permutation (``numpy.random.RandomState(DIGITS_SPLIT_SEED)``, 20% test);
            each part keeps the original order.  The two parts are disjoint and cover the set.
        return_labels: also return the (N,) int64 class labels.
    """
    if split not in (None, "all", "train", "test"):
        raise ValueError(f"split must be None, 'all', 'train' or 'test', got {split!r}")
    x, y = _digits_arrays()
    if split in ("train", "test"):
        train, test = _digits_split_indices(len(x))
        idx = train if split == "train" else test
        x, y = x[idx], y[idx]
    xt = torch.tensor(x, dtype=torch.float64)
    if return_labels:
        return xt, torch.tensor(y, dtype=torch.int64)
    return xt


@functools.lru_cache(maxsize=1)
def _load_digits_npz() -> dict[str, np.ndarray]:
    try:
        res = importlib.resources.files(__package__ or "fewstep.models").joinpath("data").joinpath(_DIGITS_FILE)
        with res.open("rb") as fh:
            with np.load(fh) as data:
                return {k: data[k] for k in data.files}
    except (FileNotFoundError, ModuleNotFoundError, TypeError):
        path = Path(__file__).resolve().parent / "data" / _DIGITS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"the shipped digits mixture {_DIGITS_FILE} is missing from fewstep/models/data; "
                "reinstall fewstep or regenerate it with scripts/fit_digits_gmm.py"
            ) from None
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
