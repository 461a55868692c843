"""Noise schedules and time grids, shared by every sampler, model wrapper and trainer.

A schedule describes the forward process ``x_t = alpha(t) * x_0 + sigma(t) * eps`` in the
schedule's *own* time ``t`` (the value a denoiser receives).  Every schedule exposes

* ``alpha(t)``, ``sigma(t)``, ``log_alpha(t)``, ``log_sigma(t)``;
* the half log-SNR ``lambda_(t) = log alpha(t) - log sigma(t)`` and its inverse ``t_from_lambda``;
* three reference times: ``t_zero`` (clean data, ``sigma = 0``), ``t_min`` (the smallest time a
  network was trained on, ``sigma > 0``) and ``t_max`` (the noisiest time);
* ``model_timestep(t)``: the number a network trained with this schedule expects as timestep;
* ``noise_scale(t)``: the factor applied to standard normal noise to start sampling at ``t``.

All schedule maths runs in float64, whatever the dtype of the network (DESIGN.md).  Methods take
a Python number or a tensor; a number gives back a Python float, a tensor a float64 tensor.

Time grids (:func:`time_grid`) are pure functions of a schedule and a step count.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

TimeLike = Union[float, int, torch.Tensor]

__all__ = [
    "NoiseSchedule",
    "VPDiscrete",
    "VPContinuous",
    "EDM",
    "FlowMatching",
    "VPSigma",
    "TrigFlow",
    "GridRule",
    "from_diffusers",
    "time_grid",
    "SPACINGS",
    "default_spacing",
    "diffusers_betas",
    "diffusers_alphas_cumprod",
]


def _as64(t: TimeLike) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().to(device="cpu", dtype=torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def _back(value: torch.Tensor, like: TimeLike) -> TimeLike:
    """Return a Python float for a Python input, a float64 tensor (on the input's device) otherwise."""
    if isinstance(like, torch.Tensor):
        return value.to(like.device) if like.device.type != "mps" else value
    return float(value)


class NoiseSchedule(ABC):
    """Base class.  Subclasses implement ``_log_alpha``, ``_log_sigma`` and ``_t_from_lambda`` on
    float64 CPU tensors; everything else is derived here."""

    kind: str = "vp"  # "vp", "ve" or "flow"
    t_zero: float
    t_min: float
    t_max: float

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor: ...

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha(t) - self._log_sigma(t)

    def _log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._log_alpha(t), self._log_sigma(t)

    # -- public, derived ----------------------------------------------------------------------
    def log_alpha(self, t: TimeLike) -> TimeLike:
        return _back(self._log_alpha(_as64(t)), t)

    def log_sigma(self, t: TimeLike) -> TimeLike:
        return _back(self._log_sigma(_as64(t)), t)

    def alpha(self, t: TimeLike) -> TimeLike:
        return _back(torch.exp(self._log_alpha(_as64(t))), t)

    def sigma(self, t: TimeLike) -> TimeLike:
        return _back(torch.exp(self._log_sigma(_as64(t))), t)

    def lambda_(self, t: TimeLike) -> TimeLike:
        """Half log-SNR ``log alpha(t) - log sigma(t)``: ``+inf`` at ``t_zero``."""
        return _back(self._lambda(_as64(t)), t)

    def t_from_lambda(self, lam: TimeLike) -> TimeLike:
        """Inverse of :meth:`lambda_` on ``[t_zero, t_max]``."""
        return _back(self._t_from_lambda(_as64(lam)), lam)

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """``(alpha(t), sigma(t))`` as Python floats; the form samplers use for coefficients."""
        la, ls = self._log_alpha_sigma(_as64(t))
        return math.exp(float(la)), math.exp(float(ls))

    def log_alpha_sigma(self, t: TimeLike) -> tuple[TimeLike, TimeLike]:
        """``(log alpha(t), log sigma(t))`` in one evaluation (vectorised over a tensor ``t``)."""
        la, ls = self._log_alpha_sigma(_as64(t))
        return _back(la, t), _back(ls, t)

    def model_timestep(self, t: TimeLike) -> TimeLike:
        """The timestep value a network trained with this schedule expects at time ``t``."""
        return t

    def time_from_model_timestep(self, ts: TimeLike) -> TimeLike:
        """Inverse of :meth:`model_timestep`: the schedule time a network timestep stands for."""
        return ts

    def noise_scale(self, t: float) -> float:
        """Standard deviation given to standard-normal noise to start sampling at time ``t``."""
        return 1.0

    @property
    def zero_terminal_snr(self) -> bool:
        return self.alpha(self.t_max) == 0.0

    def check_time(self, t: float, what: str = "time") -> None:
        lo, hi = min(self.t_zero, self.t_max), max(self.t_zero, self.t_max)
        if not (lo - 1e-9 <= t <= hi + 1e-9):
            raise ValueError(
                f"{what} {t!r} is outside the schedule's time range [{lo}, {hi}] "
                f"({type(self).__name__}: t_zero={self.t_zero} is clean data, t_max={self.t_max} is pure noise)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_args()})"

    def _repr_args(self) -> str:
        return ""

    def config(self) -> dict[str, Any]:
        """Plain-data description; :func:`from_config` rebuilds the schedule from it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be described as plain data")


# ---------------------------------------------------------------------------------------------
# VP, discrete (diffusers' DDPM family)
# ---------------------------------------------------------------------------------------------


def diffusers_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Betas exactly as diffusers' DDPM-family schedulers build them (float32, as the model was
    trained with), for ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` and ``trained_betas``,
    optionally rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1)."""
    n = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta <= 0.999.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}: use 'linear', 'scaled_linear', 'squaredcos_cap_v2' "
            "or pass trained_betas"
        )
    if rescale_betas_zero_snr:
        sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
        sqrt_ab = (sqrt_ab - last) * (first / (first - last))
        ab = sqrt_ab**2
        betas = 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return betas


class VPDiscrete(NoiseSchedule):
    """Variance-preserving schedule of a discrete-time model (DDPM, Stable Diffusion, ...).

    Time ``t`` is the training timestep index, continued to real values: ``t = n`` is
    ``alphas_cumprod[n]`` for ``n = 0 .. N-1``.  Between integers the half log-SNR is linear in
    ``t`` (the convention of k-diffusion and of diffusers' ``_sigma_to_t``).  ``t = -1`` is clean
    data (``alpha = 1``, like DDIM's ``set_alpha_to_one``); on a segment with an infinite log-SNR
    end (``[-1, 0]``, and the last one under zero terminal SNR) ``alphas_cumprod`` is linear
    instead.  ``alphas_cumprod`` are taken as diffusers computes them (float32) and promoted to
    float64 for all later maths.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor):
        if isinstance(alphas_cumprod, torch.Tensor):
            ac = alphas_cumprod.detach().cpu().to(torch.float64)
        else:
            ac = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if not bool(torch.all(ac[1:] < ac[:-1])) or not (0 <= float(ac[-1]) and float(ac[0]) < 1):
            raise ValueError("alphas_cumprod must decrease strictly, within [0, 1)")
        self.alphas_cumprod = ac
        self.num_train_timesteps = len(ac)
        self.t_zero, self.t_min, self.t_max = -1.0, 0.0, float(len(ac) - 1)
        self._knots = torch.arange(-1, len(ac), dtype=torch.float64)
        self._ac = torch.cat([torch.ones(1, dtype=torch.float64), ac])
        self._om = torch.cat([torch.zeros(1, dtype=torch.float64), 1.0 - ac])  # 1 - alphas_cumprod
        self._lam = 0.5 * (torch.log(self._ac) - torch.log(self._om))  # +inf first, maybe -inf last
        self._finite_seg = torch.isfinite(self._lam[:-1]) & torch.isfinite(self._lam[1:])
        self._config: dict[str, Any] = {"type": "vp_discrete", "alphas_cumprod": ac.tolist()}

    @classmethod
    def from_betas(cls, betas: torch.Tensor | Sequence[float]) -> "VPDiscrete":
        """``alphas_cumprod = cumprod(1 - betas)`` in float32, as diffusers computes it."""
        b = torch.as_tensor(betas, dtype=torch.float32)
        ac = torch.cumprod(1.0 - b, dim=0)
        return cls(ac)

    def _seg(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.searchsorted(self._knots, t.contiguous(), right=True) - 1
        idx = idx.clamp(0, len(self._knots) - 2)
        w = t - self._knots[idx]
        return idx, w

    def _lambda(self, t: torch.Tensor) -> torch.Tensor:
        idx, w = self._seg(t)
        with torch.no_grad():
            lam_lin = self._lam[idx] + w * (self._lam[idx + 1] - self._lam[idx])
            ac = self._ac[idx] + w * (self._ac[idx + 1] - self._ac[idx])
            om = self._om[idx] + w * (self._om[idx + 1] - self._om[idx])
            lam_ac = 0.5 * (torch.log(ac) - torch.log(om))
        return torch.where(self._finite_seg[idx], lam_lin, lam_ac)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.logsigmoid(2.0 * self._lambda(t))

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * F.logsigmoid(-2.0 * self._lambda(t))

    def _log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self._lambda(t)
        return 0.5 * F.logsigmoid(2.0 * lam), 0.5 * F.logsigmoid(-2.0 * lam)

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        neg = -self._lam  # increasing along the knots
        idx = torch.searchsorted(neg, (-lam).contiguous(), right=True) - 1
        idx = idx.clamp(0, len(neg) - 2)
        lo, hi = self._lam[idx], self._lam[idx + 1]
        w_lin = (lam - lo) / (hi - lo)
        ac = torch.sigmoid(2.0 * lam)
        w_ac = (ac - self._ac[idx]) / (self._ac[idx + 1] - self._ac[idx])
        w = torch.where(self._finite_seg[idx], w_lin, w_ac).clamp(0.0, 1.0)
        return self._knots[idx] + w

    def _repr_args(self) -> str:
        return f"N={self.num_train_timesteps}, alphas_cumprod[0]={float(self.alphas_cumprod[0]):.6g}, alphas_cumprod[-1]={float(self.alphas_cumprod[-1]):.6g}"

    def config(self) -> dict[str, Any]:
        return dict(self._config)


# ---------------------------------------------------------------------------------------------
# VP, continuous time (Song et al. 2021; Nichol & Dhariwal 2021)
# ---------------------------------------------------------------------------------------------


class VPContinuous(NoiseSchedule):
    """Continuous-time VP schedule on ``t in [0, 1]``.

    * ``linear`` (Song et al. 2021, VP-SDE): ``log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2``.
    * ``cosine`` (Nichol & Dhariwal 2021): ``alpha(t) = cos((t + s)/(1 + s) pi/2) / cos(s/(1 + s) pi/2)``,
      with ``t_max = 0.9946`` as in DPM-Solver to keep ``alpha > 0``.

    ``t_zero = 0``; ``model_timestep(t) = timestep_scale * t``.
    """

    kind = "vp"

    def __init__(
        self,
        kind: Literal["linear", "cosine"] = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        cosine_s: float = 0.008,
        t_min: float = 1e-3,
        t_max: float | None = None,
        timestep_scale: float = 1000.0,
    ):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"VPContinuous kind must be 'linear' or 'cosine', got {kind!r}")
        self.schedule_kind = kind
        self.beta_min, self.beta_max, self.cosine_s = float(beta_min), float(beta_max), float(cosine_s)
        self.t_zero, self.t_min = 0.0, float(t_min)
        self.t_max = float(t_max) if t_max is not None else (1.0 if kind == "linear" else 0.9946)
        self.timestep_scale = float(timestep_scale)
        self._a0 = self.cosine_s / (1 + self.cosine_s) * math.pi / 2
        self._tan0 = math.tan(self._a0)
        if self.schedule_kind == "cosine" and not self.t_max < 1.0:
            raise ValueError(f"the cosine schedule has alpha = 0 at t = 1; t_max must be below 1 (DPM-Solver uses 0.9946), got {self.t_max}")
        if not 0.0 < self.t_min < self.t_max:
            raise ValueError(f"VPContinuous needs 0 < t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")

    def _one_minus_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """``u = 1 - alpha(t) >= 0``, computed without cancellation so that ``u(0) = 0`` exactly
        whatever the rounding of the build's ``cos`` / ``exp`` (a ``log alpha(0)`` of ``+1e-20``
        used to make ``sigma(0)`` NaN).

        * linear: ``u = -expm1(log alpha)`` with ``log alpha = -(beta_max - beta_min) t^2/4 - beta_min t/2``;
        * cosine: with ``a(t) = (t + s)/(1 + s) pi/2 = a_0 + d``, ``alpha = cos(a_0 + d)/cos(a_0)
          = cos d - tan(a_0) sin d``, so ``u = 2 sin^2(d/2) + tan(a_0) sin d``, a sum of
          non-negative terms for ``d in [0, pi/2 - a_0]``."""
        t = t.clamp(min=0.0)
        if self.schedule_kind == "linear":
            return -torch.expm1(-0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)
        d = t / (1 + self.cosine_s) * (math.pi / 2)
        return 2.0 * torch.sin(0.5 * d) ** 2 + self._tan0 * torch.sin(d)

    def _log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._one_minus_alpha(t).clamp(0.0, 1.0)
        # alpha = 1 - u; sigma^2 = 1 - alpha^2 = u (2 - u), both accurate at t = 0 (u = 0 exactly).
        return torch.log1p(-u), 0.5 * (torch.log(u) + torch.log(2.0 - u))

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha_sigma(t)[0]

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha_sigma(t)[1]

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda); u = 1 - alpha = sigma^2 / (1 + alpha), free of cancellation.
        alpha = torch.exp(0.5 * F.logsigmoid(2.0 * lam))
        u = torch.sigmoid(-2.0 * lam) / (1.0 + alpha)
        if self.schedule_kind == "linear":
            # Solve a t^2 + b t = L with L = -log alpha = -log1p(-u) >= 0, in the cancellation-free form.
            a, b, L = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min, -torch.log1p(-u)
            t = 2 * L / (b + torch.sqrt(b * b + 4 * a * L))
        else:
            # cos(a) = alpha cos(a_0) with a = a_0 + d.  Then sin(a)^2 = sigma^2 + alpha^2 sin(a_0)^2 and
            # sin(a) - alpha sin(a_0) = sigma^2 / (sin(a) + alpha sin(a_0)), so d = atan2(sin(a - a_0), cos(a - a_0))
            # is evaluated without the cancellation of arccos(alpha cos a_0) - a_0 near t = 0.
            sig2 = torch.sigmoid(-2.0 * lam)
            c0, s0 = math.cos(self._a0), math.sin(self._a0)
            sin_a = torch.sqrt(sig2 + (alpha * s0) ** 2)
            d = torch.atan2(c0 * sig2 / (sin_a + alpha * s0), alpha * c0 * c0 + sin_a * s0)
            t = d * 2 * (1 + self.cosine_s) / math.pi
        # lambda = +inf is t = 0 exactly; lambda = -inf (below the schedule's range) is t_max.
        t = torch.where(lam == -math.inf, torch.full_like(t, self.t_max), t.clamp(0.0, self.t_max))
        return torch.where(u == 0, torch.zeros_like(t), t)

    def model_timestep(self, t: TimeLike) -> TimeLike:
        return t * self.timestep_scale

    def time_from_model_timestep(self, ts: TimeLike) -> TimeLike:
        return ts / self.timestep_scale

    def _repr_args(self) -> str:
        return f"{self.schedule_kind!r}"

    def config(self) -> dict[str, Any]:
        return {
            "type": "vp_continuous",
            "kind": self.schedule_kind,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "cosine_s": self.cosine_s,
            "t_min": self.t_min,
            "t_max": self.t_max,
            "timestep_scale": self.timestep_scale,
        }


# ---------------------------------------------------------------------------------------------
# VE / EDM (Karras et al. 2022)
# ---------------------------------------------------------------------------------------------


class EDM(NoiseSchedule):
    """Variance-exploding schedule in the EDM parameterisation (Karras et al. 2022): ``alpha = 1``,
    ``sigma(t) = t``, so the time *is* the noise level.  ``t_zero = 0``; sampling starts from
    ``sigma_max * noise``.

    ``precondition`` names the network's noise conditioning ``c_noise`` (what it is fed as
    timestep), for networks trained with EDM's preconditioning (the paper's Table 1):

    * ``None``: the network receives ``sigma`` itself;
    * ``"edm"``: ``c_noise = ln(sigma) / 4`` (Karras et al. 2022, Table 1; diffusers'
      ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``, Playground v2.5);
    * ``"cosine"``: ``c_noise = atan(sigma) 2 / pi`` (diffusers' ``CosineDPMSolverMultistepScheduler``,
      Stable Audio Open).

    The input and output scalings ``c_in``, ``c_skip``, ``c_out`` that go with it (they involve the
    prediction type) live in :class:`fewstep.models.prediction.EDMPreconditioning`.
    """

    kind = "ve"
    PRECONDITIONS = (None, "edm", "cosine")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, precondition: str | None = None):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if precondition not in self.PRECONDITIONS:
            raise ValueError(f"EDM precondition must be None, 'edm' (c_noise = ln(sigma)/4) or 'cosine' (atan(sigma) 2/pi), got {precondition!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.precondition = precondition
        self.t_zero, self.t_min, self.t_max = 0.0, self.sigma_min, self.sigma_max

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(t)

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(t.clamp(min=0.0))  # check_time admits -1e-9: that is clean data

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam)

    def noise_scale(self, t: float) -> float:
        return float(t)

    def model_timestep(self, t: TimeLike) -> TimeLike:
        if self.precondition is None:
            return t
        tt = _as64(t)
        if self.precondition == "edm":
            c = 0.25 * torch.log(tt)
        else:
            c = torch.atan(tt) * (2.0 / math.pi)
        return _back(c, t)

    def time_from_model_timestep(self, c: TimeLike) -> TimeLike:
        if self.precondition is None:
            return c
        cc = _as64(c)
        return _back(torch.exp(4.0 * cc) if self.precondition == "edm" else torch.tan(cc * (math.pi / 2.0)), c)

    def _repr_args(self) -> str:
        extra = f", precondition={self.precondition!r}" if self.precondition else ""
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}{extra}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}
        if self.precondition is not None:
            cfg["precondition"] = self.precondition
        return cfg


class VPSigma(NoiseSchedule):
    """A variance-preserving model indexed by its EDM noise level ``t = sigma / alpha``:
    ``alpha = 1 / sqrt(1 + t^2)``, ``sigma = t / sqrt(1 + t^2)``, ``lambda = -ln t``, on
    ``[sigma_min, sigma_max]`` (``t_zero = 0``).  The network receives ``c_noise = ln(t) / 4``
    (Karras et al. 2022, Table 1) and the VP state ``x = alpha x_0 + sigma eps``.

    This is diffusers' ``EulerDiscreteScheduler(timestep_type="continuous",
    prediction_type="v_prediction")`` (Stable Video Diffusion): it works in ``y = x / alpha``
    with ``c_in = 1 / sqrt(t^2 + 1)`` and feeds the network ``0.25 ln(t)``; ``c_in y`` is the VP
    state, so in VP coordinates the input needs no scaling, and epsilon / v predictions convert
    exactly as for any VP schedule.
    """

    kind = "vp"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 700.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VPSigma needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_zero, self.t_min, self.t_max = 0.0, self.sigma_min, self.sigma_max

    def _log_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.clamp(min=0.0)
        la = -0.5 * torch.log1p(t * t)
        return la, la + torch.log(t)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha_sigma(t)[0]

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_alpha_sigma(t)[1]

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam)

    def model_timestep(self, t: TimeLike) -> TimeLike:
        return _back(0.25 * torch.log(_as64(t)), t)

    def time_from_model_timestep(self, c: TimeLike) -> TimeLike:
        return _back(torch.exp(4.0 * _as64(c)), c)

    def _repr_args(self) -> str:
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"

    def config(self) -> dict[str, Any]:
        return {"type": "vp_sigma", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


# ---------------------------------------------------------------------------------------------
# Rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024)
# ---------------------------------------------------------------------------------------------


class FlowMatching(NoiseSchedule):
    """Rectified-flow schedule ``alpha = 1 - t``, ``sigma = t`` on ``t in [0, 1]``.

    ``shift`` is the resolution shift of SD3 (Esser et al. 2024, eq. 23):
    ``t' = shift t / (1 + (shift - 1) t)``, which lowers the half log-SNR by ``log shift``.  It
    does not change the process, only where the default grid (``spacing="shifted"``) puts its
    steps.  ``model_timestep(t) = num_train_timesteps * t`` as in diffusers' flow pipelines.
    """

    kind = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, t_min: float | None = None):
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.t_zero, self.t_max = 0.0, 1.0
        self.t_min = float(t_min) if t_min is not None else 1.0 / self.num_train_timesteps

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t.clamp(0.0, 1.0))  # check_time admits 1e-9 past either end

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(t.clamp(0.0, 1.0))

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-lam)

    def model_timestep(self, t: TimeLike) -> TimeLike:
        return t * self.num_train_timesteps

    def noise_scale(self, t: float) -> float:
        return float(t)

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        """``shift t / (1 + (shift - 1) t)`` (SD3's resolution shift)."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def unshift_time(self, t: float) -> float:
        """Inverse of :meth:`shift_time`: ``t / (shift - (shift - 1) t)``."""
        return t / (self.shift - (self.shift - 1) * t)

    def time_from_model_timestep(self, ts: TimeLike) -> TimeLike:
        return ts / self.num_train_timesteps

    def with_shift(self, shift: float) -> "FlowMatching":
        """The same process with another resolution shift (it moves only the default grid)."""
        return FlowMatching(shift, self.num_train_timesteps, self.t_min)

    @staticmethod
    def dynamic_shift(mu: float, time_shift_type: str = "exponential") -> float:
        """The shift of Flux's resolution-dependent time shift for the ``mu`` a pipeline computes
        from the image sequence length: ``e^mu / (e^mu + 1/t - 1)`` is :meth:`shift_time` with
        ``shift = e^mu`` (``time_shift_type="exponential"``, Flux / SD3 with dynamic shifting);
        ``mu / (mu + 1/t - 1)`` with ``shift = mu`` (``"linear"``)."""
        mu = float(mu)
        if not math.isfinite(mu):
            raise ValueError(f"mu must be finite, got {mu}")
        if time_shift_type == "exponential":
            return math.exp(mu)
        if time_shift_type == "linear":
            if mu <= 0:
                raise ValueError(f"a linear time shift needs mu > 0, got {mu}")
            return mu
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}")

    def _repr_args(self) -> str:
        return f"shift={self.shift}"

    def config(self) -> dict[str, Any]:
        return {"type": "flow", "shift": self.shift, "num_train_timesteps": self.num_train_timesteps, "t_min": self.t_min}


# ---------------------------------------------------------------------------------------------
# TrigFlow (Lu & Song 2024, sCM, sec. 2.2)
# ---------------------------------------------------------------------------------------------


class TrigFlow(NoiseSchedule):
    """TrigFlow, the schedule of continuous-time consistency models (Lu & Song 2024, "Simplifying,
    Stabilizing and Scaling Continuous-Time Consistency Models", sec. 2.2, eq. 3):
    ``x_t = cos(t) x_0 + sin(t) z`` with ``z ~ N(0, sigma_d^2 I)``, so ``alpha = cos t`` and
    ``sigma = sigma_d sin t`` on ``t in [0, pi/2]``.  The network receives ``t`` itself (diffusers'
    ``SCMScheduler`` timesteps) and sampling starts from ``sigma_d`` times standard noise.
    :mod:`fewstep.trigflow` maps any other schedule onto it by log-SNR."""

    kind = "vp"

    def __init__(self, sigma_data: float = 0.5, t_min: float = 1e-4):
        if not sigma_data > 0:
            raise ValueError(f"TrigFlow needs sigma_data > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.t_zero, self.t_min, self.t_max = 0.0, float(t_min), math.pi / 2

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.cos(t.clamp(0.0, math.pi / 2)))

    def _log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return math.log(self.sigma_data) + torch.log(torch.sin(t.clamp(0.0, math.pi / 2)))

    def _t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        # tan t = sigma / (sigma_d alpha) = exp(-lambda) / sigma_d
        return torch.atan2(torch.exp(-lam), torch.full_like(lam, self.sigma_data))

    def noise_scale(self, t: float) -> float:
        return self.sigma_data * math.sin(float(t))

    def _repr_args(self) -> str:
        return f"sigma_data={self.sigma_data}"

    def config(self) -> dict[str, Any]:
        return {"type": "trigflow", "sigma_data": self.sigma_data, "t_min": self.t_min}


# ---------------------------------------------------------------------------------------------
# Construction from diffusers and from plain data
# ---------------------------------------------------------------------------------------------

def diffusers_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
    snr_shift_scale: float | None = None,
) -> torch.Tensor:
    """``alphas_cumprod`` (float32) exactly as diffusers' DDPM-family schedulers build them.

    ``snr_shift_scale`` is CogVideoX's SNR shift (``CogVideoXDDIMScheduler`` /
    ``CogVideoXDPMScheduler``, "following SD3", Esser et al. 2024 eq. 23 applied to the SNR):
    ``alphas_cumprod / (s + (1 - s) alphas_cumprod)``, which divides the SNR by ``s``; those
    schedulers rescale to zero terminal SNR *after* the shift, on ``alphas_cumprod``, and build
    ``scaled_linear`` betas in float64 (so the whole chain is float64 there, as in diffusers)."""
    if snr_shift_scale is None:
        return torch.cumprod(
            1.0 - diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr),
            dim=0,
        )
    s = float(snr_shift_scale)
    if not s > 0:
        raise ValueError(f"snr_shift_scale must be positive, got {snr_shift_scale}")
    if trained_betas is None and beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, int(num_train_timesteps), dtype=torch.float64) ** 2
    else:
        betas = diffusers_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False)
    ac = torch.cumprod(1.0 - betas, dim=0)
    ac = ac / (s + (1 - s) * ac)
    if rescale_betas_zero_snr:  # Lin et al. 2024, Algorithm 1, on sqrt(alphas_cumprod)
        root = ac.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        ac = root**2
    return ac


def from_diffusers(config_or_scheduler: Any) -> NoiseSchedule:
    """The schedule a diffusers model was trained with, from a scheduler or its config.

    Every key of the config is read by :func:`fewstep.diffusers_config.read_config`, which knows
    each key of each diffusers scheduler (a key it does not know, or one it cannot honour, is a
    ``ValueError`` naming it):

    * DDPM-family configs give :class:`VPDiscrete` with ``alphas_cumprod`` identical to diffusers'
      (``snr_shift_scale`` and zero-terminal-SNR rescaling included); a scheduler object's own
      ``alphas_cumprod`` are used as they are (except the ``2**-24`` clamp some schedulers put on
      a zero terminal SNR, which is undone); ``timestep_type="continuous"`` with
      ``v_prediction`` gives :class:`VPSigma`;
    * flow-matching configs (``FlowMatch*``, or ``use_flow_sigmas=True`` with ``flow_shift``) give
      :class:`FlowMatching`;
    * EDM configs (``EDMEuler``, ``EDMDPMSolverMultistep``, ``CosineDPMSolverMultistep``) give
      :class:`EDM` with their ``sigma_data`` and noise preconditioning.
    """
    from fewstep.diffusers_config import read_config

    return read_config(config_or_scheduler).schedule


def from_config(cfg: Mapping[str, Any]) -> NoiseSchedule:
    """Inverse of :meth:`NoiseSchedule.config`."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "vp_discrete":
        return VPDiscrete(cfg["alphas_cumprod"])
    if kind == "vp_continuous":
        return VPContinuous(**cfg)
    if kind == "edm":
        return EDM(**cfg)
    if kind == "flow":
        return FlowMatching(**cfg)
    if kind == "vp_sigma":
        return VPSigma(**cfg)
    if kind == "trigflow":
        return TrigFlow(**cfg)
    raise ValueError(f"unknown schedule type {kind!r} in config; expected vp_discrete, vp_continuous, vp_sigma, edm, flow or trigflow")


# ---------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------

SPACINGS = (
    "time_uniform", "time_quadratic", "logsnr", "karras", "shifted", "linspace", "leading", "trailing",
    # k-diffusion's sigma spacings
    "exponential", "polyexponential", "vp",
    # ComfyUI's schedulers on the model's sigma table
    "simple", "normal", "sgm_uniform", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal",
    # published optimised tables (fewstep/step_tables.py)
    "ays_sd15", "ays_sdxl", "ays_svd", "gits_sd15",
)

# Parameters of the spacings that take any, with their defaults (k-diffusion's / ComfyUI's).  Pass
# others as a mapping: ``spacing={"name": "beta", "alpha": 0.5, "beta": 0.7}``.
SPACING_PARAMS: dict[str, dict[str, Any]] = {
    "karras": {"rho": 7.0},
    "polyexponential": {"rho": 1.0},
    "vp": {"beta_d": 19.9, "beta_min": 0.1, "eps_s": 1e-3},
    "beta": {"alpha": 0.6, "beta": 0.6},
    "linear_quadratic": {"threshold_noise": 0.025, "linear_steps": None},
}


class GridRule:
    """A spacing given as a rule: ``rule(num_steps)`` returns ``num_steps + 1`` decreasing times
    that end at ``end_time``, for whatever number of steps a sampler needs for its budget.

    ``FewstepScheduler`` uses it for grids that come from outside fewstep: the grid of the
    diffusers scheduler it replaces (``spacing="diffusers"``), or the ``sigmas=`` a pipeline
    passes (Flux always does), resampled to the sampler's step count."""

    def __init__(self, make: Any, end_time: float, name: str = "rule"):
        self.make = make
        self.end_time = float(end_time)
        self.name = name

    def __call__(self, num_steps: int) -> torch.Tensor:
        grid = torch.as_tensor(self.make(int(num_steps)), dtype=torch.float64).flatten()
        if len(grid) != num_steps + 1:
            raise ValueError(f"the {self.name} grid has {len(grid)} times for {num_steps} steps; it needs {num_steps + 1}")
        return grid

    def __repr__(self) -> str:
        return f"GridRule({self.name!r}, end_time={self.end_time})"


Spacing = Union[str, Mapping[str, Any], Sequence[float], torch.Tensor, np.ndarray, GridRule]


def is_explicit_grid(spacing: Spacing) -> bool:
    """Whether ``spacing`` is a list of times (not a spacing name, a ``{"name": ...}`` mapping or a
    :class:`GridRule`)."""
    return not isinstance(spacing, (str, Mapping, GridRule))


def k_sigma(schedule: NoiseSchedule, t: TimeLike) -> TimeLike:
    """The noise level k-diffusion, ComfyUI and A1111 call ``sigma`` for a model of this schedule:
    ``sigma / alpha = exp(-lambda)`` for VP schedules (their samplers run VP models in the
    variance-exploding form ``x / alpha``), the time itself for EDM (``t = sigma``) and for flow
    matching (ComfyUI's ``CONST`` models use ``sigma = t``)."""
    if schedule.kind in ("ve", "flow"):
        return _back(_as64(t), t)
    return _back(torch.exp(-schedule._lambda(_as64(t))), t)


def time_of_k_sigma(schedule: NoiseSchedule, ks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`k_sigma` (float64 tensor in, float64 tensor out)."""
    ks = torch.as_tensor(ks, dtype=torch.float64)
    if schedule.kind in ("ve", "flow"):
        return ks.clone()
    return schedule._t_from_lambda(-torch.log(ks))


def default_spacing(schedule: NoiseSchedule) -> str:
    """The spacing used when the caller gives none.

    * VP (discrete or continuous): ``time_quadratic``.  On the exact digits mixture under DDPM's
      linear schedule it gave the lowest error at NFE 5 and 10 for DDIM, DPM-Solver++ 2M/3M/2S and
      DEIS (`benchmarks/RESULTS.md`, "default grid"); uniform log-SNR wastes the last evaluation at
      ``t_min`` when the grid ends on clean data, uniform time spends too few steps at low noise.
    * VE / EDM: ``karras`` (rho = 7), the EDM paper's choice.
    * Flow matching: ``shifted`` (uniform time under the model's resolution shift, as SD3 samples).
    """
    if isinstance(schedule, EDM):
        return "karras"
    if isinstance(schedule, FlowMatching):
        return "shifted"
    return "time_quadratic"


def _end_time(schedule: NoiseSchedule, end: str) -> float:
    if end == "zero":
        return schedule.t_zero
    if end == "min":
        return schedule.t_min
    raise ValueError(f"end must be 'zero' (finish on clean data) or 'min' (finish at t_min), got {end!r}")


def time_grid(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: Spacing = "logsnr",
    *,
    end: Literal["zero", "min"] = "zero",
    t_start: float | None = None,
    rho: float | None = None,
    steps_offset: int = 0,
) -> torch.Tensor:
    """A strictly decreasing float64 grid of ``num_steps + 1`` times from ``t_start`` (default
    ``t_max``) to the end (``t_zero`` for ``end="zero"``, ``t_min`` for ``end="min"``): a pure
    function of the schedule and the step count.

    Spacings (``sigma`` below is the k-diffusion noise level :func:`k_sigma`: ``sigma/alpha`` for VP,
    the time for EDM and flow):

    * ``"time_uniform"``: uniform in ``t`` on ``[t_start, t_min]``.
    * ``"time_quadratic"``: uniform in ``sqrt(t - t_min)`` (DPM-Solver's ``time_quadratic``).
    * ``"logsnr"``: uniform half log-SNR ``lambda`` (DPM-Solver, Lu et al. 2022, sec. 3.3).
    * ``"karras"``: ``sigma`` uniform in its ``1/rho`` power (EDM, Karras et al. 2022, eq. 5; rho = 7).
    * ``"exponential"`` / ``"polyexponential"``: ``log sigma`` uniform / uniform in ``ramp**rho``
      (k-diffusion's ``get_sigmas_exponential`` / ``get_sigmas_polyexponential``, rho = 1).
    * ``"vp"``: k-diffusion's ``get_sigmas_vp``, the sigmas of the continuous VP-linear SDE at
      uniform times from 1 to ``eps_s`` (beta_d = 19.9, beta_min = 0.1, eps_s = 1e-3); they must lie
      in the schedule's range.
    * ``"kl_optimal"``: ``atan sigma`` uniform (Sabour et al. 2024, AYS, the schedule that is
      KL-optimal for Gaussian data; ComfyUI's / A1111's ``kl_optimal``).
    * ComfyUI's schedulers on the model's discrete sigma table (see :func:`_comfy_table`):
      ``"simple"``, ``"normal"``, ``"sgm_uniform"``, ``"ddim_uniform"``, ``"beta"`` (Lee et al. 2024,
      "Beta sampling is all you need", alpha = beta = 0.6), ``"linear_quadratic"`` (Genmo's Mochi
      schedule, threshold_noise 0.025).  These end on clean data (``end="zero"``) from ``t_max``.
    * ``"ays_sd15"``, ``"ays_sdxl"``, ``"ays_svd"``, ``"gits_sd15"``: the published optimised tables
      (:mod:`fewstep.step_tables`), log-linearly interpolated to other step counts; they apply to
      schedules whose sigma range is the table's (SD 1.5 / SDXL: 14.61 to 0.0292, SVD: 700 to 0.002).
    * ``"shifted"``: uniform time warped by a flow schedule's resolution shift (SD3).
    * ``"linspace"`` / ``"leading"`` / ``"trailing"``: diffusers' integer timesteps for discrete
      schedules (as in ``DPMSolverMultistepScheduler``; Lin et al. 2024, Table 2).
    * a mapping ``{"name": ..., **parameters}``: a spacing with other parameters (``SPACING_PARAMS``).
    * a sequence of ``num_steps + 1`` decreasing times: used as given.
    * a :class:`GridRule`: its times for ``num_steps`` steps (``end`` and ``t_start`` are the rule's).

    For the sigma spacings and ``logsnr`` with ``end="zero"``, the first ``num_steps`` points span
    ``[t_start, t_min]`` and the grid finishes with a jump to ``t_zero`` (the k-diffusion / diffusers
    convention).  The time spacings place ``num_steps + 1`` points on ``[t_start, t_min]`` and move
    the last one to the end, so every evaluation time is a time the network was trained on and no
    evaluation is spent at ``t_min``.  A spacing whose rule cannot give ``num_steps`` steps here
    (ComfyUI's ``ddim_uniform`` and ``beta`` merge or add steps at some counts) is a ``ValueError``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    n = int(num_steps)
    t_hi = schedule.t_max if t_start is None else float(t_start)
    schedule.check_time(t_hi, "t_start")
    t_end = _end_time(schedule, end)

    if isinstance(spacing, GridRule):
        grid = spacing(n)
        _validate_grid(schedule, grid)
        return grid
    if is_explicit_grid(spacing):
        if isinstance(spacing, torch.Tensor):
            grid = spacing.detach().cpu().to(torch.float64).flatten()
        else:
            grid = torch.as_tensor(np.asarray(spacing, dtype=np.float64)).flatten()
        if len(grid) != n + 1:
            raise ValueError(f"a time grid for {n} steps needs {n + 1} times, got {len(grid)}")
        _validate_grid(schedule, grid)
        return grid

    name, params = _spacing_params(spacing, rho)
    if name in ("time_uniform", "time_quadratic", "shifted"):
        # Spaced on [t_start, t_min], so no interior time falls below what the network was trained
        # on; the last point is then moved to the end (clean data for end="zero").
        lo = schedule.t_min
        if name == "time_uniform":
            grid = torch.linspace(t_hi, lo, n + 1, dtype=torch.float64)
        elif name == "time_quadratic":
            grid = lo + torch.linspace(math.sqrt(t_hi - lo), 0.0, n + 1, dtype=torch.float64) ** 2
        else:
            if not isinstance(schedule, FlowMatching):
                raise ValueError("spacing='shifted' applies a flow-matching schedule's resolution shift; this schedule is " + type(schedule).__name__)
            # uniform in the unshifted time, mapped through the shift: the endpoints stay put
            grid = schedule.shift_time(torch.linspace(schedule.unshift_time(t_hi), schedule.unshift_time(lo), n + 1, dtype=torch.float64))
        grid[0], grid[-1] = t_hi, t_end
    elif name == "logsnr":
        lam_hi, lam_lo = schedule.lambda_(t_hi), schedule.lambda_(schedule.t_min)
        _check_finite_start(schedule, name, t_hi, lam_hi)
        grid = schedule._t_from_lambda(torch.linspace(lam_hi, lam_lo, n if end == "zero" else n + 1, dtype=torch.float64))
        grid = _finish(schedule, grid, t_hi, end)
    elif name in _SIGMA_FORMULAS:
        ks_hi, ks_lo = float(k_sigma(schedule, t_hi)), float(k_sigma(schedule, schedule.t_min))
        _check_finite_start(schedule, name, t_hi, -math.log(ks_hi) if ks_hi > 0 else math.inf)
        ks = _SIGMA_FORMULAS[name](n if end == "zero" else n + 1, ks_lo, ks_hi, **params)
        if name == "vp":
            _check_table_range(schedule, name, ks, t_hi)
        grid = _finish(schedule, time_of_k_sigma(schedule, ks), t_hi, end, keep_first=name == "vp")
    elif name in _COMFY_TABLE_SPACINGS:
        _check_full_run(schedule, name, t_start, end)
        grid = _comfy_spacing(schedule, n, name, params)
    elif name.startswith(("ays_", "gits_")):
        grid = _published_table(schedule, n, name, t_start, end)
    else:
        if t_start is not None and float(t_start) != schedule.t_max:
            raise ValueError(
                f"spacing={name!r} is diffusers' fixed integer spacing from the last training timestep; "
                "it cannot start at t_start: use 'time_uniform', 'time_quadratic', 'logsnr' or an explicit grid"
            )
        grid = _diffusers_spacing(schedule, n, name, steps_offset, t_end)
    _validate_grid(schedule, grid)
    return grid


def _spacing_params(spacing: str | Mapping[str, Any], rho: float | None) -> tuple[str, dict[str, Any]]:
    """The spacing's name and its parameters (defaults from ``SPACING_PARAMS`` updated by a
    mapping's entries and by ``rho=``); unknown names and parameters are errors."""
    if isinstance(spacing, Mapping):
        given = dict(spacing)
        name = given.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a spacing mapping needs a 'name' entry naming the spacing, got {dict(spacing)!r}")
    else:
        name, given = spacing, {}
    if name not in SPACINGS:
        from fewstep._util import close_matches

        raise ValueError(f"unknown spacing {name!r}{close_matches(name, SPACINGS)}; choose from {', '.join(SPACINGS)} or pass a list of times")
    params = dict(SPACING_PARAMS.get(name, {}))
    if rho is not None:
        given.setdefault("rho", rho)
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise TypeError(
            f"spacing {name!r} has no parameter {unknown[0]!r}; "
            + (f"its parameters are {', '.join(params)}" if params else "it takes none")
        )
    params.update(given)
    return name, params


def _check_finite_start(schedule: NoiseSchedule, name: str, t_hi: float, lam_hi: float) -> None:
    if not math.isfinite(lam_hi):
        raise ValueError(
            f"spacing={name!r} needs a finite log-SNR at the start, but the schedule has zero SNR at t={t_hi}; "
            "use spacing='time_uniform' or 'trailing' (zero-terminal-SNR models start from pure noise)"
        )


def _finish(schedule: NoiseSchedule, grid: torch.Tensor, t_hi: float, end: str, keep_first: bool = False) -> torch.Tensor:
    """Pin a grid of points on ``[t_start, t_min]`` to its exact ends: the first to ``t_start``, and
    either a final jump to clean data (``end="zero"``) or the last point to ``t_min``."""
    grid = grid.clone()
    if not keep_first:
        grid[0] = t_hi
    if end == "zero":
        return torch.cat([grid, torch.tensor([schedule.t_zero], dtype=torch.float64)])
    grid[-1] = schedule.t_min
    return grid


def _karras(m: int, lo: float, hi: float, rho: float) -> torch.Tensor:
    """EDM's sigmas (Karras et al. 2022, eq. 5): ``(hi^(1/rho) + i/(m-1) (lo^(1/rho) - hi^(1/rho)))^rho``."""
    ramp = torch.linspace(0, 1, m, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(m: int, lo: float, hi: float) -> torch.Tensor:
    """``log sigma`` uniform from ``hi`` to ``lo`` (k-diffusion's ``get_sigmas_exponential``)."""
    return torch.linspace(math.log(hi), math.log(lo), m, dtype=torch.float64).exp()


def _polyexponential(m: int, lo: float, hi: float, rho: float) -> torch.Tensor:
    """``log sigma = log lo + ramp^rho (log hi - log lo)``, ramp from 1 to 0 (k-diffusion's
    ``get_sigmas_polyexponential``; rho = 1 is ``exponential``)."""
    ramp = torch.linspace(1, 0, m, dtype=torch.float64) ** rho
    return torch.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo))


def _vp_sigmas(m: int, lo: float, hi: float, beta_d: float, beta_min: float, eps_s: float) -> torch.Tensor:
    """k-diffusion's ``get_sigmas_vp``: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` at
    ``t`` uniform from 1 to ``eps_s`` (the VP-linear SDE of Song et al. 2021); absolute levels, not
    scaled to the schedule's range."""
    t = torch.linspace(1, eps_s, m, dtype=torch.float64)
    return torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t))


def _kl_optimal(m: int, lo: float, hi: float) -> torch.Tensor:
    """``tan`` of ``atan sigma`` uniform from ``hi`` to ``lo`` (the KL-optimal schedule for Gaussian
    data, Sabour et al. 2024, AYS, sec. 3; AUTOMATIC1111 pull request 15608, ComfyUI's
    ``kl_optimal``).  One point is ``hi``."""
    if m == 1:
        return torch.tensor([hi], dtype=torch.float64)
    w = torch.arange(m, dtype=torch.float64) / (m - 1)
    return torch.tan(w * math.atan(lo) + (1 - w) * math.atan(hi))


_SIGMA_FORMULAS = {
    "karras": _karras, "exponential": _exponential, "polyexponential": _polyexponential, "vp": _vp_sigmas,
    "kl_optimal": _kl_optimal,
}


def _check_table_range(schedule: NoiseSchedule, name: str, ks: torch.Tensor, t_hi: float) -> None:
    """Absolute sigma levels must lie in the schedule's range ``[sigma(t_min), sigma(t_start)]``."""
    hi, lo = float(k_sigma(schedule, t_hi)), float(k_sigma(schedule, schedule.t_min))
    tol = 1e-9 * hi
    if float(ks.max()) > hi + tol or float(ks.min()) < lo - 1e-9 * lo:
        raise ValueError(
            f"spacing={name!r} puts sigma levels from {float(ks.max()):.6g} to {float(ks.min()):.6g}, outside this "
            f"schedule's range {hi:.6g} to {lo:.6g} (k-diffusion sigma = sigma/alpha for VP, the time for EDM and flow); "
            "it is meant for another model"
        )


def _check_full_run(schedule: NoiseSchedule, name: str, t_start: float | None, end: str) -> None:
    if t_start is not None and float(t_start) != schedule.t_max:
        raise ValueError(f"spacing={name!r} is ComfyUI's schedule of a whole run from t_max; it cannot start at t_start={t_start}")
    if end != "zero":
        raise ValueError(f"spacing={name!r} is ComfyUI's schedule, which ends on clean data (sigma = 0); use end='zero'")


def _comfy_table(schedule: NoiseSchedule) -> tuple[np.ndarray, Any, Any]:
    """The model-sampling of ComfyUI (``comfy/model_sampling.py``) for a model of this schedule, in
    fewstep times: ``(table, timestep, time)`` with ``table`` the increasing times of the model's
    sigma table, ``timestep(t)`` ComfyUI's ``model_sampling.timestep(sigma)`` and ``time(ts)`` the
    time of ``model_sampling.sigma(ts)``.

    * ``VPDiscrete`` (ComfyUI's ``ModelSamplingDiscrete``): the table is every training timestep
      ``0 .. N-1``; ComfyUI's timestep is the index and its ``sigma(ts)`` interpolates ``log sigma``
      linearly between indices, which is fewstep's time (log-SNR linear between integers).
    * ``EDM`` (``ModelSamplingContinuousEDM``): 1000 log-uniform sigmas on ``[sigma_min, sigma_max]``;
      ``timestep = log(sigma) / 4``.
    * ``FlowMatching`` (``ModelSamplingDiscreteFlow``, SD3): ``t_k = shift(k / N)``, ``k = 1 .. N``;
      ``timestep = N sigma`` and ``sigma(ts) = shift(ts / N)`` (ComfyUI's two maps are not inverse
      when ``shift != 1``; both are followed).  ComfyUI's smallest level is ``shift(1 / N)``:
      build ``FlowMatching(shift, t_min=shift(1/N))`` to match its ``sigma_min`` in the other spacings.
    """
    if isinstance(schedule, VPDiscrete):
        return np.arange(schedule.num_train_timesteps, dtype=np.float64), (lambda t: t), (lambda ts: ts)
    if isinstance(schedule, EDM):
        table = np.exp(np.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max), 1000))
        return table, (lambda t: 0.25 * np.log(t)), (lambda ts: np.exp(4.0 * ts))
    if isinstance(schedule, FlowMatching):
        n = schedule.num_train_timesteps
        shift = lambda u: schedule.shift * u / (1 + (schedule.shift - 1) * u)  # noqa: E731
        return shift(np.arange(1, n + 1, dtype=np.float64) / n), (lambda t: t * n), (lambda ts: shift(ts / n))
    raise ValueError(
        f"ComfyUI's schedulers are defined on a model's discrete sigma table, which {type(schedule).__name__} has not; "
        "use time_uniform (sgm_uniform's rule), time_quadratic, logsnr or karras"
    )


_COMFY_TABLE_SPACINGS = ("simple", "normal", "sgm_uniform", "ddim_uniform", "beta", "linear_quadratic")


def _comfy_spacing(schedule: NoiseSchedule, n: int, name: str, params: Mapping[str, Any]) -> torch.Tensor:
    """ComfyUI's schedulers (``comfy/samplers.py``), written in fewstep times, then clean data."""
    table, timestep, time = _comfy_table(schedule)
    big_n = len(table)
    if name == "simple":  # every (N/n)-th table entry from the top
        ts = [table[big_n - 1 - int(x * (big_n / n))] for x in range(n)]
    elif name == "ddim_uniform":  # every (N // n)-th entry from index 1 up
        ts = list(table[1::max(big_n // n, 1)][::-1])
    elif name in ("normal", "sgm_uniform"):  # uniform in the model's timestep
        u = np.linspace(timestep(table[-1]), timestep(table[0]), n + 1 if name == "sgm_uniform" else n)
        ts = list(time(u[:n]))
    elif name == "beta":  # Lee et al. 2024: timestep indices at the Beta(alpha, beta) quantiles
        from scipy import stats

        q = 1 - np.linspace(0, 1, n, endpoint=False)
        idx = np.rint(stats.beta.ppf(q, params["alpha"], params["beta"]) * (big_n - 1)).astype(int)
        idx = [int(i) for j, i in enumerate(idx) if j == 0 or i != idx[j - 1]]
        ts = [table[i] for i in idx]
    else:
        ks_max = float(k_sigma(schedule, float(table[-1])))
        _check_finite_start(schedule, name, float(table[-1]), -math.log(ks_max))
        ks = _linear_quadratic(n, **params)[:-1] * ks_max
        lo = float(k_sigma(schedule, float(table[0])))
        if float(ks.min()) < lo * (1 - 1e-9):
            raise ValueError(
                f"linear_quadratic puts its last step at sigma={float(ks.min()):.4g}, below this model's smallest "
                f"level {lo:.4g}: it is Mochi's schedule for flow models (sigma_max = 1)"
            )
        ts = time_of_k_sigma(schedule, ks).tolist()
    if len(ts) != n:
        raise ValueError(
            f"ComfyUI's {name!r} rule gives {len(ts)} steps, not {n}, on this {big_n}-level model table "
            f"(it {'adds' if len(ts) > n else 'merges'} steps at this count); choose another step count or spacing"
        )
    return torch.tensor([*map(float, ts), schedule.t_zero], dtype=torch.float64)


def _linear_quadratic(n: int, threshold_noise: float, linear_steps: int | None) -> torch.Tensor:
    """Genmo's Mochi schedule (genmoai/models, ``linear_quadratic_schedule``), as ComfyUI uses it: the
    fraction of the largest sigma falls linearly to ``1 - threshold_noise`` over the first
    ``linear_steps`` (default ``n // 2``) steps, then quadratically to 0; ``n + 1`` values."""
    if n == 1:
        return torch.tensor([1.0, 0.0], dtype=torch.float64)
    ls = n // 2 if linear_steps is None else int(linear_steps)
    if not 0 < ls < n:
        raise ValueError(f"linear_quadratic needs 0 < linear_steps < {n} steps, got {ls}")
    qs = n - ls
    diff = ls - threshold_noise * n
    quad = diff / (ls * qs**2)
    lin = threshold_noise / ls - 2 * diff / qs**2
    const = quad * ls**2
    up = [i * threshold_noise / ls for i in range(ls)] + [quad * i * i + lin * i + const for i in range(ls, n)] + [1.0]
    return 1.0 - torch.tensor(up, dtype=torch.float64)


def _loglinear(levels: Sequence[float], m: int) -> np.ndarray:
    """``m`` levels interpolating ``log sigma`` linearly over the table's positions (the AYS and GITS
    authors' rule for other step counts); the table itself when it already has ``m``."""
    levels = np.asarray(levels, dtype=np.float64)
    if len(levels) == m:
        return levels.copy()
    pos = np.linspace(0, 1, len(levels))
    return np.exp(np.interp(np.linspace(0, 1, m), pos, np.log(levels[::-1])))[::-1].copy()


def _published_table(schedule: NoiseSchedule, n: int, name: str, t_start: float | None, end: str) -> torch.Tensor:
    """A published step table (:mod:`fewstep.step_tables`) on this schedule: ``n + 1`` levels, the
    last replaced by clean data for ``end="zero"`` (or pinned to ``t_min``)."""
    from fewstep.step_tables import AYS_SIGMAS, AYS_TIMESTEPS, GITS_SD15

    _check_full_run(schedule, name, t_start, "zero")
    if name in AYS_TIMESTEPS:
        if not isinstance(schedule, VPDiscrete) or schedule.num_train_timesteps != 1000:
            raise ValueError(f"spacing={name!r} is a list of training timesteps of a 1000-step VP model (Stable Diffusion); it does not apply to {schedule!r}")
        table = [float(k_sigma(schedule, float(t))) for t in AYS_TIMESTEPS[name]]
        levels = _loglinear(table, n + 1)
    elif name in AYS_SIGMAS:
        levels = _loglinear(AYS_SIGMAS[name], n + 1)
    else:
        if n < 2:
            raise ValueError("the GITS tables start at 2 steps")
        levels = np.asarray(GITS_SD15[n - 2]) if n <= 20 else _loglinear(GITS_SD15[-1], n + 1)
    sd = name in AYS_TIMESTEPS  # the model's own levels: check it is Stable Diffusion's range
    ref_hi, ref_lo = (14.6146, 0.029168) if sd else (levels[0], levels[-1])
    hi, lo = float(k_sigma(schedule, schedule.t_max)), float(k_sigma(schedule, schedule.t_min))
    if not (math.isclose(ref_hi, hi, rel_tol=1e-2) and math.isclose(ref_lo, lo, rel_tol=1e-2)):
        raise ValueError(
            f"spacing={name!r} is a table for models with sigma from {ref_hi:.6g} to {ref_lo:.6g}; this schedule "
            f"spans {hi:.6g} to {lo:.6g} (k-diffusion sigma), so the table does not apply to it"
        )
    if name in AYS_TIMESTEPS and n + 1 == len(AYS_TIMESTEPS[name]):  # the published timesteps themselves
        grid = torch.tensor(AYS_TIMESTEPS[name], dtype=torch.float64)
    else:
        grid = time_of_k_sigma(schedule, torch.tensor(levels, dtype=torch.float64))
    grid[0], grid[-1] = schedule.t_max, (schedule.t_zero if end == "zero" else schedule.t_min)
    return grid


def _diffusers_spacing(schedule: NoiseSchedule, n: int, spacing: str, steps_offset: int, t_end: float) -> torch.Tensor:
    """Integer timesteps as diffusers' multistep schedulers space them (``linspace`` / ``leading``
    / ``trailing``), followed by the end time."""
    if not isinstance(schedule, VPDiscrete):
        raise ValueError(f"spacing={spacing!r} is diffusers' integer-timestep spacing and needs a VPDiscrete schedule, not {type(schedule).__name__}")
    big_n = schedule.num_train_timesteps
    if n > big_n:
        raise ValueError(f"spacing={spacing!r} cannot place {n} distinct integer timesteps on a {big_n}-step schedule")
    if spacing == "linspace":
        ts = np.linspace(0, big_n - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = big_n // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
    else:  # trailing
        ts = np.arange(big_n, 0, -big_n / n).round() - 1
    return torch.tensor(np.concatenate([ts.astype(np.float64), [t_end]]), dtype=torch.float64)


def _validate_grid(schedule: NoiseSchedule, grid: torch.Tensor) -> None:
    if not bool(torch.all(torch.isfinite(grid))):
        raise ValueError(f"time grid contains non-finite values: {grid.tolist()}")
    if not bool(torch.all(grid[1:] < grid[:-1])):
        raise ValueError(f"time grid must decrease strictly (noisiest time first), got {grid.tolist()}")
    schedule.check_time(float(grid[0]), "first grid time")
    schedule.check_time(float(grid[-1]), "last grid time")
