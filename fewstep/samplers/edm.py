"""Euler and Heun on the probability-flow ODE in the EDM form (Karras, Aittala, Aila & Laine 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1, deterministic).

With ``y = x / alpha`` and ``rho = sigma / alpha`` the ODE of any schedule is the EDM one,
``dy/drho = (y - D) / rho`` (the paper's eq. 4 with scaling ``s(t) = alpha`` and noise level ``rho``), so for the EDM schedule
(``alpha = 1``, ``rho = sigma``) these are k-diffusion's ``sample_euler`` / ``sample_heun`` on the
same sigmas.  A step from ``rho_i`` to ``rho_{i+1}``:

* Euler: ``y' = y_i + (rho_{i+1} - rho_i) d_i``, ``d_i = (y_i - D_i) / rho_i``
  -- in ``x`` this is exactly DDIM, ``x' = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - rho_{i+1}/rho_i) D_i``;
* Heun: then ``D'`` at ``(alpha_{i+1} y', t_{i+1})``, ``d' = (y' - D') / rho_{i+1}`` and
  ``y_{i+1} = y_i + (rho_{i+1} - rho_i) (d_i + d') / 2``; a step onto clean data
  (``rho_{i+1} = 0``) is an Euler step, as in the paper and k-diffusion.

**Budget.** Heun costs two evaluations per step and one for a final step onto clean data, so
k-diffusion's ``n``-step Heun to sigma = 0 is ``nfe = 2n - 1``.  Other budgets are met exactly by
making the *first* step an Euler step (where the trajectory is nearly straight); with an explicit
grid (``spacing=[...]``) the grid fixes the steps and the budget must match it.
"""

from __future__ import annotations

from fewstep.samplers._expint import Interval, Stage, ddim_coefficients, runge_kutta_routine
from fewstep.samplers.core import Point, Program, Setup
from fewstep.samplers.registry import register

_PAPER = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, Algorithm 1"


def _euler_interval(s: Point, t: Point) -> Interval:
    c_x, c_d, _ = ddim_coefficients(s, t)
    return Interval((Stage(s.t),), c_x, (c_d,))


def _heun_interval(s: Point, t: Point) -> Interval:
    """Heun's step as ``x_{i+1} = c_x x_i + w_0 D_i + w_1 D'``.  Substituting ``d_i`` and ``d'``
    (with ``a = rho_{i+1} - rho_i``) gives ``y_{i+1} = (rho_{i+1}/rho_i) y_i
    - a (2 rho_{i+1} - rho_i) / (2 rho_i rho_{i+1}) D_i - a / (2 rho_{i+1}) D'``; times ``alpha_{i+1}``."""
    r_s, r_t = s.sigma / s.alpha, t.sigma / t.alpha
    a = r_t - r_s
    euler = _euler_interval(s, t)
    stage2 = Stage(t.t, euler.c_x, euler.w)  # x' = alpha_{i+1} y', the Euler prediction
    w0 = -t.alpha * a * (2.0 * r_t - r_s) / (2.0 * r_s * r_t)
    w1 = -t.alpha * a / (2.0 * r_t)
    return Interval((Stage(s.t), stage2), t.sigma / s.sigma, (w0, w1))


def heun_plan(num_evals: int, ends_on_data: bool, zero_snr_start: bool = False) -> tuple[int, int]:
    """``(euler_first, heun_steps)`` for a budget: ``euler_first`` Euler steps first (one when the
    parity needs it), then Heun steps, then (when the grid ends on clean data) one Euler step.  A
    start at zero SNR (``rho = inf``, where Heun's ``d_i`` is undefined) always begins with Euler:
    two Euler steps replace one Heun step if the parity gives none."""
    rest = num_evals - (1 if ends_on_data else 0)
    euler_first, heun_steps = rest % 2, rest // 2
    if zero_snr_start and euler_first == 0 and heun_steps > 0:
        euler_first, heun_steps = 2, heun_steps - 1
    return euler_first, heun_steps


def _zero_snr(setup: Setup, t: float) -> bool:
    """Whether ``t`` is a zero-SNR time (``alpha = 0``, ``rho = inf``) of the setup's schedule."""
    return setup.schedule.alpha(float(t)) == 0.0


@register(
    name="heun",
    family="edm",
    order=2,
    evals_per_step=2,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + " (Heun steps, S_churn = 0)",
    summary="EDM's deterministic Heun sampler (k-diffusion sample_heun); nfe = 2n - 1 is n steps to sigma = 0",
)
def build_heun(setup: Setup) -> Program:
    to_data = setup.ends_on_data()
    explicit = setup.explicit_grid
    if explicit is not None:
        n_steps = len(explicit) - 1
        euler_first = 1 if _zero_snr(setup, float(explicit[0])) else 0
        needed = euler_first + 2 * (n_steps - euler_first - to_data) + to_data
        if setup.nfe != needed:
            raise ValueError(
                f"heun: the given grid of {n_steps} steps costs nfe={needed} (two evaluations per Heun step"
                f"{', one for the final Euler step onto clean data' if to_data else ''}), got nfe={setup.nfe}; "
                f"pass nfe={needed}, or a spacing name to let the budget choose the grid"
            )
        grid = setup.grid(n_steps)
    else:
        # Whether the grid starts at zero SNR is read from the grid itself (a setup may choose its
        # own first time: a t_start, a leading spacing, an interval of a distillation grid); a
        # zero-SNR start re-plans the budget with Euler first steps.
        zero_snr = False
        while True:
            euler_first, heun_steps = heun_plan(setup.nfe, to_data, zero_snr)
            n_steps = euler_first + heun_steps + (1 if to_data else 0)
            grid = setup.grid(n_steps)
            if zero_snr or not _zero_snr(setup, grid[0]):
                break
            zero_snr = True
    pts = setup.points(grid)
    intervals = []
    for i in range(n_steps):
        s, t = pts[i], pts[i + 1]
        euler = i < euler_first or (to_data and i == n_steps - 1)
        intervals.append(_euler_interval(s, t) if euler else _heun_interval(s, t))
    return setup.program(grid, [st.t for iv in intervals for st in iv.stages], runge_kutta_routine(intervals))


@register(
    name="euler",
    family="edm",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + " (Euler steps, S_churn = 0)",
    summary="EDM's Euler sampler (k-diffusion sample_euler); the same map as DDIM, written in rho = sigma/alpha",
)
def build_euler(setup: Setup) -> Program:
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    intervals = [_euler_interval(pts[i], pts[i + 1]) for i in range(setup.nfe)]
    return setup.program(grid, [p.t for p in pts[:-1]], runge_kutta_routine(intervals))
