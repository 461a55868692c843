r"""BOOT (Gu, Zhai, Zhang, Liu & Susskind 2023, "BOOT: Data-free Distillation of Denoising
Diffusion Models with Bootstrapping"): a time-conditioned student trained from noise alone.

The student :math:`g_\theta(\epsilon, t)` maps the starting noise :math:`\epsilon` of the teacher's
probability-flow ODE (``x_T = epsilon``) to the trajectory's state at any time ``t`` -- in the
paper's *signal* parameterisation (sec. 3.1): not :math:`x_t` itself but

.. math::  y_t = \frac{x_t - \sigma_t \epsilon}{\alpha_t},\qquad x_t = \alpha_t y_t + \sigma_t \epsilon,

a low-frequency, image-like quantity with :math:`y_0 = x_0` at clean data.  Along the teacher's
ODE, :math:`y` obeys the *Signal-ODE* (eq. 6 there), with :math:`\lambda_t = -\log(\alpha_t/\sigma_t)`,

.. math::  \frac{dy_t}{dt} = -\lambda'_t\,\big(f_\phi(x_t, t) - y_t\big),

whose DDIM discretisation from ``t`` to ``s < t`` is exactly the registry's DDIM step on ``x``
converted to ``y`` (:math:`y_s = f + e^{\lambda_s - \lambda_t}(y_t - f)`; tested).  *Bootstrapping*
(sec. 3.2, Algorithm 1): for two consecutive grid times ``s < t``,

.. math::  \mathcal{L}_{BS} = \mathbb{E}_{\epsilon, n}\,\big\| g_\theta(\epsilon, s)
           - \mathrm{sg}\big(\hat y_s\big)\big\|^2,\qquad
           \hat y_s = \frac{\Phi(\alpha_t\, \mathrm{sg}(g_\theta(\epsilon, t)) + \sigma_t \epsilon,\ t \to s) - \sigma_s\epsilon}{\alpha_s},

``Phi`` the teacher's ODE step (``ddim`` by default; any deterministic registry sampler), ``sg``
stop-gradient of the student itself (no EMA network, as the paper).  No data is read anywhere:
the trainer's data source is :class:`NoiseData`, which draws ``epsilon``.

*The boundary.*  The paper anchors the top of the trajectory with a boundary loss at ``t = T``,
``g(eps, T) = f_phi(eps, T)``, which is the limit of ``y_t`` where ``alpha_T = 0``.  On a schedule
with ``alpha_T > 0`` (DDPM's linear schedule: 0.0064) the trajectory from ``x_T = epsilon`` has
``y_T = (1 - sigma_T) epsilon / alpha_T`` instead, so here the top interval starts from the exact
state ``x_T = epsilon`` (no student evaluation at ``T``): its target is the teacher's first step from
the noise itself, which anchors the bootstrap as the boundary loss does, exactly.

*Sampling.*  One evaluation: :math:`x_0 = y_0 = g_\theta(\epsilon, t_0)` at clean data
(:meth:`BootStudent.generate`).  The student's only input is the starting noise, so further
evaluations cannot refine its sample: BOOT is a one-step generator (``nfe > 1`` is an error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fewstep.distill.data import randint, randn
from fewstep.distill.objective import Batch, Models, Objective
from fewstep.distill.student import DenoiserStudent
from fewstep.distill.teacher import IntervalSolver
from fewstep.models.diffusers_models import DiffusersDenoiser
from fewstep.models.prediction import time_tensor, to_x0
from fewstep.schedules import NoiseSchedule, Spacing, default_spacing, time_grid

__all__ = ["BOOT", "BootStudent", "NoiseData", "signal"]


def _coefficients(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` per sample, float64, shaped to broadcast against ``like``."""
    la, ls = schedule.log_alpha_sigma(t.detach().to("cpu", torch.float64))
    shape = (-1,) + (1,) * (like.ndim - 1)
    return torch.exp(la).to(like.device).reshape(shape), torch.exp(ls).to(like.device).reshape(shape)


def signal(schedule: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``y_t = (x_t - sigma_t eps) / alpha_t`` in float64 (BOOT sec. 3.1), one time per sample."""
    a, s = _coefficients(schedule, t, x)
    return (x.double() - s * eps.double()) / a


class NoiseData:
    """The data source of a data-free objective: ``sample`` draws standard normal noise of ``shape``
    from each sample's generator (in ``Batch.x0``'s place); nothing is read from disk."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"NoiseData needs a sample shape of positive sizes, got {shape!r}")

    def sample(self, gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return randn(gens, self.shape, device=device), {}


class BootStudent(DenoiserStudent):
    """``g_theta(eps, t) -> y_t``: the network reads the starting noise and the time ``t`` and its
    raw output ``F`` is converted by ``prediction_type`` as a denoiser converts it at the noise's
    own level ``T = t_max``, where ``eps`` is the state (``sample``: ``y = F``; ``v_prediction``:
    ``y = alpha_T eps - sigma_T F``; ``epsilon``: ``y = (eps - sigma_T F) / alpha_T``).  The conversion
    cannot be taken at ``t``: at clean data (``sigma = 0``) every type but ``sample`` would return
    ``eps`` itself whatever the network says.  At ``t = T`` a student with its teacher's weights and
    prediction type is the teacher's data prediction of the noise, the paper's boundary value; a
    v-prediction reading of an eps teacher avoids the ``1 / alpha_T`` (156x on DDPM's linear
    schedule) that amplifies an eps network's error there."""

    push_style = False  # a diffusers pipeline's loop feeds x_t back; this network reads only the noise

    def __init__(self, network: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str = "v_prediction"):
        super().__init__()
        self.denoiser = DiffusersDenoiser(network, schedule=schedule, prediction_type=prediction_type)

    def forward(self, eps: torch.Tensor, t: torch.Tensor | float, **cond: Any) -> torch.Tensor:
        out = self.denoiser.predict(eps, time_tensor(t, eps.device), **cond)
        if out.shape != eps.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for an input of shape {tuple(eps.shape)}")
        top = float(self.schedule.t_max)
        return to_x0(self.prediction_type, out, eps, float(self.schedule.alpha(top)), float(self.schedule.sigma(top)))

    def generate(self, noise: torch.Tensor, nfe: int = 1, cond: Mapping[str, Any] | None = None, **options: Any) -> torch.Tensor:
        """The one-step sample ``y_0 = g(noise, t_0)`` (``t_0`` the schedule's clean-data time)."""
        if options:
            raise TypeError(f"a BOOT student takes no sampler options, got {sorted(options)}")
        if nfe != 1:
            raise ValueError(f"a BOOT student generates in one evaluation (nfe=1), got nfe={nfe}: its only input is the "
                             "starting noise, so more evaluations cannot refine the sample")
        return self(noise, self.schedule.t_zero, **dict(cond or {}))

    def describe(self) -> dict[str, Any]:
        return {"student_kind": "boot", "prediction_type": self.prediction_type, "schedule": self.schedule.config()}


class BOOT(Objective):
    """Data-free bootstrapping distillation.

    Args:
        num_intervals: ``N``, intervals of the training grid ``t_0 = t_zero < ... < t_N = t_max``
            (the teacher's sampling grid with ``spacing``); ``s = t_n``, ``t = t_{n+1}``, ``n``
            uniform.
        spacing: grid spacing (default: the schedule's default).
        teacher_sampler, teacher_nfe, teacher_options: the teacher's ODE step ``Phi`` (registry).
    """

    name = "boot"
    paper = "Gu et al. 2023, BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"
    needs_teacher = True
    needs_data = False
    sampler = "boot"

    def __init__(self, num_intervals: int = 18, *, spacing: Spacing | None = None, teacher_sampler: str = "ddim",
                 teacher_nfe: int | None = None, teacher_options: Mapping[str, Any] | None = None):
        if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
            raise ValueError(f"num_intervals must be a positive integer, got {num_intervals!r}")
        self.num_intervals = num_intervals
        self.spacing = spacing
        self.teacher_sampler = teacher_sampler
        self.teacher_nfe = teacher_nfe
        self.teacher_options = dict(teacher_options or {})
        IntervalSolver.check(teacher_sampler, self.teacher_options)

    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        super().bind(schedule, data_shape, total_steps)
        spacing = self.spacing if self.spacing is not None else default_spacing(schedule)
        self.grid = time_grid(schedule, self.num_intervals, spacing, end="zero").flip(0)
        self.solver = IntervalSolver(self.teacher_sampler, schedule, self.teacher_nfe, self.teacher_options)

    def make_student(self, network: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                     guidance_embedding_dim: int | None = None) -> torch.nn.Module:
        if guidance_embedding_dim:
            raise ValueError("BOOT's student here takes no guidance embedding")
        return BootStudent(network, schedule, prediction_type)

    def save_student(self, folder: Any, student: torch.nn.Module, description: dict[str, Any], scheduler_config: Any = None) -> Any:
        from fewstep.distill.export import save_student

        return save_student(folder, student, {**description, "sampler_options": {}}, None)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_intervals": self.num_intervals, "grid": self.grid.tolist(),
                "teacher_sampler": self.teacher_sampler, "boundary": "exact start x_T = eps on the top interval"}

    def target(self, models: Models, eps: torch.Tensor, n: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """``sg(y_hat_s)`` (float64): the stop-gradient student at ``t = t_{n+1}`` (the noise itself
        on the top interval), one teacher step to ``s = t_n``, converted to the signal."""
        t, s = self.grid[n + 1], self.grid[n]
        top = (n + 1 == self.num_intervals).to(eps.device).reshape((-1,) + (1,) * (eps.ndim - 1))
        y_t = models.target(eps, t.to(eps.device), **cond).double()
        a, sg = _coefficients(self.schedule, t, eps)
        x_t = torch.where(top, eps.double(), a * y_t + sg * eps.double()).to(eps.dtype)
        x_s = self.solver(models.teacher, x_t, t, s, cond)
        return signal(self.schedule, x_s, eps, s)

    def loss(self, models: Models, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_BS`` of one micro-batch; ``batch.x0`` holds the noises ``eps`` (:class:`NoiseData`).
        The student runs first, the stop-gradient target after (see
        :meth:`fewstep.distill.objective.ConsistencyObjective.loss` on autocast's weight cache)."""
        eps = batch.x0
        n = randint(batch.gens, self.num_intervals)
        pred = models.student(eps, self.grid[n].to(eps.device), **batch.cond)
        with torch.no_grad():
            target = self.target(models, eps, n, batch.cond)
        loss = (pred.double() - target).flatten(1).square().mean(1).mean()
        return loss.float(), {}
