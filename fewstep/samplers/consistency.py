"""Multistep samplers for consistency-type models: CM, LCM, TCD, segment-wise MCD and CTM.

The model is a *consistency function* ``f(x, t) -> x0_hat`` (``model_kind="consistency"``: the
denoiser slot of :func:`fewstep.sample` holds ``f``, with any boundary condition already applied,
as :class:`fewstep.distill.student.ConsistencyStudent` does).  Every sampler here follows one rule
per step, from the evaluation time ``t_i``:

1. predict: ``f = f(x, t_i)`` (CTM: ``g(x, t_i, s)``, its jump prediction towards ``s``);
2. move to a time ``s_i <= t_{i+1}`` along the DDIM line, ``x_s = (sigma_s/sigma_t) x + alpha_s
   (1 - e^{-(lambda_s - lambda_t)}) f`` (``x_s = f`` when ``s_i`` is clean data);
3. unless it is the last step, re-noise from ``s_i`` to ``t_{i+1}`` with the forward process
   (``_expint.forward_transition``).

The samplers differ in ``s_i`` and in their default grid:

* ``cm_multistep`` -- Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 1:
  ``s_i`` is the boundary time (clean data, or ``boundary_time``, CM's epsilon), and ``x_s = f``:
  the consistency function's value is taken as the state at ``epsilon`` itself, as the algorithm
  does (step 2 is skipped; at a boundary on clean data the two coincide).
* ``lcm`` -- Luo et al. 2023, "Latent Consistency Models", Algorithm 3: the same, on LCM's
  skipping-step timesteps (diffusers' ``LCMScheduler`` with ``original_inference_steps``).
* ``tcd`` -- Zheng et al. 2024, "Trajectory Consistency Distillation", strategic stochastic sampling:
  ``s_i = (1 - gamma) t_{i+1}`` (on a discrete schedule the training timestep
  ``floor((1 - gamma) t_{i+1})``, as diffusers' ``TCDScheduler``); ``gamma = 0`` is DDIM with the
  model's predictions, ``gamma = 1`` is ``cm_multistep``.
* ``mcd`` -- Heek, Hoogeboom & Salimans 2024, "Multistep Consistency Models", sampling (and Xie
  et al. 2024, MLCM): deterministic DDIM steps between the edges of the model's segments; a budget
  above the number of segments splits segments into steps uniform in time, one below it skips
  edges (evenly).
* ``ctm`` -- Kim et al. 2024, "Consistency Trajectory Models", gamma-sampling: the
  model jumps to ``s_i`` with ``sigma_s/alpha_s = sqrt(1 - gamma^2) sigma_{t_{i+1}}/alpha_{t_{i+1}}``
  and is told ``s_i``; ``gamma = 0`` follows the model's own ODE jumps, ``gamma = 1`` is
  ``cm_multistep``.  CTM's ``G(x, t, s) = (s/t) x + (1 - s/t) g`` is exactly step 2 with ``f = g``,
  so the model slot holds ``g`` (the denoiser declares ``takes_target_time = True`` and is called
  as ``g(x, t, s=s)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.samplers._expint import combine, ddim_coefficients, forward_transition
from fewstep.samplers.core import Eval, NoiseSource, Point, Program, Routine, Setup
from fewstep.samplers.registry import register
from fewstep.schedules import VPDiscrete, time_grid

__all__ = ["JumpStep", "jump_routine", "lcm_timesteps"]


@dataclass(frozen=True)
class JumpStep:
    """Evaluate at ``t`` (telling the model ``s`` if it takes it), ``x_s = jump[0] x + jump[1] f``,
    then (unless ``renoise`` is None) ``x = renoise[0] x_s + renoise[1] z``."""

    t: float
    jump: tuple[float, float]
    renoise: tuple[float, float] | None
    s: float | None = None


def jump_routine(steps: Sequence[JumpStep]) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        for st in steps:
            x_seen, f = yield Eval(x, st.t, s=st.s)
            x = combine(x_seen, st.jump[0], [(st.jump[1], f)])
            if st.renoise is not None:
                x.mul_(st.renoise[0])
                if st.renoise[1]:
                    x.add_(noise.randn_like(x), alpha=st.renoise[1])
        return x

    return routine


def _steps(pts: Sequence[Point], targets: Sequence[Point], with_s: bool = False) -> list[JumpStep]:
    """Jump from ``pts[i]`` to ``targets[i]``, then re-noise to ``pts[i+1]`` (not after the last,
    nor where the target is ``pts[i+1]`` itself: deterministic DDIM steps such as ``mcd``'s)."""
    n = len(targets)
    out = []
    for i in range(n):
        c_x, c_d, _ = ddim_coefficients(pts[i], targets[i])
        renoise = forward_transition(targets[i], pts[i + 1]) if i < n - 1 and targets[i].t != pts[i + 1].t else None
        out.append(JumpStep(pts[i].t, (c_x, c_d), renoise, targets[i].t if with_s else None))
    return out


def lcm_timesteps(num_train_timesteps: int, num_steps: int, original_steps: int) -> list[float]:
    """LCM's skipping-step timesteps (Luo et al. 2023; diffusers' ``LCMScheduler``):
    ``num_steps`` of the ``original_steps`` evenly spaced training timesteps ``k c - 1``
    (``c = N // original_steps``), taken at evenly spaced indices from the noisiest."""
    if original_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps={original_steps} exceeds the {num_train_timesteps} training timesteps")
    if num_steps > original_steps:
        raise ValueError(
            f"lcm takes its {num_steps} timesteps from a schedule of original_inference_steps={original_steps}; "
            f"raise original_inference_steps to at least {num_steps}, or pass a spacing"
        )
    c = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * c - 1)[::-1]
    idx = np.floor(np.linspace(0, original_steps, num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float64).tolist()


def _grid(setup: Setup) -> torch.Tensor:
    """The step grid: the caller's spacing; on a discrete schedule LCM's timesteps by default."""
    sch = setup.schedule
    if setup.spacing is None and isinstance(sch, VPDiscrete) and setup.t_start is None:
        ts = lcm_timesteps(sch.num_train_timesteps, setup.nfe, int(setup.options["original_inference_steps"]))
        end = sch.t_zero if setup.end == "zero" else sch.t_min
        if ts[-1] <= end:
            raise ValueError(f"{setup.spec.name}: LCM's last timestep {ts[-1]} is not above the end time {end}; use end='zero'")
        return time_grid(sch, setup.nfe, ts + [end])
    return setup.grid(setup.nfe)


def _point(setup: Setup, t: float) -> Point:
    return setup.points([t])[0]


def _boundary(setup: Setup) -> Point:
    b = setup.options.get("boundary_time")
    if b is None:
        return _point(setup, setup.schedule.t_zero)
    setup.schedule.check_time(float(b), "boundary_time")
    return _point(setup, float(b))


def _gamma(setup: Setup) -> float:
    g = float(setup.options["gamma"])
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"{setup.spec.name}: gamma must be in [0, 1] (0: deterministic, 1: re-noise fully), got {g}")
    return g


def _multistep_cm(setup: Setup, grid: torch.Tensor) -> Program:
    """Song et al. 2023, Algorithm 1: ``x <- f(x, tau_n)``, the consistency function's value, *is* the
    estimate at the boundary time ``epsilon`` (no move along the DDIM line from it); the next state
    is its forward transition from ``epsilon`` to ``tau_{n+1}`` (``x + sqrt(tau^2 - eps^2) z`` on
    EDM), and the last ``f`` is the sample."""
    pts = setup.points(grid)
    b = _boundary(setup)
    if any(p.t < b.t for p in pts[:-1]):
        raise ValueError(f"{setup.spec.name}: every evaluation time must lie above boundary_time={b.t}")
    n = setup.nfe
    steps = [JumpStep(pts[i].t, (0.0, 1.0), forward_transition(b, pts[i + 1]) if i < n - 1 else None) for i in range(n)]
    return setup.program(grid, [st.t for st in steps], jump_routine(steps), stochastic=setup.nfe > 1)


_CM_PAPER = "Song et al. 2023, Consistency Models (ICML 2023), Algorithm 1"


@register(
    name="cm_multistep",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=True,
    model_kind="consistency",
    paper=_CM_PAPER,
    summary="multistep consistency sampling: predict x0, re-noise to the next time; boundary_time is CM's epsilon",
    options={"boundary_time": None},
)
def build_cm_multistep(setup: Setup) -> Program:
    return _multistep_cm(setup, setup.grid(setup.nfe))


@register(
    name="lcm",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=True,
    model_kind="consistency",
    paper="Luo et al. 2023, Latent Consistency Models (arXiv:2310.04378), Algorithm 3",
    summary="multistep latent consistency sampling on LCM's skipping-step timesteps (diffusers' LCMScheduler)",
    options={"original_inference_steps": 50},
)
def build_lcm(setup: Setup) -> Program:
    return _multistep_cm(setup, _grid(setup))


def _tcd_target(setup: Setup, t_next: float, gamma: float) -> float:
    sch = setup.schedule
    if t_next <= sch.t_zero:
        return sch.t_zero
    if isinstance(sch, VPDiscrete):  # the training-timestep index, as TCD is trained and diffusers samples
        s = (1.0 - gamma) * t_next
        if t_next == round(t_next):  # on integer timesteps, an integer timestep (diffusers' floor)
            s = math.floor(s + 1e-9)
        return float(max(s, sch.t_zero))
    return sch.t_zero + (1.0 - gamma) * (t_next - sch.t_zero)


@register(
    name="tcd",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=True,
    model_kind="consistency",
    paper="Zheng et al. 2024, Trajectory Consistency Distillation (arXiv:2402.19159), strategic stochastic sampling",
    summary="TCD's gamma sampling: jump to s = (1 - gamma) t_next along DDIM, re-noise to t_next (diffusers' TCDScheduler)",
    options={"gamma": 0.3, "original_inference_steps": 50},
)
def build_tcd(setup: Setup) -> Program:
    gamma = _gamma(setup)
    grid = _grid(setup)
    pts = setup.points(grid)
    targets = setup.points([_tcd_target(setup, p.t, gamma) for p in pts[1:]])
    steps = _steps(pts, targets)
    return setup.program(grid, [st.t for st in steps], jump_routine(steps), stochastic=gamma > 0)


def _segment_grid(setup: Setup) -> torch.Tensor:
    """The edges of the model's segments, subdivided or thinned to the budget (see module doc)."""
    opts, n = setup.options, setup.nfe
    if opts["edges"] is not None:
        if opts["segments"] is not None:
            raise ValueError("mcd: pass segments or edges, not both")
        edges = torch.as_tensor(opts["edges"], dtype=torch.float64).flatten()
        edges = time_grid(setup.schedule, len(edges) - 1, edges)  # validates the list
    else:
        segments = opts["segments"]
        if segments is None:
            segments = n
        if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
            raise ValueError(f"mcd: segments must be a positive integer (the model's number of segments), got {segments!r}")
        edges = setup.grid(segments)
    k = len(edges) - 1
    if n <= k:  # thin: evenly spread edges (every k/n-th when n divides k)
        idx = sorted({int(math.floor(j * k / n)) for j in range(n)} | {k})
        return edges[idx]
    per = [n // k + (1 if j < n % k else 0) for j in range(k)]  # extra steps to the noisiest segments
    parts = [torch.linspace(float(edges[j]), float(edges[j + 1]), per[j] + 1, dtype=torch.float64)[:-1] for j in range(k)]
    return torch.cat(parts + [edges[-1:]])


@register(
    name="mcd",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=False,
    model_kind="consistency",
    paper="Heek, Hoogeboom & Salimans 2024, Multistep Consistency Models (arXiv:2403.06807), multistep sampling",
    summary="segment-wise multistep consistency: deterministic DDIM steps between segment edges (segments or edges)",
    options={"segments": None, "edges": None},
)
def build_mcd(setup: Setup) -> Program:
    grid = _segment_grid(setup)
    pts = setup.points(grid)
    steps = _steps(pts, pts[1:])
    return setup.program(grid, [st.t for st in steps], jump_routine(steps))


def _ctm_target(setup: Setup, p_next: Point, gamma: float) -> float:
    if gamma == 1.0 or p_next.sigma == 0.0:
        return setup.schedule.t_zero
    if gamma == 0.0:
        return p_next.t
    return float(setup.schedule.t_from_lambda(p_next.lam - math.log(math.sqrt(1.0 - gamma * gamma))))


@register(
    name="ctm",
    family="consistency",
    order=0,
    evals_per_step=1,
    stochastic=False,
    model_kind="consistency",
    paper="Kim et al. 2024, Consistency Trajectory Models (ICLR 2024), gamma-sampling",
    summary=(
        "CTM gamma-sampling with a model g(x, t, s=...); gamma=0 (default) follows its jumps deterministically, "
        "gamma > 0 re-noises (stochastic), gamma=1 is cm_multistep"
    ),
    options={"gamma": 0.0},
    push_style=False,
    needs=("target_time",),
)
def build_ctm(setup: Setup) -> Program:
    gamma = _gamma(setup)
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    targets = setup.points([_ctm_target(setup, p, gamma) for p in pts[1:]])
    steps = _steps(pts, targets, with_s=True)
    return setup.program(grid, [st.t for st in steps], jump_routine(steps), stochastic=gamma > 0)
