r"""Continuous-time consistency, sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv:2410.11081, Algorithm 1): distillation from any
teacher fewstep wraps, or consistency training without one.

Everything happens in TrigFlow (:mod:`fewstep.trigflow`): ``x_t = cos(t) x_0 + sin(t) z``,
``z ~ N(0, sigma_d^2 I)``, the student ``f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta``
with ``F_theta`` the student network's prediction mapped to TrigFlow (any schedule, epsilon / v /
flow networks; :class:`fewstep.distill.student.TrigFlowBoundary`).  Per sample:

* **Proposal** (sec. 4.4): ``tau ~ N(P_mean, P_std^2)``, ``t = arctan(e^tau / sigma_d)``
  (distillation defaults ``P_mean = -0.8``, ``P_std = 1.6``; training ``-1.0``, ``1.4``), clamped
  to the angles the teacher's schedule reaches.
* **Velocity**: distillation ``dx_t/dt = sigma_d F_teacher = (cos t x_t - D_teacher) / sin t``
  (the teacher's data prediction, classifier-free guided with ``guidance_scale`` in diffusers'
  convention when given); training ``dx_t/dt = cos(t) z - sin(t) x_0``.
* **Tangent** (sec. 4.2, eq. 8, and the JVP rearrangement of sec. 5.1): with ``theta^- =
  stopgrad(theta)``,
  ``g = -cos^2(t) (sigma_d F_theta^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta^-/dt)``,
  where ``cos(t) sin(t) dF/dt`` is one ``torch.func.jvp`` through the network along
  ``(cos t sin t dx_t/dt, cos t sin t)`` (:meth:`fewstep.trigflow.TrigFlowNetwork.tangent`;
  ``jvp="fd"``: a central finite difference instead, which ``"jvp"`` falls back to, with a
  warning, for a network some kernel of which has no working forward-mode rule).
  ``r = min(1, step / tangent_warmup)`` is the tangent warm-up (sec. 4.2).
* **Tangent normalisation** (sec. 4.2): ``g <- g / (||g|| + c)``, ``c = 0.1`` (in float64).
* **Adaptive weighting** (sec. 4.3): ``L = e^{w_phi(t)} / D ||F_theta - F_theta^- - g||^2 -
  w_phi(t)`` with a log-variance head ``w_phi`` (:class:`LogVarianceHead`, trained with the
  student by its own optimizer); without it ``||.||^2 / D``.

Precision: the student and its JVP run in the trainer's precision (autocast), the tangent, its
normalisation and the loss in float32 / float64, as the paper recommends (sec. 5.1: the JVP in
half precision is stable once the tangent is normalised; the loss in full precision).  The
student is sampled with the registry's ``scm`` sampler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fewstep.distill.data import randn
from fewstep.distill.objective import Batch, ConsistencyObjective, Models, TrainableNetwork
from fewstep.distill.student import TrigFlowBoundary
from fewstep.schedules import NoiseSchedule
from fewstep.trigflow import JVP_METHODS, TrigFlowMap, TrigFlowNetwork

__all__ = ["SCM", "LogVarianceHead"]


class LogVarianceHead(torch.nn.Module):
    """``w_phi(t)``: sCM's adaptive weighting (sec. 4.3, after EDM2's uncertainty weighting,
    Karras et al. 2024): a linear layer on a sinusoidal embedding of ``t`` (``channels`` features
    of ``1000 t / (pi/2)``), initialised to zero, so training starts with weight 1."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = int(channels)
        self.linear = torch.nn.Linear(self.channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        emb = get_timestep_embedding(t.float().flatten() * (1000.0 / (math.pi / 2)), self.channels)
        return self.linear(emb.to(self.linear.weight.dtype)).flatten().float()


class SCM(ConsistencyObjective):
    """sCM (see the module docstring).

    Args:
        teacher: ``True`` distils the trainer's teacher; ``False`` is consistency training (sCT).
        sigma_data: TrigFlow's data scale ``sigma_d``.
        p_mean, p_std: the proposal's log-normal parameters (default: the paper's for the mode).
        tangent_warmup: training steps of the tangent warm-up (paper: 10k; 0: none).
        tangent_c: the constant ``c`` of the tangent normalisation.
        adaptive_weighting: train the log-variance head ``w_phi``.
        jvp: ``"jvp"`` (torch.func) or ``"fd"`` (central difference, step ``fd_step`` in t).
        guidance_scale: classifier-free guidance of the teacher's velocity (diffusers' convention,
            1 = conditional); needs ``uncond`` (or a data source that builds it).
        uncond: the teacher's unconditional inputs.
        logvar_lr: learning rate of the log-variance head (default: the run's).
    """

    name = "scm"
    paper = "Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models, Algorithm 1"
    sampler = "scm"

    def __init__(
        self,
        *,
        teacher: bool = True,
        sigma_data: float = 0.5,
        p_mean: float | None = None,
        p_std: float | None = None,
        tangent_warmup: int = 1000,
        tangent_c: float = 0.1,
        adaptive_weighting: bool = True,
        jvp: str = "jvp",
        fd_step: float = 1e-3,
        guidance_scale: float | None = None,
        uncond: Mapping[str, Any] | None = None,
        logvar_lr: float | None = None,
    ):
        super().__init__(loss="l2", target_ema=0.0, sigma_data=sigma_data)
        if jvp not in JVP_METHODS:
            raise ValueError(f"jvp must be one of {', '.join(JVP_METHODS)}, got {jvp!r}")
        if isinstance(tangent_warmup, bool) or not isinstance(tangent_warmup, int) or tangent_warmup < 0:
            raise ValueError(f"tangent_warmup must be an integer >= 0 (training steps), got {tangent_warmup!r}")
        if not sigma_data > 0 or not tangent_c > 0 or not fd_step > 0:
            raise ValueError(f"sigma_data, tangent_c and fd_step must be positive, got {sigma_data}, {tangent_c}, {fd_step}")
        if guidance_scale is not None and not teacher:
            raise ValueError("guidance_scale guides the teacher; consistency training (teacher=False) has none")
        self.needs_teacher = bool(teacher)
        self.p_mean = float(p_mean if p_mean is not None else (-0.8 if teacher else -1.0))
        self.p_std = float(p_std if p_std is not None else (1.6 if teacher else 1.4))
        if not self.p_std > 0:
            raise ValueError(f"p_std must be positive, got {self.p_std}")
        self.tangent_warmup = tangent_warmup
        self.tangent_c = float(tangent_c)
        self.adaptive_weighting = bool(adaptive_weighting)
        self.jvp = jvp
        self.fd_step = float(fd_step)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        if self.guidance_scale is not None:
            self.uncond = dict(uncond) if uncond is not None else None  # None: the trainer asks the data source
        self.logvar_lr = logvar_lr
        self._nets: dict[int, TrigFlowNetwork] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        super().bind(schedule, data_shape, total_steps)
        self.map = TrigFlowMap(schedule, self.sigma_data)
        self.t_lo = self.map.t_min
        self.t_hi = self.map.t_max

    def boundary_time(self) -> float:
        return float(self.schedule.t_zero)

    def boundary(self) -> TrigFlowBoundary:
        return TrigFlowBoundary(self.boundary_time(), self.sigma_data)

    def grid_at(self, step: int) -> torch.Tensor:
        """sCM has no grid: the time range ``[t_zero, t_max]`` of the schedule."""
        return torch.tensor([self.schedule.t_zero, self.schedule.t_max], dtype=torch.float64)

    def lower_point(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("sCM is continuous-time: it has no lower point of an interval")

    def sampler_options(self) -> dict[str, Any]:
        return {"sigma_data": self.sigma_data}

    def extra_networks(self, student: Any, teacher: Any) -> dict[str, TrainableNetwork]:
        TrigFlowNetwork(student.denoiser, self.sigma_data)  # refuses a student sCM cannot parameterise, before any work
        return {"logvar": TrainableNetwork(LogVarianceHead(), lr=self.logvar_lr)} if self.adaptive_weighting else {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mode": "distillation" if self.needs_teacher else "consistency training",
            "sigma_data": self.sigma_data,
            "proposal": {"p_mean": self.p_mean, "p_std": self.p_std},
            "tangent_warmup": self.tangent_warmup,
            "tangent_c": self.tangent_c,
            "adaptive_weighting": self.adaptive_weighting,
            "jvp": self.jvp,
            "guidance_scale": self.guidance_scale,
        }

    # -- pieces -------------------------------------------------------------------------------------
    def draw_times(self, batch: Batch) -> torch.Tensor:
        """(B,) float64 TrigFlow times from the proposal, one per sample (its generator)."""
        tau = self.p_mean + self.p_std * randn(batch.gens, (), dtype=torch.float64)
        return torch.atan(torch.exp(tau) / self.sigma_data).clamp(self.t_lo, self.t_hi)

    def warmup_ratio(self, step: int) -> float:
        return 1.0 if self.tangent_warmup == 0 else min(1.0, step / self.tangent_warmup)

    def network(self, student: Any) -> TrigFlowNetwork:
        """The TrigFlow view of a (bare, unwrapped) student's network, built once per student."""
        key = id(student)
        if key not in self._nets:
            self._nets[key] = TrigFlowNetwork(student.denoiser, self.sigma_data)
        return self._nets[key]

    def schedule_point(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_s, s)``: the TrigFlow state and times in the schedule's coordinates."""
        s = self.map.time(t)
        return x_t / _col(self.map.scale(s), x_t), s

    def teacher_x0(self, models: Models, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """The (guided) teacher's data prediction at TrigFlow ``(x_t, t)``."""
        x_s, s = self.schedule_point(x_t, t)
        teacher = models.teacher
        if self.guidance_scale is not None:
            from fewstep.models.guidance import ClassifierFreeGuidance

            teacher = ClassifierFreeGuidance(models.teacher, self.guidance_scale, self.uncond)
        return teacher(x_s, s.to(x_t.device), **cond).float()

    def velocity(self, models: Models, batch: Batch, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """``dx_t/dt``: the teacher's probability-flow velocity, or ``cos t z - sin t x_0`` (sCT)."""
        cos, sin = _col(torch.cos(t), x_t), _col(torch.sin(t), x_t)
        if not self.needs_teacher:
            return cos * z - sin * batch.x0.float()
        return (cos * x_t - self.teacher_x0(models, x_t, t, cond)) / sin

    def student_F(self, x0_pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``F = (cos t x_t - f) / (sigma_d sin t)`` from the student's consistency value ``f``."""
        return (_col(torch.cos(t), x_t) * x_t - x0_pred.float()) / (self.sigma_data * _col(torch.sin(t), x_t))

    def tangent(self, models: Models, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, F_sg: torch.Tensor,
                step: int, cond: dict[str, Any]) -> torch.Tensor:
        """sCM's normalised tangent ``g`` (float32)."""
        cs = torch.cos(t) * torch.sin(t)
        net = self.network(models.target)
        _, dF = net.tangent(x_t, t, _col(cs, x_t) * dxdt, cs, method=self.jvp, fd_step=self.fd_step, **cond)
        cos, sin = _col(torch.cos(t), x_t), _col(torch.sin(t), x_t)
        r = self.warmup_ratio(step)
        sd = self.sigma_data
        g = -cos * cos * (sd * F_sg - dxdt) - r * (_col(cs, x_t) * x_t + sd * dF.float())
        g = g.double()
        norm = g.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (g.ndim - 1))
        return (g / (norm + self.tangent_c)).float()

    def scm_loss(self, models: Models, F: torch.Tensor, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample loss: ``e^w / D ||F - sg(F) - g||^2 - w`` (or ``||.||^2 / D``)."""
        mse = (F - F.detach() - g).flatten(1).square().mean(1)
        if not self.adaptive_weighting:
            return mse
        w = models.networks["logvar"](t.to(F.device, torch.float32))
        return torch.exp(w) * mse - w

    def draw(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(t, z, x_t)``: proposal times, TrigFlow noise ``z = sigma_d eps`` and the noised data."""
        t = self.draw_times(batch)
        z = self.sigma_data * randn(batch.gens, batch.x0.shape[1:], device=batch.x0.device)
        x_t = _col(torch.cos(t), z) * batch.x0.float() + _col(torch.sin(t), z) * z
        return t, z, x_t

    def loss(self, models: Models, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The sCM loss of one micro-batch (Algorithm 1)."""
        t, z, x_t = self.draw(batch)
        cond = dict(batch.cond)
        x_s, s = self.schedule_point(x_t, t)
        F = self.student_F(models.student(x_s, s.to(x_t.device), **cond), x_t, t)
        with torch.no_grad():
            dxdt = self.velocity(models, batch, x_t, t, z, cond)
            g = self.tangent(models, x_t, t, dxdt, F.detach(), batch.step, cond)
        per = self.scm_loss(models, F, g, t)
        return per.mean(), {"warmup": self.warmup_ratio(batch.step)}


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) float64 tensor shaped to broadcast over ``x`` (B, ...), in float32 on ``x``'s device."""
    return torch.as_tensor(v).reshape((-1,) + (1,) * (x.ndim - 1)).to(x.device, torch.float32)
