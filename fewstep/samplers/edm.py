"""Euler, Heun and DPM-2 on the probability-flow ODE in the EDM form (Karras, Aittala, Aila & Laine
2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Algorithms 1 and 2),
with EDM's churn (``S_churn``, ``S_tmin``, ``S_tmax``, ``S_noise``), as k-diffusion's
``sample_euler`` / ``sample_heun`` / ``sample_dpm_2``.

With ``y = x / alpha`` and ``rho = sigma / alpha`` the ODE of any schedule is the EDM one,
``dy/drho = (y - D) / rho`` (the paper's eq. 4 with scaling ``s(t) = alpha`` and noise level ``rho``), so for the EDM schedule
(``alpha = 1``, ``rho = sigma``) these are k-diffusion's samplers on the same sigmas.  A step from
``rho_i`` to ``rho_{i+1}``:

* churn (Algorithm 2, lines 4-6): with ``gamma_i = min(S_churn / N, sqrt(2) - 1)`` when
  ``S_tmin <= rho_i <= S_tmax`` (else 0), the state is first noised up to
  ``rho_hat = (1 + gamma_i) rho_i`` (the forward process, ``S_noise`` times the fresh noise), and
  the step starts from ``rho_hat``;
* Euler: ``y' = y_i + (rho_{i+1} - rho_i) d_i``, ``d_i = (y_i - D_i) / rho_i``
  -- in ``x`` this is exactly DDIM, ``x' = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} (1 - rho_{i+1}/rho_i) D_i``;
* Heun: then ``D'`` at ``(alpha_{i+1} y', t_{i+1})``, ``d' = (y' - D') / rho_{i+1}`` and
  ``y_{i+1} = y_i + (rho_{i+1} - rho_i) (d_i + d') / 2``;
* DPM-2 (k-diffusion's "DPM-Solver-2 inspired" step): the Euler step to the geometric midpoint
  ``rho_mid = sqrt(rho_i rho_{i+1})``, ``D'`` there, and ``y_{i+1} = y_i + (rho_{i+1} - rho_i) d'``;
* a step onto clean data (``rho_{i+1} = 0``) is an Euler step, as in the paper and k-diffusion.

**Budget.** Heun and DPM-2 cost two evaluations per step and one for a final step onto clean data,
so k-diffusion's ``n``-step run to sigma = 0 is ``nfe = 2n - 1`` (``steps=n``).  Other budgets are met exactly by
making the *first* step an Euler step (where the trajectory is nearly straight); with an explicit
grid (``spacing=[...]``) the grid fixes the steps and the budget must match it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fewstep.samplers._expint import Interval, Stage, churn_gamma, ddim_coefficients, forward_transition, runge_kutta_routine
from fewstep.samplers.core import Point, Program, Setup, nonnegative_options
from fewstep.samplers.registry import register

_PAPER = "Karras et al. 2022, Elucidating the Design Space of Diffusion-Based Generative Models, Algorithms 1-2"
_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def euler_interval(s: Point, t: Point) -> Interval:
    c_x, c_d, _ = ddim_coefficients(s, t)
    return Interval((Stage(s.t),), c_x, (c_d,))


def _rho(p: Point) -> float:
    return p.sigma / p.alpha if p.alpha > 0 else math.inf


def _heun_interval(setup: Setup, s: Point, t: Point) -> Interval:
    """Heun's step as ``x_{i+1} = c_x x_i + w_0 D_i + w_1 D'``.  Substituting ``d_i`` and ``d'``
    (with ``a = rho_{i+1} - rho_i``) gives ``y_{i+1} = (rho_{i+1}/rho_i) y_i
    - a (2 rho_{i+1} - rho_i) / (2 rho_i rho_{i+1}) D_i - a / (2 rho_{i+1}) D'``; times ``alpha_{i+1}``."""
    r_s, r_t = _rho(s), _rho(t)
    a = r_t - r_s
    euler = euler_interval(s, t)
    stage2 = Stage(t.t, euler.c_x, euler.w)  # x' = alpha_{i+1} y', the Euler prediction
    w0 = -t.alpha * a * (2.0 * r_t - r_s) / (2.0 * r_s * r_t)
    w1 = -t.alpha * a / (2.0 * r_t)
    return Interval((Stage(s.t), stage2), t.sigma / s.sigma, (w0, w1))


def point_at_rho(setup: Setup, rho: float) -> Point:
    """The schedule's point whose ``sigma / alpha`` is ``rho``; an error if the schedule has none
    (a level above its noisiest time)."""
    p = setup.points([setup.schedule.t_from_lambda(-math.log(rho))])[0]
    if not math.isclose(_rho(p), rho, rel_tol=1e-9):
        raise ValueError(
            f"{setup.spec.name}: this schedule has no time at noise level sigma/alpha = {rho:.6g} (its range ends at "
            f"{_rho(setup.points([setup.schedule.t_max])[0]):.6g}); with churn, lower s_churn or set s_tmax below the start"
        )
    return p


def dpm2_interval(setup: Setup, s: Point, t: Point) -> Interval:
    """k-diffusion's DPM-2 step from ``s`` to ``t`` (``rho_t > 0``): Euler to the geometric midpoint
    ``rho_m = sqrt(rho_s rho_t)``, then ``y_t = y_s + a d'``, ``a = rho_t - rho_s``, with
    ``d' = (y_m - D') / rho_m`` and ``y_m = (rho_m / rho_s) y_s + (1 - rho_m / rho_s) D_s``:
    ``y_t = (rho_t / rho_s) y_s + a (1/rho_m - 1/rho_s) D_s - (a / rho_m) D'``; times ``alpha_t``."""
    r_s, r_t = _rho(s), _rho(t)
    m = point_at_rho(setup, math.sqrt(r_s * r_t))
    r_m, a = _rho(m), r_t - r_s
    to_mid = euler_interval(s, m)
    stage2 = Stage(m.t, to_mid.c_x, to_mid.w)
    return Interval((Stage(s.t), stage2), t.sigma / s.sigma, (t.alpha * a * (1.0 / r_m - 1.0 / r_s), -t.alpha * a / r_m))


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


def two_stage_grid(setup: Setup) -> tuple[object, int, int]:
    """``(grid, euler_first, n_steps)`` of a sampler with two evaluations per step, one for a
    final step onto clean data and (by :func:`heun_plan`) Euler first steps for the parity and
    at a zero-SNR start."""
    to_data = setup.ends_on_data()
    explicit = setup.explicit_grid
    if explicit is not None:
        n_steps = len(explicit) - 1
        euler_first = 1 if _zero_snr(setup, float(explicit[0])) else 0
        needed = euler_first + 2 * (n_steps - euler_first - to_data) + to_data
        if setup.nfe != needed:
            raise ValueError(
                f"{setup.spec.name}: the given grid of {n_steps} steps costs nfe={needed} (two evaluations per step"
                f"{', one for the final Euler step onto clean data' if to_data else ''}), got nfe={setup.nfe}; "
                f"pass nfe={needed} (or steps={n_steps}), or a spacing name to let the budget choose the grid"
            )
        return setup.grid(n_steps), euler_first, n_steps
    # Whether the grid starts at zero SNR is read from the grid itself (a setup may choose its
    # own first time: a t_start, a leading spacing, an interval of a distillation grid); a
    # zero-SNR start re-plans the budget with Euler first steps.
    zero_snr = False
    while True:
        euler_first, full_steps = heun_plan(setup.nfe, to_data, zero_snr)
        n_steps = euler_first + full_steps + (1 if to_data else 0)
        grid = setup.grid(n_steps)
        if zero_snr or not _zero_snr(setup, grid[0]):
            return grid, euler_first, n_steps
        zero_snr = True


def _churn_options(setup: Setup) -> tuple[float, float, float, float]:
    s_churn, s_noise, s_tmin = nonnegative_options(setup, "s_churn", "s_noise", "s_tmin")
    s_tmax = setup.options["s_tmax"]
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, (int, float)) or not s_tmax >= s_tmin:
        raise ValueError(f"{setup.spec.name}: s_tmax must be a number >= s_tmin={s_tmin} (default inf), got {s_tmax!r}")
    return s_churn, s_tmin, float(s_tmax), s_noise


def with_churn(setup: Setup, s: Point, t: Point, n_steps: int, step: Callable[[Point, Point], Interval]) -> Interval:
    """``step`` from ``s`` to ``t``, preceded by EDM's churn when it applies: the state is noised
    from ``rho_s`` to ``rho_hat = (1 + gamma) rho_s`` by the forward transition (``S_noise`` times
    the noise of the Brownian interval ``(s, t)``) and the step starts at ``rho_hat``."""
    s_churn, s_tmin, s_tmax, s_noise = _churn_options(setup)
    r_s = _rho(s)
    gamma = churn_gamma(s_churn, n_steps, r_s, s_tmin, s_tmax) if math.isfinite(r_s) else 0.0
    if gamma == 0.0:
        return step(s, t)
    hat = point_at_rho(setup, r_s * (1.0 + gamma))
    c_x, c_z = forward_transition(s, hat)
    iv = step(hat, t)
    return Interval(iv.stages, iv.c_x, iv.w, noises=((s, t),), lift=(c_x, (s_noise * c_z,)))


Step = Callable[[Point, Point, int], Interval]  # (start, end, number of steps of the grid) -> the step


def staged_program(setup: Setup, one: Step, two: Step | None) -> Program:
    """A singlestep program whose steps cost one evaluation (``one``: Euler-type) or two (``two``):
    with ``two=None`` every step is ``one``; otherwise the grid and the Euler first steps come from
    :func:`two_stage_grid` and a step onto clean data is ``one`` too."""
    if two is None:
        grid = setup.grid(setup.nfe)
        euler_first, n_steps = setup.nfe, setup.nfe
    else:
        grid, euler_first, n_steps = two_stage_grid(setup)
    to_data = setup.ends_on_data()
    pts = setup.points(grid)
    intervals = []
    for i in range(n_steps):
        single = two is None or i < euler_first or (to_data and i == n_steps - 1)
        intervals.append((one if single else two)(pts[i], pts[i + 1], n_steps))
    return setup.program(
        grid, [st.t for iv in intervals for st in iv.stages], runge_kutta_routine(intervals),
        stochastic=any(iv.noises for iv in intervals), step_evals=[len(iv.stages) for iv in intervals],
    )


def build_edm(setup: Setup, two_stage: Callable[[Setup, Point, Point], Interval] | None) -> Program:
    """Euler (``two_stage=None``) or a two-evaluation step (Heun, DPM-2) on the setup's grid, with churn."""
    one: Step = lambda s, t, n: with_churn(setup, s, t, n, euler_interval)  # noqa: E731
    two: Step | None = None
    if two_stage is not None:
        two = lambda s, t, n: with_churn(setup, s, t, n, lambda a, b: two_stage(setup, a, b))  # noqa: E731
    return staged_program(setup, one, two)


@register(
    name="heun",
    family="edm",
    order=2,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + " (Heun steps; S_churn > 0 is Algorithm 2)",
    summary="EDM's Heun sampler (k-diffusion sample_heun) with EDM's churn options; steps=n to sigma = 0 is nfe = 2n - 1",
    options=dict(_CHURN),
)
def build_heun(setup: Setup) -> Program:
    return build_edm(setup, _heun_interval)


@register(
    name="euler",
    family="edm",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + " (Euler steps; S_churn > 0 is Algorithm 2)",
    summary="EDM's Euler sampler (k-diffusion sample_euler), with churn; at S_churn = 0 the same map as DDIM, written in rho = sigma/alpha",
    options=dict(_CHURN),
)
def build_euler(setup: Setup) -> Program:
    return build_edm(setup, None)


@register(
    name="dpm_2",
    family="edm",
    order=2,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=False,
    model_kind="diffusion",
    paper="k-diffusion's sample_dpm_2 (Crowson): DPM-Solver-2's midpoint (Lu et al. 2022, DPM-Solver, Algorithm 1) "
    "taken in EDM's sigma with Euler sub-steps, and EDM's churn (" + _PAPER + ")",
    summary="midpoint method in sigma/alpha with the geometric midpoint sqrt(sigma_i sigma_i+1), with churn; steps=n is nfe = 2n - 1",
    options=dict(_CHURN),
)
def build_dpm_2(setup: Setup) -> Program:
    return build_edm(setup, dpm2_interval)
