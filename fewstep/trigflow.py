r"""TrigFlow from any schedule: the time, state and model maps that make any fewstep teacher an
sCM teacher and any diffusers network an sCM student.

TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", sec. 2.2, eq. 3; :class:`fewstep.schedules.TrigFlow`) writes the forward process as
``x_t = cos(t) x_0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``.  A schedule with
``x_s = alpha(s) x_0 + sigma(s) eps`` holds the same distributions at the time of equal
signal-to-noise ratio (SANA-Sprint, Chen et al. 2025, arXiv:2503.09641, sec. 3.1, do this for
flow matching; here it is done for every schedule family through the half log-SNR ``lambda``):

.. math::  \tan t = \frac{\sigma(s)}{\sigma_d\,\alpha(s)},\qquad
           s = \lambda^{-1}\big(\log\cos t - \log(\sigma_d \sin t)\big),\qquad
           x_t = c(s)\, x_s,\quad c = \frac{\cos t}{\alpha(s)} = \frac{\sigma_d}{\sqrt{\sigma_d^2\alpha^2 + \sigma^2}}.

The data prediction is the same in both: ``D_trig(x_t, t) = D(x_t / c, s(t))``.  The TrigFlow
network output ``F`` (sCM eq. 5: ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F``, the probability-flow
velocity ``dx_t/dt = sigma_d F``) follows from it:

.. math::  \sigma_d F(x_t, t) = \frac{\cos(t)\, x_t - D_{trig}(x_t, t)}{\sin t}.

For a network of any prediction type the data prediction is linear in the state and the raw
output, ``D = A(s) x_s + B(s) N(x_s, tau(s))`` (:func:`fewstep.models.prediction.to_x0`), so
``F = p(t) x_t + q(t) N(x_t / c(t), tau(t))`` with scalar coefficients of ``t``: that is what
:class:`TrigFlowNetwork` evaluates, and what its JVP (sCM's tangent) differentiates.  Every
schedule quantity is computed in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from fewstep.models.prediction import to_x0
from fewstep.schedules import NoiseSchedule, TimeLike, TrigFlow

__all__ = ["TrigFlowMap", "TrigFlowDenoiser", "TrigFlowNetwork", "forward_ad_attention", "JVP_METHODS"]

JVP_METHODS = ("jvp", "fd")


def _f64(t: TimeLike) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


class TrigFlowMap:
    """The SNR-matching map between ``schedule`` and TrigFlow with data scale ``sigma_data``.

    ``angle(s)`` is the TrigFlow time of schedule time ``s``, ``time(t)`` its inverse, ``scale(s)``
    the factor ``c`` with ``x_t = c x_s``.  ``t_max`` is the largest angle the schedule reaches
    (``pi/2`` only for schedules with zero terminal SNR)."""

    def __init__(self, schedule: NoiseSchedule, sigma_data: float = 0.5):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a fewstep NoiseSchedule, got {type(schedule).__name__}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.trigflow = TrigFlow(self.sigma_data)
        self.t_max = float(self.angle(schedule.t_max))
        self.t_min = float(self.angle(schedule.t_min))

    def angle(self, s: TimeLike) -> TimeLike:
        """``t = atan2(sigma(s), sigma_d alpha(s))`` (0 at clean data, ``pi/2`` at zero SNR)."""
        la, ls = self.schedule.log_alpha_sigma(_f64(s))
        t = torch.atan2(torch.exp(ls), self.sigma_data * torch.exp(la))
        return t if isinstance(s, torch.Tensor) else float(t)

    def time(self, t: TimeLike) -> TimeLike:
        """The schedule time of TrigFlow time ``t`` (equal half log-SNR); an angle beyond the
        schedule's noisiest (``t_max``) is an error."""
        tt = _f64(t)
        if bool((tt < -1e-12).any()) or bool((tt > self.t_max + 1e-9).any()):
            raise ValueError(
                f"TrigFlow time {tt.min().item():.6g}..{tt.max().item():.6g} is outside [0, {self.t_max:.6g}], the angles "
                f"{self.schedule!r} reaches with sigma_data={self.sigma_data} (its t_max has finite SNR); keep t <= t_max"
            )
        tt = tt.clamp(0.0, self.t_max)
        s = self.schedule.t_from_lambda(self.trigflow.lambda_(tt))
        s = torch.where(tt == 0, torch.full_like(s, self.schedule.t_zero), s)
        s = torch.where(tt >= self.t_max, torch.full_like(s, self.schedule.t_max), s)
        return s if isinstance(t, torch.Tensor) else float(s)

    def scale(self, s: TimeLike) -> TimeLike:
        """``c(s) = sigma_d / sqrt(sigma_d^2 alpha^2 + sigma^2)``: ``x_t = c x_s``."""
        la, ls = self.schedule.log_alpha_sigma(_f64(s))
        c = self.sigma_data / torch.hypot(self.sigma_data * torch.exp(la), torch.exp(ls))
        return c if isinstance(s, torch.Tensor) else float(c)

    def to_trigflow(self, x: torch.Tensor, s: TimeLike) -> torch.Tensor:
        """``x_t = c(s) x_s`` (one time, or one per sample)."""
        return x * _per_sample(self.scale(_f64(s)), x)

    def from_trigflow(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``x_s = x_t / c(s(t))``."""
        return x / _per_sample(self.scale(self.time(_f64(t))), x)

    def denoiser(self, denoiser: Callable[..., torch.Tensor]) -> "TrigFlowDenoiser":
        """``denoiser`` (in the schedule's time and state) as a TrigFlow denoiser."""
        return TrigFlowDenoiser(denoiser, self)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    shape = (-1,) + (1,) * (x.ndim - 1) if v.ndim else ()
    return v.reshape(shape).to(x.device, x.dtype if x.is_floating_point() else torch.float32)


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    """The network's timestep dtype: float32, float64 for a float64 state (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class TrigFlowDenoiser:
    """``D_trig(x_t, t) = D(x_t / c, s(t))`` with the velocity ``sigma_d F`` of sCM eq. 5."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], tmap: TrigFlowMap):
        self.inner = denoiser
        self.map = tmap
        self.schedule = tmap.trigflow
        self.prediction_type = "sample"

    def __call__(self, x: torch.Tensor, t: TimeLike, **cond: Any) -> torch.Tensor:
        tt = _f64(t)
        s = self.map.time(tt)
        x_s = x / _per_sample(self.map.scale(s), x)
        s_in = s.to(x.device) if s.ndim else float(s)
        return self.inner(x_s, s_in, **cond)

    def velocity(self, x: torch.Tensor, t: TimeLike, x0: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        """``dx_t/dt = sigma_d F = (cos t x_t - D_trig) / sin t`` (``t > 0``)."""
        if x0 is None:
            x0 = self(x, t, **cond)
        tt = _per_sample(_f64(t), x0)
        return (torch.cos(tt) * x.to(x0.dtype) - x0) / torch.sin(tt)


@contextmanager
def forward_ad_attention() -> Iterator[None]:
    """PyTorch's math kernel for ``scaled_dot_product_attention`` (matmul, softmax, matmul, all with
    forward-mode rules) inside the block.  The fused CPU / flash / memory-efficient kernels have no
    forward-mode AD rule ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu
    that does not support it"), so every diffusers attention processor that calls
    ``F.scaled_dot_product_attention`` (``AttnProcessor2_0``, the joint / Flux processors) runs
    under ``torch.func.jvp`` here; the math kernel stores the attention matrix (memory quadratic in
    the sequence).  xformers' processors are not covered: the sCM objective refuses them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@dataclass
class _Coefficients:
    inv_c: torch.Tensor  # 1 / c: x_s = x_t / c
    tau: torch.Tensor  # the network's timestep
    p: torch.Tensor
    q: torch.Tensor


class TrigFlowNetwork:
    """``F(x_t, t) = p(t) x_t + q(t) N(x_t / c(t), tau(t))``: the TrigFlow output of a network ``N``
    trained (or initialised) in another schedule, and its directional derivative.

    Args:
        denoiser: a :class:`fewstep.models.DiffusersDenoiser` (or ``PredictionDenoiser``) holding
            the network, its schedule, prediction type and calling convention.
        sigma_data: TrigFlow's data scale.

    A data-prediction network (``prediction_type="sample"``) is refused: ``F = (cos t x_t -
    N) / (sigma_d sin t)`` is then singular at ``t -> 0``, where sCM needs it bounded (its
    ``f(x, 0) = x`` holds through ``F``).  EDM-preconditioned networks are refused too (not
    implemented).
    """

    def __init__(self, denoiser: Any, sigma_data: float = 0.5):
        if getattr(denoiser, "precondition", None) is not None:
            raise ValueError("an EDM-preconditioned network cannot be an sCM student yet (c_in scaling is not mapped); "
                             "use a network with an epsilon, v or flow prediction")
        pt = getattr(denoiser, "prediction_type", None)
        if pt not in ("epsilon", "v_prediction", "flow_prediction"):
            raise ValueError(
                f"an sCM student network must predict epsilon, v or flow velocity, not {pt!r}: a data prediction makes "
                "TrigFlow's F = (cos t x_t - x0) / (sigma_d sin t) singular at t -> 0 (pass prediction_type='v_prediction' "
                "for a network trained from scratch)"
            )
        self.denoiser = denoiser
        self.map = TrigFlowMap(denoiser.schedule, sigma_data)
        self.sigma_data = float(sigma_data)
        self.timestep_scale = float(getattr(denoiser, "timestep_scale", 1.0))
        #: why ``method="jvp"`` fell back to finite differences (None: it did not)
        self.fallback_reason: str | None = None

    # -- coefficients (float64, CPU) ----------------------------------------------------------
    def coefficients(self, t: torch.Tensor) -> _Coefficients:
        """``1/c``, ``tau``, ``p``, ``q`` at TrigFlow times ``t`` ((B,) float64)."""
        sch, sd = self.denoiser.schedule, self.sigma_data
        s = self.map.time(t)
        la, ls = sch.log_alpha_sigma(s)
        alpha, sigma = torch.exp(la), torch.exp(ls)
        c = sd / torch.hypot(sd * alpha, sigma)
        pt = self.denoiser.prediction_type
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        a_coef = to_x0(pt, zero, one, alpha, sigma)  # D = A x_s + B N
        b_coef = to_x0(pt, one, zero, alpha, sigma)
        tau = torch.as_tensor(sch.model_timestep(s), dtype=torch.float64) * self.timestep_scale
        sin, cos = torch.sin(t), torch.cos(t)
        p = (cos - a_coef / c) / (sd * sin)
        q = -b_coef / (sd * sin)
        return _Coefficients(1.0 / c, tau, p, q)

    def coefficient_derivatives(self, t: torch.Tensor) -> tuple[_Coefficients, _Coefficients]:
        """The coefficients and their ``t``-derivatives, the latter by a float64 central
        difference with step ``h = min(1e-6, t/2, (t_max - t)/2)`` (relative error ~1e-10: far
        below the float32 network's).  The p, q cancellations are computed in float64."""
        h = torch.minimum(torch.full_like(t, 1e-6), torch.minimum(t / 2, (self.map.t_max - t) / 2)).clamp_min(1e-12)
        c0, cp, cm = self.coefficients(t), self.coefficients(t + h), self.coefficients(t - h)
        d = _Coefficients(*((getattr(cp, k) - getattr(cm, k)) / (2 * h) for k in ("inv_c", "tau", "p", "q")))
        return c0, d

    # -- evaluation -----------------------------------------------------------------------------
    def raw(self, x_s: torch.Tensor, tau: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The network's raw output at model timestep ``tau`` ((B,), float32 or float64)."""
        from fewstep.models.diffusers_models import _diffusers_output

        den = self.denoiser
        out = den.call_model(x_s, tau, **cond)
        out = den.output_fn(out) if getattr(den, "output_fn", None) is not None else _diffusers_output(out)
        if out.shape != x_s.shape and out.ndim == x_s.ndim and out.shape[1] == 2 * x_s.shape[1]:
            out = out[:, : x_s.shape[1]]
        return out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """``F(x_t, t)``; ``t`` a (B,) tensor of TrigFlow times."""
        co = self.coefficients(_f64(t))
        dt = x_t.dtype
        out = self.raw(x_t * _per_sample(co.inv_c, x_t), co.tau.to(x_t.device, _time_dtype(x_t)), cond)
        return _per_sample(co.p, x_t) * x_t + _per_sample(co.q, x_t).to(dt) * out.to(dt)

    def tangent(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, method: str = "jvp",
                fd_step: float = 1e-3, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F, dF)``: ``F(x_t, t)`` and its derivative along ``(v, dt)`` (``dt`` (B,) per sample),
        without gradient.

        ``method="jvp"``: ``torch.func.jvp`` through the network (under :func:`forward_ad_attention`)
        with tangent ``(v / c + x_t d(1/c), dtau)`` at its inputs, the chain rule through the
        scalar coefficients done exactly (sCM sec. 5.1 computes ``cos t sin t dF/dt`` the same way,
        by one JVP).  ``method="fd"``: the central difference ``(F(x + h v, t + h dt) - F(x - h v,
        t - h dt)) / 2h`` (``h = fd_step``), for networks whose kernels have no forward-mode rule.

        *Fallback*: when ``torch.func.jvp`` raises through the network but the plain forward on the
        same inputs runs, the failure is the forward-mode rule of some kernel (torch 2.6's
        ``group_norm`` fails so inside diffusers' UNets); a ``RuntimeWarning`` names it once and
        this network uses ``fd`` from then on (:attr:`fallback_reason`).  A failure of the plain
        forward is raised as it is."""
        if method not in JVP_METHODS:
            raise ValueError(f"method must be one of {', '.join(JVP_METHODS)}, got {method!r}")
        tt, dtt = _f64(t), _f64(dt)
        if method == "jvp" and self.fallback_reason is not None:
            method = "fd"
        with torch.no_grad():
            if method == "fd":
                h = float(fd_step)
                lo = tt - h * dtt
                if bool((lo <= 0).any()) or bool((tt + h * dtt > self.map.t_max).any()):
                    raise ValueError(f"fd_step={h} leaves the TrigFlow time range around t={tt.min().item():.3g}; lower fd_step")
                f = self(x_t, tt, **cond)
                up, down = self(x_t + h * v, tt + h * dtt, **cond), self(x_t - h * v, lo, **cond)
                return f, (up - down) / (2 * h)
            co, d = self.coefficient_derivatives(tt)
            x_s = x_t * _per_sample(co.inv_c, x_t)
            dx_s = v * _per_sample(co.inv_c, x_t) + x_t * _per_sample(d.inv_c * dtt, x_t)
            tau = co.tau.to(x_t.device, _time_dtype(x_t))
            dtau = (d.tau * dtt).to(x_t.device, _time_dtype(x_t))
            try:
                with forward_ad_attention():
                    out, dout = torch.func.jvp(lambda a, b: self.raw(a, b, cond), (x_s, tau), (dx_s, dtau))
            except (NotImplementedError, RuntimeError) as err:
                self.raw(x_s, tau, cond)  # a plain-forward failure is raised here, as it is
                self.fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                warnings.warn(
                    f"torch.func.jvp cannot run through {type(self.denoiser.model).__name__} ({self.fallback_reason}); the sCM "
                    f"tangent falls back to central finite differences (fd_step={fd_step}) for this network",
                    RuntimeWarning, stacklevel=2,
                )
                return self.tangent(x_t, t, v, dt, method="fd", fd_step=fd_step, **cond)
            p, q = _per_sample(co.p, x_t), _per_sample(co.q, x_t)
            f = p * x_t + q * out
            df = _per_sample(d.p * dtt, x_t) * x_t + p * v + _per_sample(d.q * dtt, x_t) * out + q * dout
            return f, df
