"""sCM's multistep consistency sampler (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sec. 2.2 and App. "sampling"; diffusers' ``SCMScheduler``).

In TrigFlow time (:class:`fewstep.schedules.TrigFlow`) each step predicts
``x_0 = f(x_{t_i}, t_i)`` and, unless it is the last, re-noises to the next angle:
``x_{t_{i+1}} = cos(t_{i+1}) x_0 + sin(t_{i+1}) z``, ``z ~ N(0, sigma_d^2 I)``.  The angles are
``(t_max, 1.3, 0)`` for two steps (sCM's intermediate time, ``intermediate_time``) and
``linspace(t_max, 0, n + 1)`` otherwise, ``t_max = pi/2``.  That is multistep consistency
sampling (:func:`fewstep.samplers.consistency.build_cm_multistep`'s routine) on this grid, so on
any other schedule the angles are mapped to the times of equal log-SNR
(:class:`fewstep.trigflow.TrigFlowMap`) and the re-noising is the schedule's forward process,
which is the same step in the other coordinates.  A schedule that never reaches zero SNR starts at
its own ``t_max`` (the largest angle it has) when ``max_time`` is beyond it, and evaluation angles
below the schedule's ``t_min`` are raised to it (a budget whose angles would then repeat is an
error naming the limit).
"""

from __future__ import annotations

import math

import torch

from fewstep.samplers.consistency import _multistep_cm
from fewstep.samplers.core import Program, Setup
from fewstep.samplers.registry import register
from fewstep.schedules import time_grid

__all__ = ["scm_angles"]


def scm_angles(num_steps: int, max_time: float = math.pi / 2, intermediate_time: float | None = 1.3) -> torch.Tensor:
    """The TrigFlow angles of diffusers' ``SCMScheduler.set_timesteps``: ``(max, intermediate, 0)``
    for two steps, else ``linspace(max, 0, n + 1)`` (float64)."""
    if num_steps == 2 and intermediate_time is not None:
        if not 0.0 < float(intermediate_time) < float(max_time):
            raise ValueError(f"scm: intermediate_time must lie in (0, max_time={max_time}), got {intermediate_time}")
        return torch.tensor([float(max_time), float(intermediate_time), 0.0], dtype=torch.float64)
    return torch.linspace(float(max_time), 0.0, num_steps + 1, dtype=torch.float64)


def _grid(setup: Setup) -> torch.Tensor:
    """The caller's spacing when given, else sCM's angles mapped onto the model's schedule."""
    from fewstep.trigflow import TrigFlowMap

    if setup.spacing is not None:
        return setup.grid(setup.nfe)
    opts = setup.options
    max_time = float(opts["max_time"])
    if not 0.0 < max_time <= math.pi / 2 + 1e-6:
        raise ValueError(f"scm: max_time is a TrigFlow angle in (0, pi/2], got {max_time}")
    tmap = TrigFlowMap(setup.schedule, float(opts["sigma_data"]))
    angles = scm_angles(setup.nfe, max_time, opts["intermediate_time"])
    evals = angles[:-1].clamp(tmap.t_min, tmap.t_max)  # the times the network was trained on
    if bool((evals[1:] >= evals[:-1]).any()):
        raise ValueError(
            f"scm: {setup.nfe} steps of sCM's uniform angles fall below the smallest angle {tmap.t_min:.4g} (or above the "
            f"largest {tmap.t_max:.4g}) the schedule's network was trained at, so evaluation times would repeat; use fewer "
            "steps (nfe), or give the grid with spacing=..."
        )
    times = tmap.time(torch.cat([evals, angles[-1:]]))
    times[-1] = setup.schedule.t_zero if setup.end == "zero" else setup.schedule.t_min
    return time_grid(setup.schedule, setup.nfe, times)


@register(
    name="scm",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=True,
    model_kind="consistency",
    paper="Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models (arXiv:2410.11081), sec. 2.2",
    summary="sCM multistep sampling: TrigFlow angles (pi/2, 1.3, 0) for 2 steps, uniform otherwise (diffusers' SCMScheduler)",
    options={"sigma_data": 0.5, "max_time": math.pi / 2, "intermediate_time": 1.3},
)
def build_scm(setup: Setup) -> Program:
    return _multistep_cm(setup, _grid(setup))
