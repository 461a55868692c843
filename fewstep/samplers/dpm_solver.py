"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li & Zhu 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", arXiv:2211.01095) in data prediction:
multistep 2M/3M, singlestep 2S/3S, SDE-DPM-Solver++(2M), and k-diffusion's stochastic variants
DPM++ 3M SDE and DPM++ SDE (the stochastic singlestep sampler, with Brownian-tree noise by
default in k-diffusion; here any :class:`~fewstep.samplers.core.NoiseSource`, e.g.
:class:`~fewstep.samplers.brownian.BrownianNoise`).

Singlestep budgets follow DPM-Solver-fast (Lu et al. 2022a, sec. 3.4): ``nfe`` is split into
steps of the full order and one lower-order step for the remainder; a step onto clean data is
first order.
"""

from __future__ import annotations

import math

from fewstep.samplers._expint import (
    Interval,
    LinearStep,
    Stage,
    ancestral,
    ancestral_split,
    ddim_coefficients,
    down_point,
    dpmpp_multistep_weights,
    e1,
    e2,
    linear_multistep_routine,
    multistep_orders,
    ratio,
    runge_kutta_routine,
)
from fewstep.samplers.core import Point, Program, Setup, nonnegative_options
from fewstep.samplers.edm import euler_interval, staged_program
from fewstep.samplers.registry import register

_PAPER = "Lu et al. 2022, DPM-Solver++ (arXiv:2211.01095)"


def _multistep(setup: Setup, order: int, eta: float = 0.0, renoise_uncond: bool = False) -> Program:
    opts = setup.options
    d2_weight = float(opts.get("d2_weight", 1.0))
    solver_type = opts.get("solver_type", "midpoint")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"{setup.spec.name}: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if eta < 0:
        raise ValueError(f"{setup.spec.name}: eta must be >= 0, got {eta}")
    s_noise = nonnegative_options(setup, "s_noise")[0] if "s_noise" in opts else 1.0
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    orders = multistep_orders(
        setup.nfe, order, opts.get("lower_order_final", True), math.isinf(pts[-1].lam), requested=opts.get("orders")
    )
    steps = []
    for i, o in enumerate(orders):
        c_x, w, c_z = dpmpp_multistep_weights(pts, i, o, solver_type, eta, d2_weight)
        steps.append(LinearStep(c_x, tuple(w), (), c_z * s_noise))
    routine = linear_multistep_routine(pts, steps, renoise_uncond=renoise_uncond)
    return setup.program(grid, [p.t for p in pts[:-1]], routine, stochastic=eta > 0 and s_noise > 0, orders=orders)


_MULTI_OPTS = {"lower_order_final": True, "orders": None}


@register(
    name="dpmpp_2m",
    family="dpm_solver_pp",
    order=2,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", Algorithm 2",
    summary="multistep second order in log-SNR, data prediction; the workhorse for guided sampling",
    options={**_MULTI_OPTS, "solver_type": "midpoint"},
)
def build_dpmpp_2m(setup: Setup) -> Program:
    return _multistep(setup, 2)


@register(
    name="dpmpp_3m",
    family="dpm_solver_pp",
    order=3,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", multistep third order (sec. 4.2 construction)",
    summary="multistep third order in log-SNR; d2_weight=0.5 reproduces diffusers' (second-order) variant",
    options={**_MULTI_OPTS, "d2_weight": 1.0},
)
def build_dpmpp_3m(setup: Setup) -> Program:
    return _multistep(setup, 3)


@register(
    name="dpmpp_2m_sde",
    family="dpm_solver_pp",
    order=1,
    evals_per_step=1,
    stochastic=True,
    model_kind="diffusion",
    paper=_PAPER + ", SDE-DPM-Solver++(2M), sec. 5",
    summary="stochastic multistep second order (strong order 1); eta=1 is the paper's SDE, eta=0 gives dpmpp_2m; "
    "solver_type='heun' is k-diffusion's heun variant",
    options={**_MULTI_OPTS, "solver_type": "midpoint", "eta": 1.0, "s_noise": 1.0},
)
def build_dpmpp_2m_sde(setup: Setup) -> Program:
    return _multistep(setup, 2, eta=float(setup.options["eta"]))


@register(
    name="dpmpp_3m_sde",
    family="dpm_solver_pp",
    order=1,
    evals_per_step=1,
    stochastic=True,
    model_kind="diffusion",
    paper="k-diffusion's sample_dpmpp_3m_sde (Crowson): " + _PAPER + ", the SDE of sec. 5 with third-order multistep terms",
    summary="stochastic multistep third order (strong order 1); d2_weight=0.5 and lower_order_final=False reproduce "
    "k-diffusion, whose second-derivative weight is half the Taylor one (as in dpmpp_3m)",
    options={**_MULTI_OPTS, "solver_type": "heun", "eta": 1.0, "s_noise": 1.0, "d2_weight": 1.0},
)
def build_dpmpp_3m_sde(setup: Setup) -> Program:
    return _multistep(setup, 3, eta=float(setup.options["eta"]))


def singlestep_orders(nfe: int, order: int, last_step_to_data: bool) -> list[int]:
    """Per-step orders summing to ``nfe``: full-order steps, then the remainder; with
    ``last_step_to_data`` one extra first-order step lands on clean data (``x_0 = D(x)``, exact
    given the state it starts from, so it caps no order).

    A single step of order ``k`` has local error ``O(h^{k+1})``, so it caps the global order at
    ``k + 1``: a remainder of order 2 keeps a third-order method third order, one of order 1 does
    not.  For order 3 with remainder 1 the last full step and the remainder are therefore taken as
    two second-order steps (``3 + 1 = 2 + 2``), which keeps third order at every budget (measured,
    tests/test_convergence.py).  DPM-Solver-fast (Lu et al. 2022a, sec. 3.4, and its reference
    code) ends budgets of ``3K`` and ``3K + 1`` steps with a first-order step, which makes it second
    order there (measured 2.14 at ``NFE = 1 mod 3`` with the old rule); fewstep does not follow it."""
    m = nfe - 1 if last_step_to_data else nfe
    q, rem = divmod(m, order)
    if order == 3 and rem == 1 and q >= 1:
        orders = [3] * (q - 1) + [2, 2]
    else:
        orders = [order] * q + ([rem] if rem else [])
    return orders + [1] if last_step_to_data else orders


def _stage_time(setup: Setup, s: Point, t: Point, r: float) -> float:
    """Time of the intermediate point at fraction ``r`` of the step in log-SNR (in time when the
    step starts at zero SNR, where every log-SNR fraction is -inf)."""
    if math.isinf(s.lam):
        return s.t + r * (t.t - s.t)
    return float(setup.schedule.t_from_lambda(s.lam + r * (t.lam - s.lam)))


def singlestep_interval(setup: Setup, s: Point, t: Point, order: int) -> Interval:
    """One DPM-Solver++ singlestep of the given order from ``s`` to ``t``.

    * order 1: DPM-Solver++(1).
    * order 2: DPM-Solver++(2S), Lu et al. 2022b, Algorithm 1, ``r_1 = 1/2``.
    * order 3: DPM-Solver-3 (Lu et al. 2022a, Algorithm 2, ``r_1 = 1/3``, ``r_2 = 2/3``) in data
      prediction: second-order intermediate state, then ``x_t = (sigma_t/sigma_s) x + alpha_t e1(h)
      D_s + (alpha_t e2(h) / r_2) (D_{s2} - D_s)``.
    """
    h = t.lam - s.lam
    c_x = t.sigma / s.sigma
    if order == 1:
        return Interval((Stage(s.t),), c_x, (t.alpha * e1(h),))
    rs = (0.5,) if order == 2 else (1 / 3, 2 / 3)
    mids = setup.points([_stage_time(setup, s, t, r) for r in rs])
    r_act = [ratio(m.lam - s.lam, h) for m in mids]  # the fractions actually realised
    h_mid = [m.lam - s.lam for m in mids]
    st1 = Stage(mids[0].t, mids[0].sigma / s.sigma, (mids[0].alpha * e1(h_mid[0]),))
    if order == 2:
        r = r_act[0]
        c0 = t.alpha * e1(h)
        return Interval((Stage(s.t), st1), c_x, (c0 * (1 - 0.5 / r), c0 * 0.5 / r))
    m2, r1, r2 = mids[1], r_act[0], r_act[1]
    a0, a1 = m2.alpha * e1(h_mid[1]), (r2 / r1) * m2.alpha * e2(h_mid[1])
    st2 = Stage(m2.t, m2.sigma / s.sigma, (a0 - a1, a1))
    b0, b2 = t.alpha * e1(h), t.alpha * e2(h) / r2
    return Interval((Stage(s.t), st1, st2), c_x, (b0 - b2, 0.0, b2))


def _singlestep(setup: Setup, order: int) -> Program:
    orders = singlestep_orders(setup.nfe, order, setup.ends_on_data())
    grid = setup.grid(len(orders))
    pts = setup.points(grid)
    intervals = [singlestep_interval(setup, pts[i], pts[i + 1], o) for i, o in enumerate(orders)]
    eval_times = [st.t for iv in intervals for st in iv.stages]
    return setup.program(grid, eval_times, runge_kutta_routine(intervals), step_evals=[len(iv.stages) for iv in intervals])


@register(
    name="dpmpp_2s",
    family="dpm_solver_pp",
    order=2,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", Algorithm 1 (DPM-Solver++(2S))",
    summary="singlestep second order, midpoint in log-SNR; odd budgets end with a first-order step",
)
def build_dpmpp_2s(setup: Setup) -> Program:
    return _singlestep(setup, 2)


@register(
    name="dpmpp_3s",
    family="dpm_solver_pp",
    order=3,
    evals_per_step=3,
    final_step_evals=1,
    stochastic=False,
    model_kind="diffusion",
    paper="Lu et al. 2022, DPM-Solver (arXiv:2206.00927), Algorithm 2, in the data prediction of DPM-Solver++",
    summary="singlestep third order (r1=1/3, r2=2/3); a remainder of 1 evaluation is spread as two second-order steps (order 3 at every budget)",
)
def build_dpmpp_3s(setup: Setup) -> Program:
    return _singlestep(setup, 3)


def _sde_step(setup: Setup, s: Point, t: Point, eta: float, s_noise: float, r: float) -> Interval:
    """k-diffusion's DPM++ SDE step from ``s`` to ``t`` (``sample_dpmpp_sde``): an ancestral
    DPM-Solver++(1) step to the intermediate point ``lambda_s + r h`` (noise of the Brownian interval
    ``(s, s_1)``), the data prediction there, and an ancestral DPM-Solver++ step to ``t`` with
    ``D_d = (1 - 1/(2r)) D_s + 1/(2r) D_{s_1}`` (noise of ``(s, t)``)."""
    p1 = setup.points([_stage_time(setup, s, t, r)])[0]
    fac = 1.0 / (2.0 * ratio(p1.lam - s.lam, t.lam - s.lam))  # 1/(2r), with the r the point realises
    down1, up1 = ancestral_split(s, p1, eta)
    c1x, c1d, _ = ddim_coefficients(s, down_point(p1, down1))
    down2, up2 = ancestral_split(s, t, eta)
    c2x, c2d, _ = ddim_coefficients(s, down_point(t, down2))
    n1, n2 = s_noise * up1 * p1.sigma, s_noise * up2 * t.sigma
    noisy = n1 != 0.0 or n2 != 0.0
    stage1 = Stage(p1.t, c1x, (c1d,), (n1, 0.0) if noisy else ())
    return Interval(
        (Stage(s.t), stage1), c2x, (c2d * (1.0 - fac), c2d * fac),
        z=(0.0, n2) if noisy else (), noises=((s, p1), (s, t)) if noisy else (),
    )


@register(
    name="dpmpp_sde",
    family="dpm_solver_pp",
    order=1,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=True,
    model_kind="diffusion",
    paper="k-diffusion's sample_dpmpp_sde (Crowson): " + _PAPER + ", Algorithm 1 with ancestral (SDE) sub-steps",
    summary="A1111's 'DPM++ SDE': stochastic singlestep second order (r=1/2) with ancestral noise in both stages; "
    "steps=n is nfe = 2n - 1; use BrownianNoise for k-diffusion's noise",
    options={"eta": 1.0, "s_noise": 1.0, "r": 0.5},
)
def build_dpmpp_sde(setup: Setup) -> Program:
    eta, s_noise, r = nonnegative_options(setup, "eta", "s_noise", "r")
    if not 0.0 < r < 1.0:
        raise ValueError(f"dpmpp_sde: r (the intermediate point's fraction of the step in log-SNR) must be in (0, 1), got {r}")
    one = lambda s, t, n: ancestral(s, t, eta, s_noise, euler_interval)  # noqa: E731
    return staged_program(setup, one, lambda s, t, n: _sde_step(setup, s, t, eta, s_noise, r))
