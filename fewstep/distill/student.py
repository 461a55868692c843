r"""The consistency student: a network turned into a boundary-conditioned consistency function.

A consistency model ``f_theta(x_t, t)`` maps any point of a probability-flow ODE trajectory to the
trajectory's point at a boundary time ``t_b``; it must satisfy ``f_theta(x, t_b) = x``.  As in
Song et al. 2023 ("Consistency Models", sec. 3 and App. C) and Luo et al. 2023 ("Latent
Consistency Models", eq. 9) the condition is built into the parameterisation,

.. math::  f_\theta(x, t) = c_{skip}(t)\, x + c_{out}(t)\, F_\theta(x, t),
           \qquad c_{skip} = \frac{\sigma_d^2}{u^2 + \sigma_d^2},\quad
           c_{out} = \frac{u}{\sqrt{u^2 + \sigma_d^2}},\quad
           u = \kappa\,(\tau(t) - \tau(t_b)),

where ``F_theta`` is the network's data prediction (its raw output converted by its prediction
type, :func:`fewstep.models.to_x0`), ``tau`` is the timestep the network is fed
(``schedule.model_timestep``), ``sigma_d`` the data standard deviation and ``kappa`` a time scale.
``c_skip(t_b) = 1`` and ``c_out(t_b) = 0`` exactly; far from the boundary ``c_out -> 1``, so a
student initialised from its teacher starts as the teacher's data prediction.

``u`` is measured in *model timesteps*, not in noise level, so one ``kappa`` means different things
on different schedules: ``tau`` is the training index on ``VPDiscrete`` (0 .. N-1), ``1000 t`` on
``VPContinuous``, ``N t`` on ``FlowMatching`` and ``sigma`` itself on ``EDM``.  For example
``kappa = 1`` on DDPM's discrete schedule gives ``c_skip = 0.2`` one timestep above the boundary,
where ``sigma / alpha`` is only about 0.014.

* ``kappa = 10``, ``t_b = 0`` on a discrete VP schedule is exactly LCM's (and diffusers'
  ``LCMScheduler``'s) boundary condition (``timestep_scaling = 10``); the LCD objective uses it.
  The CD objective's default keeps ``kappa = 10`` with ``t_b`` the first point of its grid (on a
  discrete VP schedule ending on clean data: ``t_b = -1``, the clean-data time).
* ``kappa = 1`` on an EDM schedule (``tau = sigma``) with ``t_b = sigma_min`` gives CM's ``c_skip``;
  ``c_out`` differs from CM's ``sigma_d (sigma - sigma_min) / sqrt(sigma^2 + sigma_d^2)`` because
  ``F_theta`` here is a data prediction, not a unit-variance raw output.  On the other schedules
  ``kappa = 1`` is *not* CM's condition in noise-level units.

A student built for latent consistency distillation also takes the guidance scale ``w`` (diffusers'
convention: ``w = 1`` is the conditional model) and feeds the network LCM's embedding of
``w - 1`` as ``timestep_cond`` (:func:`guidance_embedding`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from fewstep.models.diffusers_models import DiffusersDenoiser
from fewstep.models.prediction import time_tensor
from fewstep.schedules import NoiseSchedule

__all__ = ["BoundaryCondition", "TrigFlowBoundary", "ConsistencyStudent", "guidance_embedding", "boundary_from_config"]


@dataclass(frozen=True)
class BoundaryCondition:
    """``c_skip`` / ``c_out`` of the module docstring: ``f(x, t_b) = x`` at ``boundary_time``."""

    boundary_time: float
    scale: float = 10.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.sigma_data > 0):
            raise ValueError(f"boundary scale and sigma_data must be positive, got {self.scale}, {self.sigma_data}")

    def coefficients(self, schedule: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out)`` as float64 tensors of ``t``'s shape (on the CPU)."""
        tt = t.detach().to("cpu", torch.float64)
        tau = torch.as_tensor(schedule.model_timestep(tt), dtype=torch.float64)
        u = self.scale * (tau - float(schedule.model_timestep(float(self.boundary_time))))
        sd2 = self.sigma_data**2
        return sd2 / (u * u + sd2), u / torch.sqrt(u * u + sd2)

    def scalar_coefficients(self, schedule: NoiseSchedule, t: float) -> tuple[float, float]:
        """``(c_skip, c_out)`` at one time, as Python floats (the same float64 arithmetic)."""
        c_skip, c_out = self.coefficients(schedule, torch.tensor(float(t), dtype=torch.float64))
        return float(c_skip), float(c_out)

    def config(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class TrigFlowBoundary:
    r"""The parameterisation of continuous-time (sCM / rCM) students: no ``c_skip`` / ``c_out``.

    sCM's consistency function is ``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t, t)`` in
    TrigFlow (Lu & Song 2024, eq. 5).  With ``F_theta`` the network's own prediction mapped to
    TrigFlow (:class:`fewstep.trigflow.TrigFlowNetwork`: ``sigma_d F = (cos t x_t - D_theta) /
    sin t``), ``f`` *is* the network's data prediction ``D_theta``, so the coefficients are
    ``(0, 1)``; ``f(x, 0) = x`` holds because the epsilon, v and flow conversions give ``D = x`` at
    clean data.  ``boundary_time`` is the schedule's clean-data time."""

    boundary_time: float
    sigma_data: float = 0.5
    kind: str = "trigflow"

    def coefficients(self, schedule: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tt = t.detach().to("cpu", torch.float64)
        return torch.zeros_like(tt), torch.ones_like(tt)

    def scalar_coefficients(self, schedule: NoiseSchedule, t: float) -> tuple[float, float]:
        return 0.0, 1.0

    def config(self) -> dict[str, Any]:
        return asdict(self)


def boundary_from_config(cfg: dict[str, Any]) -> BoundaryCondition | TrigFlowBoundary:
    """Inverse of ``config()`` of either parameterisation (a config without ``kind`` is CM's)."""
    if cfg.get("kind") == "trigflow":
        return TrigFlowBoundary(float(cfg["boundary_time"]), float(cfg["sigma_data"]))
    if "kind" in cfg:
        raise ValueError(f"unknown student parameterisation kind {cfg['kind']!r}; expected 'trigflow' or none")
    return BoundaryCondition(float(cfg["boundary_time"]), float(cfg["scale"]), float(cfg["sigma_data"]))


def guidance_embedding(guidance_scale: torch.Tensor | float, dim: int, batch: int) -> torch.Tensor:
    """LCM's guidance embedding (Luo et al. 2023, sec. 4.2; the VDM sinusoidal embedding) of
    ``w - 1`` for a guidance scale ``w`` in diffusers' convention, shape (batch, dim), float32.

    Equal to diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding(w - 1)``, so
    students distilled here run in that pipeline."""
    w = torch.as_tensor(guidance_scale, dtype=torch.float32).detach().flatten().cpu()
    if w.numel() == 1:
        w = w.expand(batch)
    if w.numel() != batch:
        raise ValueError(f"guidance_scale must be a number or one value per sample ({batch}), got {w.numel()} values")
    # Same operations, in the same float32 order, as the pipeline: at w ~ 15 the arguments reach
    # 1.5e4, where a different rounding of the frequencies would move the phases by ~1e-3.
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    arg = (1000.0 * (w - 1.0))[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class DenoiserStudent(torch.nn.Module):
    """A trained module around a :class:`DiffusersDenoiser` held in ``self.denoiser``: the
    ``network`` / ``schedule`` / ``prediction_type`` the trainer and the export read."""

    denoiser: DiffusersDenoiser

    @property
    def network(self) -> torch.nn.Module:
        return self.denoiser.model

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type


class ConsistencyStudent(DenoiserStudent):
    """``f_theta(x, t, **cond)``: a network as a boundary-conditioned consistency function.

    Args:
        network: called as ``network(x, timestep, **cond)`` (any diffusers model, or an
            ``nn.Module`` with that signature); its output has the input's shape.
        schedule: the noise schedule of the teacher (and of the student's time input).
        prediction_type: what the network predicts (``epsilon``, ``v_prediction``, ``sample``, ...).
        boundary: the boundary condition.
        guidance_embedding_dim: for guidance-conditioned (LCD) students, the size of the network's
            ``timestep_cond`` input; the student then needs ``guidance_scale=`` at every call.

    ``forward(x, t)`` takes the schedule's time as a float, a 0-d or a (B,) tensor and returns the
    consistency function's value (a data prediction at the boundary) in ``promote(x, float32)``.
    The network lives in ``self.denoiser.model`` (see :attr:`network`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        boundary: BoundaryCondition | None = None,
        guidance_embedding_dim: int | None = None,
    ):
        super().__init__()
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"the student network must be a torch.nn.Module, got {type(network).__name__}")
        self.denoiser = DiffusersDenoiser(network, schedule=schedule, prediction_type=prediction_type)
        self.boundary = boundary if boundary is not None else BoundaryCondition(schedule.t_zero)
        schedule.check_time(self.boundary.boundary_time, "boundary_time")
        self.guidance_embedding_dim = guidance_embedding_dim
        # (c_skip, c_out) per scalar time: samplers call the student at the same few times over and over
        self._coefficient_cache: dict[float, tuple[float, float]] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, guidance_scale: Any = None, **cond: Any) -> torch.Tensor:
        t = time_tensor(t, x.device)
        if self.guidance_embedding_dim:
            if guidance_scale is None:
                raise TypeError("this student was distilled with a guidance embedding: pass guidance_scale=w (diffusers' convention)")
            emb = guidance_embedding(guidance_scale, self.guidance_embedding_dim, x.shape[0])
            cond["timestep_cond"] = emb.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        elif guidance_scale is not None:
            raise TypeError("this student has no guidance embedding; it takes no guidance_scale")
        x0 = self.denoiser(x, t, **cond)
        if t.ndim == 0:
            c_skip, c_out = self._scalar_coefficients(float(t))
            return x.to(x0.dtype) * c_skip + x0 * c_out  # Python floats: no device copies (as FewstepScheduler)
        c_skip, c_out = self.boundary.coefficients(self.schedule, t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_skip = c_skip.to(x0.device, x0.dtype).reshape(shape)
        c_out = c_out.to(x0.device, x0.dtype).reshape(shape)
        return c_skip * x.to(x0.dtype) + c_out * x0

    def _scalar_coefficients(self, t: float) -> tuple[float, float]:
        """The boundary coefficients at one time, from a small cache (cleared when it reaches
        1024 times, e.g. under a stream of random continuous times)."""
        cache = self._coefficient_cache
        got = cache.get(t)
        if got is None:
            if len(cache) >= 1024:
                cache.clear()
            got = cache[t] = self.boundary.scalar_coefficients(self.schedule, t)
        return got

    def describe(self) -> dict[str, Any]:
        """Plain data for the checkpoint metadata."""
        return {
            "prediction_type": self.prediction_type,
            "boundary": self.boundary.config(),
            "guidance_embedding_dim": self.guidance_embedding_dim,
            "schedule": self.schedule.config(),
        }
