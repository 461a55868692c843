"""Prediction-type conversion and the denoiser interface.

Every sampler in fewstep sees one interface, the *denoiser* ``D(x, t, **cond) -> x0_hat`` (data
prediction) in the schedule's own time ``t``.  Networks predict other things; with
``x_t = alpha_t x_0 + sigma_t eps`` the conversions are

* ``epsilon``:          ``x0 = (x - sigma eps) / alpha``               (Ho et al. 2020)
* ``sample``:           ``x0 = output``
* ``v_prediction``:     ``x0 = alpha x - sigma v``, ``v = alpha eps - sigma x0``  (Salimans & Ho 2022, VP only)
* ``flow_prediction``:  ``x0 = x - t u``, ``u = eps - x0``               (rectified flow, ``alpha = 1 - t``)

Networks trained with EDM's preconditioning (Karras et al. 2022, Table 1) are instead read through
:class:`EDMPreconditioning`: ``D = c_skip x + c_out F(c_in x, c_noise)``.

:func:`to_x0` and :func:`from_x0` are the single place these formulas live; the pull-style
:class:`PredictionDenoiser`, the diffusers wrappers and the diffusers scheduler adapter all call
them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch

from fewstep.schedules import FlowMatching, NoiseSchedule

__all__ = [
    "PREDICTION_TYPES",
    "canonical_prediction_type",
    "check_prediction_type",
    "to_x0",
    "from_x0",
    "PredictionDenoiser",
    "EDMPreconditioning",
    "Denoiser",
]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
_ALIASES = {
    "eps": "epsilon",
    "epsilon": "epsilon",
    "noise": "epsilon",
    "x0": "sample",
    "sample": "sample",
    "data": "sample",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "flow": "flow_prediction",
    "flow_prediction": "flow_prediction",
    "velocity": "flow_prediction",
}

Scalar = Union[float, torch.Tensor]
Denoiser = Callable[..., torch.Tensor]


def canonical_prediction_type(prediction_type: str) -> str:
    """Diffusers' name for a prediction type (accepts ``eps``, ``x0``, ``v``, ``flow`` too)."""
    key = str(prediction_type).lower()
    if key not in _ALIASES:
        from fewstep._util import close_matches

        raise ValueError(
            f"unknown prediction_type {prediction_type!r}{close_matches(key, _ALIASES)}; "
            f"use one of {', '.join(PREDICTION_TYPES)}"
        )
    return _ALIASES[key]


def check_prediction_type(prediction_type: str, schedule: NoiseSchedule) -> str:
    """Canonical prediction type, after checking it makes sense for ``schedule``."""
    p = canonical_prediction_type(prediction_type)
    if p == "flow_prediction" and not isinstance(schedule, FlowMatching):
        raise ValueError(
            f"prediction_type='flow_prediction' (velocity eps - x0) is defined for a rectified-flow schedule "
            f"(alpha = 1 - t, sigma = t), but the schedule is {schedule!r}; use fewstep.schedules.FlowMatching "
            "or the prediction type the model was trained with"
        )
    if p == "v_prediction" and schedule.kind != "vp":
        raise ValueError(
            f"prediction_type='v_prediction' is defined for variance-preserving schedules (alpha^2 + sigma^2 = 1), "
            f"but the schedule is {schedule!r} ({schedule.kind}); pick the schedule the model was trained with"
        )
    return p


def _bcast(v: Scalar, x: torch.Tensor) -> Scalar:
    """A scalar stays a scalar; a per-sample (B,) tensor is shaped (B, 1, ..., 1) to broadcast over x."""
    if isinstance(v, torch.Tensor) and v.ndim > 0:
        return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return float(v)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _operands(y: torch.Tensor, x: torch.Tensor, alpha: Scalar, sigma: Scalar) -> tuple:
    """``y`` and ``x`` in ``promote(x.dtype, float32)``, alpha and sigma shaped to broadcast."""
    dt = _work_dtype(x)
    xx = x.to(dt)
    return y.to(dt), xx, _bcast(alpha, xx), _bcast(sigma, xx)


def to_x0(prediction_type: str, output: torch.Tensor, x: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """Data prediction from a network output, in ``promote(x.dtype, float32)``.

    ``alpha``/``sigma`` are floats or per-sample (B,) tensors; ``prediction_type`` is canonical."""
    out, xx, a, s = _operands(output, x, alpha, sigma)
    if prediction_type == "sample":
        return out
    if prediction_type == "epsilon":
        if (a == 0.0) if not isinstance(a, torch.Tensor) else bool((a == 0).any()):
            raise ValueError(
                "epsilon-prediction cannot give x0 at zero SNR (alpha = 0); zero-terminal-SNR models predict v "
                "(Lin et al. 2024, sec. 3.2): use prediction_type='v_prediction', or start below the schedule's t_max"
            )
        return (xx - s * out) / a
    if prediction_type == "v_prediction":
        return a * xx - s * out
    if prediction_type == "flow_prediction":
        return xx - s * out
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")


def from_x0(prediction_type: str, x0: torch.Tensor, x: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """Inverse of :func:`to_x0`: the network output that corresponds to data prediction ``x0``."""
    d, xx, a, s = _operands(x0, x, alpha, sigma)
    if prediction_type == "sample":
        return d
    if prediction_type == "epsilon":
        return (xx - a * d) / s
    if prediction_type == "v_prediction":
        # v = alpha eps - sigma x0 with eps = (x - alpha x0) / sigma; for VP this is (alpha x - x0) / sigma.
        return (a * xx - d) / s
    if prediction_type == "flow_prediction":
        return (xx - d) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")


def time_tensor(t: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The time a denoiser receives: float64 (float32 on devices without float64)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if isinstance(t, torch.Tensor):
        return t.to(device=device, dtype=dtype)
    return torch.tensor(float(t), device=device, dtype=dtype)


class EDMPreconditioning:
    """EDM's preconditioning (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Table 1, column "Ours"): with ``sigma_d`` the data standard
    deviation,

    ``c_in = 1 / sqrt(sigma^2 + sigma_d^2)``, ``c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)``,
    ``c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)``, ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``,

    where ``c_noise`` is the schedule's :meth:`~fewstep.schedules.EDM.model_timestep`.  The prediction
    type says what ``F`` is, with diffusers' names (``EDMEulerScheduler.precondition_outputs``):
    ``"epsilon"`` is the paper's ``F`` (``+c_out``), ``"v_prediction"`` its negative (``-c_out``),
    ``"sample"`` a data prediction (``D = F``).  ``sigma`` is the EDM time itself."""

    TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, sigma_data: float, prediction_type: str):
        p = canonical_prediction_type(prediction_type)
        if p not in self.TYPES:
            raise ValueError(
                f"an EDM-preconditioned network predicts 'epsilon' (EDM's F), 'v_prediction' (-F) or 'sample', "
                f"not {prediction_type!r}"
            )
        self.sigma_data = float(sigma_data)
        self.prediction_type = p

    def c_in(self, sigma: Scalar) -> Scalar:
        return (sigma * sigma + self.sigma_data**2) ** -0.5

    def c_skip_out(self, sigma: Scalar) -> tuple[Scalar, Scalar]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma * sigma + sd2)
        c_out = sigma * self.sigma_data / (sigma * sigma + sd2) ** 0.5
        return c_skip, -c_out if self.prediction_type == "v_prediction" else c_out

    def to_x0(self, output: torch.Tensor, x: torch.Tensor, sigma: Scalar) -> torch.Tensor:
        """``c_skip x + c_out output`` in ``promote(x.dtype, float32)`` (``output`` for ``"sample"``)."""
        out, xx, _, s = _operands(output, x, 1.0, sigma)
        if self.prediction_type == "sample":
            return out
        c_skip, c_out = self.c_skip_out(s)
        return c_skip * xx + c_out * out


class PredictionDenoiser(torch.nn.Module):
    """Turns a network ``model(x, timestep, **cond) -> prediction`` into a denoiser
    ``D(x, t, **cond) -> x0_hat``.

    ``t`` is the schedule's time (a 0-d tensor, a (B,) tensor or a float); the network receives
    ``schedule.model_timestep(t)`` (or ``timestep_fn(t)``) as a tensor.  ``output_fn`` extracts the
    prediction from whatever the network returns (default: the tensor itself, or ``.sample`` /
    first element of a tuple as diffusers models return).  Networks that also predict a variance
    (``2 C`` output channels, ``variance_type="learned"``) have the variance half dropped.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        timestep_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        precondition: EDMPreconditioning | None = None,
    ):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.precondition = precondition
        if precondition is not None:
            if schedule.kind != "ve":
                raise ValueError(f"EDM preconditioning needs an EDM (variance-exploding) schedule, got {schedule!r}")
            self.prediction_type = precondition.prediction_type
        else:
            self.prediction_type = check_prediction_type(prediction_type, schedule)
        self.timestep_fn = timestep_fn
        self.output_fn = output_fn

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        ts = self.timestep_fn(t) if self.timestep_fn is not None else self.schedule.model_timestep(t)
        return ts

    def predict(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The network's raw prediction at schedule time ``t``."""
        t = time_tensor(t, x.device)
        if self.precondition is not None:  # the network sees c_in x (EDM, Table 1)
            x = x * _bcast(self.precondition.c_in(t.to("cpu", torch.float64)), x)
        out = self.call_model(x, self.model_timestep(t), **cond)
        if self.output_fn is not None:
            out = self.output_fn(out)
        elif not isinstance(out, torch.Tensor):
            out = out.sample if hasattr(out, "sample") else out[0]
        if out.shape != x.shape and out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned variance: keep the mean prediction
        return out

    def call_model(self, x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> Any:
        """The network call; subclasses change the calling convention (keywords, batched timesteps)."""
        return self.model(x, timestep, **cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        t = time_tensor(t, x.device)
        out = self.predict(x, t, **cond)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}")
        tt = t.to("cpu", torch.float64)
        alpha, sigma = self.schedule.alpha(tt), self.schedule.sigma(tt)
        if tt.ndim == 0:
            alpha, sigma = float(alpha), float(sigma)
        if self.precondition is not None:
            return self.precondition.to_x0(out, x, sigma)
        return to_x0(self.prediction_type, out, x, alpha, sigma)
