"""Consistency distillation, CD (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
ICML 2023, Algorithm 2).

The pair is one teacher ODE step over an interval of a fixed grid: ``x_hat_n`` solves the
teacher's probability-flow ODE from ``x_{n+1}`` at ``tau_{n+1}`` to ``tau_n`` with a registered
deterministic sampler (:class:`fewstep.distill.teacher.IntervalSolver`): the paper's Heun step is the
registry's ``heun`` (EDM's Heun, two evaluations), and the default ``dpmpp_2s`` is its
exponential-integrator analogue (also two evaluations).  The target network
is an EMA of the student (``target_ema = mu``, the paper's 0.95 for CIFAR-10 with N = 18) or the
student under stop-gradient (``target_ema = 0``).  The student is sampled with multistep
consistency sampling (Algorithm 1), the registry's ``cm_multistep``.

The student's boundary condition is :class:`fewstep.distill.student.BoundaryCondition` at the first
grid point (``end="zero"``: clean data, e.g. timestep -1 on a discrete VP schedule; ``end="min"``:
``t_min``) with ``kappa = boundary_scale`` (default 10) in model timesteps, not in noise level: see
:mod:`fewstep.distill.student` for what a given ``kappa`` means on each schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fewstep.distill.objective import Batch, ConsistencyObjective, Models
from fewstep.distill.teacher import IntervalSolver
from fewstep.schedules import NoiseSchedule, Spacing, default_spacing, time_grid

__all__ = ["CD"]


class CD(ConsistencyObjective):
    """Consistency distillation.

    Args:
        num_intervals: ``N``, intervals of the training grid.
        spacing: grid spacing (default: the schedule's default, :func:`fewstep.schedules.default_spacing`).
        end: ``"zero"`` (the boundary is clean data) or ``"min"`` (the schedule's ``t_min``, CM's epsilon).
        teacher_sampler: registry name of the teacher's ODE step.
        teacher_nfe: evaluations per interval (default: the sampler's evaluations per step).
        teacher_options: options of that sampler.
        loss, loss_c, target_ema, boundary_scale, sigma_data: see :class:`ConsistencyObjective`.
    """

    name = "cd"
    paper = "Song et al. 2023, Consistency Models, Algorithm 2"
    sampler = "cm_multistep"

    def __init__(
        self,
        num_intervals: int = 18,
        *,
        spacing: Spacing | None = None,
        end: str = "zero",
        teacher_sampler: str = "dpmpp_2s",
        teacher_nfe: int | None = None,
        teacher_options: Mapping[str, Any] | None = None,
        **common: Any,
    ):
        super().__init__(**common)
        if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
            raise ValueError(f"num_intervals must be a positive integer, got {num_intervals!r}")
        if end not in ("zero", "min"):
            raise ValueError(f"end must be 'zero' (clean data) or 'min' (the schedule's t_min), got {end!r}")
        self.num_intervals = num_intervals
        self.spacing = spacing
        self.end = end
        self.teacher_sampler = teacher_sampler
        self.teacher_nfe = teacher_nfe
        self.teacher_options = dict(teacher_options or {})
        IntervalSolver.check(teacher_sampler, self.teacher_options)  # fail at construction, not at step 1

    def make_grid(self, schedule: NoiseSchedule) -> torch.Tensor:
        """The training grid, increasing: ``time_grid(schedule, N, spacing, end)`` reversed."""
        spacing = self.spacing if self.spacing is not None else default_spacing(schedule)
        return time_grid(schedule, self.num_intervals, spacing, end=self.end).flip(0)

    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        """Attach the schedule and shape, build the grid and the teacher's interval solver."""
        super().bind(schedule, data_shape, total_steps)
        self.grid = self.make_grid(schedule)
        self.solver = IntervalSolver(self.teacher_sampler, schedule, self.teacher_nfe, self.teacher_options)

    def boundary_time(self) -> float:
        """The first grid point: clean data (``end="zero"``) or ``t_min`` (``end="min"``)."""
        return float(self.grid[0])

    def grid_at(self, step: int) -> torch.Tensor:
        """The fixed grid (CD has no curriculum)."""
        return self.grid

    def teacher_denoiser(self, models: Models) -> Any:
        """The denoiser the teacher's ODE step calls (LCD wraps it in guidance)."""
        return models.teacher

    def teacher_cond(self, batch: Batch, extras: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the teacher's calls: the data's conditioning."""
        return dict(batch.cond)

    def lower_point(self, models: Models, batch: Batch, x_hi: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, eps: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """``x_hat_n``: the teacher's ODE step from ``x_{n+1}`` at ``t_hi`` to ``t_lo`` (per sample)."""
        return self.solver(self.teacher_denoiser(models), x_hi, t_hi, t_lo, self.teacher_cond(batch, extras))

    def sampler_options(self) -> dict[str, Any]:
        """``cm_multistep``'s ``boundary_time`` when the grid stops at ``t_min``."""
        return {} if self.end == "zero" else {"boundary_time": self.boundary_time()}

    def describe(self) -> dict[str, Any]:
        """The base description plus the grid and the teacher's step."""
        return {
            **super().describe(),
            "grid": self.grid.tolist(),
            "teacher_step": {"sampler": self.teacher_sampler, "nfe": self.solver.nfe, "options": self.teacher_options},
        }
