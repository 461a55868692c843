"""DC-Solver: UniPC with dynamic compensation (Zhao, Wang, Zhou & Lu 2024, "DC-Solver: Improving
Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV 2024).

In UniPC the prediction ``m_i`` that the next steps use was evaluated at the *predicted* state,
not at the corrected one the solver continues from.  DC-Solver compensates the misalignment: at
step ``i`` it replaces ``m_i`` by the Lagrange polynomial through the last ``K + 1`` predictions
(``K = dc_order``, in the schedule's time) evaluated at

    tau_i = rho_i t_i + (1 - rho_i) t_{i-1},

so ``rho_i = 1`` is plain UniPC.  The ratios ``rho_i`` are fitted once per grid on a handful of
trajectories against a many-step reference trajectory *of the same model*, greedily
step after step (:func:`fit_dc_ratios`, the paper's search stage), and travel as plain data in the sampler options
(``dc_ratios``, with the grid they were fitted on, ``dc_grid``), so a fitted sampler is reused by
passing the options again, saved as JSON, or stored in a ``FewstepScheduler`` config.

**Order.**  With every ratio 1 the sampler is UniPC (order ``k + 1`` for ``dc_unipc_k``).  A ratio
``rho_i != 1`` moves the interpolation point by ``(1 - rho_i) h``, so the compensated prediction
differs from ``m_i`` by ``O(h)`` and the method is **first order** (measured slope 1.0-1.1 for a
fixed ratio 0.9, against 2.9 at ratio 1; ``tests/test_unipc.py``).  That is the trade the paper
makes: ratios fitted for one small budget and grid correct the error the solver actually makes
there, and say nothing about smaller steps, so the registry declares ``order=1`` and a fitted
sampler runs only with the budget and grid it was fitted on.

Fitting differs from the authors' code in the optimiser only: a bounded scalar search over each
``rho_i`` (a scan, then Brent's method) instead of 40 AdamW steps back-propagated through the
network, so no gradient of the model is needed.  The cascade polynomial regression that predicts
ratios without fitting (the paper's training-free variant) is not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fewstep.models.prediction import time_tensor
from fewstep.samplers._expint import lagrange_weights
from fewstep.samplers.core import Point, Program, Setup, model_schedule, prepare, run_program, validate_options
from fewstep.samplers.registry import available, register, spec
from fewstep.samplers.unipc import UniStep, arrive, history_depth, predict, unipc_routine, unipc_steps
from fewstep.schedules import NoiseSchedule, Spacing

__all__ = ["fit_dc_ratios", "compensation_weights"]

_PAPER = "Zhao et al. 2024, DC-Solver (ECCV 2024, arXiv:2409.03755), dynamic compensation with searched ratios"


def compensation_weights(pts: Sequence[Point], i: int, ratio: float, dc_order: int) -> tuple[float, ...]:
    """Weights over ``[m_i, m_{i-1}, ..., m_{i-K}]`` of the Lagrange interpolation at
    ``tau = ratio t_i + (1 - ratio) t_{i-1}``."""
    nodes = [pts[i - j].t for j in range(dc_order + 1)]
    tau = ratio * pts[i].t + (1.0 - ratio) * pts[i - 1].t
    return tuple(lagrange_weights(nodes, tau))


def _check_ratios(setup: Setup, grid: torch.Tensor) -> list[float]:
    """The ``dc_ratios`` option, checked against this program's budget and grid."""
    opts, name, n = setup.options, setup.spec.name, setup.nfe
    ratios = opts["dc_ratios"]
    if ratios is None:
        return [1.0] * n
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"{name}: dc_ratios must be a list of {n} numbers (from fit_dc_ratios), got {type(ratios).__name__}")
    if len(ratios) != n:
        raise ValueError(
            f"{name}: dc_ratios were fitted for nfe={len(ratios)}, not nfe={n}; a fitted DC-Solver runs only with the "
            "budget and grid it was fitted on: refit with fewstep.samplers.dc_solver.fit_dc_ratios(..., nfe=" f"{n})"
        )
    fitted = opts["dc_grid"]
    if fitted is not None:
        g = torch.as_tensor(fitted, dtype=torch.float64)
        if g.shape != grid.shape or not torch.allclose(g, grid, rtol=1e-9, atol=1e-9):
            raise ValueError(
                f"{name}: dc_ratios were fitted on the grid {[round(v, 4) for v in g.tolist()]}, but this run's grid is "
                f"{[round(v, 4) for v in grid.tolist()]}; pass the same spacing/end/t_start as when fitting "
                f"(or spacing=dc_grid), or refit"
            )
    return [float(r) for r in ratios]


def _plan(setup: Setup, order: int, ratios: Sequence[float] | None = None) -> tuple[torch.Tensor, list[Point], list[UniStep]]:
    """Grid, points and UniPC steps with the compensation of ``ratios`` (default: the options')."""
    opts = setup.options
    dc_order = int(opts["dc_order"])
    if dc_order < 1:
        raise ValueError(f"{setup.spec.name}: dc_order must be >= 1, got {dc_order}")
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    ratios = _check_ratios(setup, grid) if ratios is None else list(ratios)
    steps = unipc_steps(setup, pts, order, opts["solver_type"], corrector=bool(opts["corrector"]))
    out = []
    for i, st in enumerate(steps):
        comp = None
        if ratios[i] != 1.0:
            if i < dc_order or not all(math.isfinite(pts[i - j].lam) for j in range(dc_order + 1)):
                raise ValueError(
                    f"{setup.spec.name}: step {i} has dc_ratio {ratios[i]} but only {i + 1} predictions (dc_order={dc_order} "
                    f"needs {dc_order + 1}); the first {dc_order} ratios must be 1"
                )
            comp = compensation_weights(pts, i, ratios[i], dc_order)
        out.append(UniStep(st.predictor, st.corrector, comp, st.order))
    return grid, pts, out


_OPTIONS = {
    "solver_type": "bh2",
    "lower_order_final": True,
    "corrector": True,
    "dc_order": 2,
    "dc_ratios": None,
    "dc_grid": None,
    "orders": None,
}


def _register(order: int) -> None:
    @register(
        name=f"dc_unipc_{order}",
        family="dc_solver",
        order=1,  # with fitted ratios (ratios of 1 are UniPC-{order}, of order {order} + 1)
        evals_per_step=1,
        stochastic=False,
        model_kind="diffusion",
        paper=_PAPER,
        summary=(
            f"UniPC-{order} with dynamic compensation; with dc_ratios from fit_dc_ratios first order (tuned for one "
            f"budget and grid), without them plain UniPC-{order} (order {order + 1})"
        ),
        options=dict(_OPTIONS),
    )
    def build(setup: Setup) -> Program:
        grid, pts, steps = _plan(setup, order)
        return setup.program(grid, [p.t for p in pts[:-1]], unipc_routine(pts, steps), orders=[st.order for st in steps])


for _k in (2, 3):
    _register(_k)


# ---------------------------------------------------------------------------------------------
# Fitting the compensation ratios
# ---------------------------------------------------------------------------------------------


def _reference_states(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    schedule: NoiseSchedule,
    grid: torch.Tensor,
    cond: Mapping[str, Any],
    sampler: str,
    substeps: int,
) -> list[torch.Tensor]:
    """The model's own trajectory at every point of ``grid`` after the first, from ``x`` at
    ``grid[0]``: ``sampler`` over a fine grid that subdivides each interval into ``substeps``
    steps (uniformly in the square root of the time, which resolves the last interval to clean
    data)."""
    z = schedule.t_zero
    root = torch.sqrt(grid - z)
    fine = torch.cat(
        [z + torch.linspace(float(root[j]), float(root[j + 1]), substeps + 1, dtype=torch.float64)[:-1] ** 2 for j in range(len(grid) - 1)]
        + [grid[-1:]]
    )
    fine[:: substeps] = grid  # the coarse points exactly
    n_fine = len(fine) - 1
    extra = {"lower_order_final": False} if "lower_order_final" in spec(sampler).options else {}
    program = prepare(sampler, n_fine, schedule, spacing=fine, **extra)
    states: list[torch.Tensor] = []

    def keep(i: int, t: float, xi: torch.Tensor, x0: torch.Tensor) -> None:
        if i % substeps == 0 and i > 0:
            states.append(xi.clone())

    out, _ = run_program(program, denoiser, x, cond=cond, callback=keep)
    return states + [out]


def fit_dc_ratios(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sampler: str = "dc_unipc_3",
    nfe: int = 10,
    *,
    schedule: NoiseSchedule | None = None,
    spacing: Spacing | None = None,
    end: str = "zero",
    t_start: float | None = None,
    cond: Mapping[str, Any] | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_substeps: int = 20,
    ratio_range: tuple[float, float] = (0.0, 2.0),
    **options: Any,
) -> dict[str, Any]:
    """Fit DC-Solver's compensation ratios for one budget and grid (the paper's search stage).

    The model's own many-step trajectory from ``noise`` (``reference_sampler`` with
    ``reference_substeps`` steps per interval of the sampler's grid; the paper uses a 200-step
    DDIM) gives the target state at every grid point.  Then, step after step, ``rho_i`` minimises
    the mean squared distance between the solver's state at ``t_{i+1}`` (after its corrector,
    which costs one evaluation per trial) and the reference, with the earlier ratios fixed: a scan
    of ``ratio_range`` in steps of 0.1, then Brent's method around the best point.

    Args:
        denoiser, noise, schedule, spacing, end, t_start, cond: as for :func:`fewstep.sample`;
            ``noise`` is a handful of trajectories (the paper uses 10).
        sampler: ``dc_unipc_2`` or ``dc_unipc_3``.
        nfe: the budget the ratios are for.
        options: other options of the sampler (``solver_type``, ``dc_order``, ...).

    Returns:
        The sampler options, with ``dc_ratios`` (one per step) and ``dc_grid`` (the grid they
        belong to) filled in: plain data, for ``fewstep.sample(..., **options)``, JSON, or
        ``FewstepScheduler(sampler=..., sampler_options=options)``.
    """
    from scipy.optimize import minimize_scalar

    s = spec(sampler)
    if s.family != "dc_solver":
        raise ValueError(f"fit_dc_ratios fits a DC-Solver sampler ({', '.join(available(family='dc_solver'))}), got {sampler!r}")
    schedule = model_schedule(denoiser, schedule)
    for k in ("dc_ratios", "dc_grid"):
        if options.get(k) is not None:
            raise ValueError(f"{k} is what fit_dc_ratios computes; do not pass it")
    if not (isinstance(reference_substeps, int) and reference_substeps >= 2):
        raise ValueError(f"reference_substeps must be an integer >= 2, got {reference_substeps!r}")
    lo, hi = (float(v) for v in ratio_range)
    if not lo < 1.0 < hi:
        raise ValueError(f"ratio_range must contain 1 (plain UniPC) strictly inside, got {ratio_range}")
    program = prepare(sampler, nfe, schedule, spacing=spacing, end=end, t_start=t_start, **options)
    opts = validate_options(s, options)
    setup = Setup(s, schedule, nfe, opts, spacing, end, t_start)
    order = int(sampler.rsplit("_", 1)[1])
    cond = dict(cond or {})
    work = torch.promote_types(noise.dtype, torch.float32)
    x_start = program.initial_state(noise.to(work))
    grid = program.grid
    refs = _reference_states(denoiser, x_start, schedule, grid, cond, reference_sampler, reference_substeps)
    dc_order = int(opts["dc_order"])
    ratios = [1.0] * nfe
    _, pts, base = _plan(setup, order, ratios)
    depth = history_depth(base) + dc_order + 1

    def evaluate(x: torch.Tensor, i: int) -> torch.Tensor:
        out = denoiser(x.to(noise.dtype), time_tensor(pts[i].t, x.device), **cond).to(work)
        return program.x0_transform(out) if program.x0_transform is not None else out

    # Walk the trajectory, fitting rho_i before leaving point i.
    x_seen, x_prev, hist = x_start, None, []
    for i in range(nfe):
        hist = [evaluate(x_seen, i), *hist[: depth - 1]]
        if i >= dc_order and all(math.isfinite(pts[i - j].lam) for j in range(dc_order + 1)):

            def loss(r: float, i: int = i, x_prev: torch.Tensor | None = x_prev, hist: list = hist) -> float:
                trial = [*ratios[:i], r, *ratios[i + 1 :]]
                steps = _plan(setup, order, trial)[2]
                x_i, h = arrive(steps, i, x_seen, x_prev, hist)
                x_next = predict(steps[i], x_i, h)
                if steps[i].corrector is not None:  # the corrected state at t_{i+1}
                    x_next, _ = arrive(steps, i + 1, x_next, x_i, [evaluate(x_next, i + 1), *h])
                return float(torch.mean((x_next - refs[i]) ** 2))

            scan = np.arange(lo, hi + 1e-9, 0.1)
            vals = [loss(float(r)) for r in scan]
            j = int(np.argmin(vals))
            a, b = float(scan[max(j - 1, 0)]), float(scan[min(j + 1, len(scan) - 1)])
            best = minimize_scalar(loss, bounds=(a, b), method="bounded", options={"xatol": 1e-3})
            ratios[i] = float(best.x) if best.fun <= vals[j] else float(scan[j])
        steps = _plan(setup, order, ratios)[2]
        x_prev, hist = arrive(steps, i, x_seen, x_prev, hist)
        x_seen = predict(steps[i], x_prev, hist)
    return {**options, "dc_ratios": ratios, "dc_grid": grid.tolist()}
