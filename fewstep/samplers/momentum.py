"""Momentum for multistep solvers (Wizadwongsa, Chinchuthakun, Khungurn, Raj & Suwajanakorn 2024,
"Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", ICLR 2024).

High-order multistep methods have small stability regions and, at few steps, diverge into
artifacts.  Two remedies, both with a parameter ``beta`` in ``(0, 1]``; ``beta = 1`` is the base
solver exactly:

* **Heavy ball (HB)**: a multistep step is ``x_{n+1} = c_x x_n + g_n P_n``
  with ``P_n`` a combination of past predictions whose weights sum to one (its *direction*) and
  ``g_n`` the step's first-order weight.  HB replaces ``P_n`` by ``v_n = (1 - beta) v_{n-1} + beta P_n``
  (``v_0 = P_0``).  ``hb_dpmpp_2m``: on DPM-Solver++(2M) (``P`` a combination of data predictions,
  ``g_n = alpha_{n+1} (1 - e^{-h})``), on its second-order updates only, as the authors'
  ``MomentumDPMSolverMultistepScheduler`` (sWizad/momentum-diffusion) does: the first step, a
  lower-order final step and the step onto clean data stay plain first-order steps, and the average
  starts at the first second-order direction; ``hb_plms``: on the Adams-Bashforth method of order
  ``plms_order`` for ``d(x/alpha)/d(rho) = eps``, ``rho = sigma/alpha`` (PLMS, Liu et al. 2022, with
  variable-step coefficients -- k-diffusion's ``sample_lms``; ``g_n = alpha_{n+1} (rho_{n+1} - rho_n)``).
  HB is first order for ``beta < 1`` (as the paper proves; measured in the tests).
* **Generalised heavy ball (GHVB)**: the moving average acts on the noise predictions,
  ``v_n = (1 - beta) v_{n-1} + beta eps_n``, and the Adams-type combination of ``v_n, ..., v_{n-k+1}``
  is chosen so that the method keeps order ``k``.  The paper derives constant coefficients for
  equal steps; here the coefficients ``c_j`` solve the same order conditions on the actual grid:
  since each ``v_i = sum_m W_{im} eps_m`` is a known combination of past predictions,
  ``sum_j c_j v_{n-j}`` integrates every polynomial ``eps`` of degree ``< k`` exactly over the step,
  ``sum_j c_j sum_m W_{n-j,m} u_m^d = 1 / (d + 1)`` with ``u = (rho - rho_n) / (rho_{n+1} - rho_n)``.
  On equal steps (after the start-up transient of ``v``) this is the paper's formula; with
  ``beta = 1`` it is variable-step Adams-Bashforth (``hb_plms`` at ``beta = 1``).

Every coefficient is precomputed in float64.  At a zero-SNR start (``rho = inf``) the averages
start at the first finite ``rho``, and that first step is DDIM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from fewstep.models.prediction import from_x0
from fewstep.samplers._expint import LinearStep, combine, dpmpp_multistep_weights, multistep_orders
from fewstep.samplers.core import Eval, NoiseSource, Point, Program, Routine, Setup
from fewstep.samplers.deis import deis_step, final_is_denoising
from fewstep.samplers.registry import register

__all__ = ["heavy_ball_routine", "ghvb_coefficients", "ghvb_routine"]

_PAPER = "Wizadwongsa et al. 2024, Diffusion Sampling with Momentum for Mitigating Divergence Artifacts (ICLR 2024)"


def _beta(setup: Setup) -> float:
    beta = float(setup.options["beta"])
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"{setup.spec.name}: beta must be in (0, 1] (1: no momentum), got {beta}")
    return beta


def _eps(x: torch.Tensor, d: torch.Tensor, p: Point) -> torch.Tensor:
    """The noise prediction at ``p`` that goes with data prediction ``d``."""
    return from_x0("epsilon", d, x, p.alpha, p.sigma)


def heavy_ball_routine(
    pts: Sequence[Point], steps: Sequence[LinearStep], beta: float, on: str, momentum: Sequence[bool]
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """Polyak's heavy ball on a linear multistep method whose step ``n`` reads
    ``c_x x + sum_j w[j] P_{n-j}`` with ``P`` the data (``on="d"``) or noise (``on="eps"``)
    predictions.  Steps with ``momentum[n]`` replace the direction by the moving average ``v``
    (started at the first such step's direction, ``v = P``); the others (and a step in DEIS's
    first-order ``alpha D + sigma eps`` form) are the base step and leave ``v`` alone."""
    depth = max(max(len(s.w_d), len(s.w_eps)) for s in steps)
    need_eps = on == "eps" or any(s.w_eps for s in steps)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        hist_d: list[torch.Tensor] = []
        v: torch.Tensor | None = None
        hist_eps: list[torch.Tensor] = []
        for i, st in enumerate(steps):
            p = pts[i]
            x, d = yield Eval(x, p.t)
            hist_d = [d, *hist_d[: depth - 1]]
            if need_eps:
                hist_eps = [_eps(x, d, p), *hist_eps[: depth - 1]]
            hist_p = hist_d if on == "d" else hist_eps
            if not momentum[i] or (st.w_d and st.w_eps):  # the base step (DEIS's first-order start at zero SNR too)
                x = combine(x, st.c_x, [*zip(st.w_d, hist_d), *zip(st.w_eps, hist_eps)])
                continue
            w = st.w_d if on == "d" else st.w_eps
            g = sum(w)
            direction = combine(hist_p[0], w[0] / g, [(wj / g, pj) for wj, pj in zip(w[1:], hist_p[1:])])
            v = direction if v is None else combine(v, 1.0 - beta, [(beta, direction)])
            x = combine(x, st.c_x, [(g, v)])
        return x

    return routine


@register(
    name="hb_dpmpp_2m",
    family="momentum",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", HB on DPM-Solver++(2M)",
    summary="DPM-Solver++(2M) with heavy-ball momentum on its update direction; beta=1 is dpmpp_2m",
    options={"beta": 0.8, "lower_order_final": True, "solver_type": "midpoint"},
)
def build_hb_dpmpp_2m(setup: Setup) -> Program:
    beta = _beta(setup)
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    orders = multistep_orders(setup.nfe, 2, setup.options["lower_order_final"], math.isinf(pts[-1].lam))
    steps = []
    for i, o in enumerate(orders):
        c_x, w, _ = dpmpp_multistep_weights(pts, i, o, setup.options["solver_type"])
        steps.append(LinearStep(c_x, tuple(w)))
    # As the authors' MomentumDPMSolverMultistepScheduler: momentum on the second-order updates only
    # (their override of diffusers' second-order update); the first step, a lower-order final step and
    # the step onto clean data are plain DPM-Solver++(1) steps.
    momentum = [o == 2 for o in orders]
    return setup.program(grid, [p.t for p in pts[:-1]], heavy_ball_routine(pts, steps, beta, "d", momentum))


def _plms_order(setup: Setup) -> int:
    k = setup.options["plms_order"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4:
        raise ValueError(f"{setup.spec.name}: plms_order must be 1, 2, 3 or 4, got {k!r}")
    return k


@register(
    name="hb_plms",
    family="momentum",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", HB on PLMS / Adams-Bashforth",
    summary="variable-step Adams-Bashforth (PLMS, k-diffusion's LMS) in rho with heavy-ball momentum; beta=1: plain LMS",
    options={"beta": 0.8, "plms_order": 4, "denoise_final": True},
)
def build_hb_plms(setup: Setup) -> Program:
    beta, k = _beta(setup), _plms_order(setup)
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    denoise_last = math.isinf(pts[-1].lam) and final_is_denoising(setup, "rho")
    orders = [1 if denoise_last and i == setup.nfe - 1 else min(k, i + 1) for i in range(setup.nfe)]
    steps = [deis_step(setup, pts, i, o, "rho") for i, o in enumerate(orders)]
    # As the authors' PLMSWithHBScheduler: the average starts at the first step's eps and acts on every step.
    momentum = [True] * setup.nfe
    return setup.program(grid, [p.t for p in pts[:-1]], heavy_ball_routine(pts, steps, beta, "eps", momentum))


# ---------------------------------------------------------------------------------------------
# Generalised heavy ball
# ---------------------------------------------------------------------------------------------


def ghvb_coefficients(rho: Sequence[float], start: int, n: int, k: int, beta: float) -> list[float]:
    """``c_0 .. c_{k-1}`` of GHVB's step ``n`` (see the module docstring): ``sum_j c_j v_{n-j}`` is
    the exact mean of ``eps`` over ``[rho_n, rho_{n+1}]`` for every polynomial ``eps`` of degree
    ``< k``, where ``v`` is the moving average started at ``rho_start`` (``v_start = eps_start``).
    Predictions older than ``(1 - beta)^age < 1e-40`` are left out of the sums."""
    memory = n + 1 if beta < 1e-3 else (1 if beta == 1.0 else int(math.log(1e-40) / math.log1p(-beta)) + 1)
    a = np.zeros((k, k))
    for j in range(k):
        i = n - j  # v_i = sum over m = start .. i of w_m eps_m
        m0 = max(start, i - memory)
        ages = np.arange(i - m0, -1, -1, dtype=np.float64)
        w = beta * (1.0 - beta) ** ages
        if m0 == start:
            w[0] = (1.0 - beta) ** (i - start)  # the average starts at eps_start
        u = (np.asarray(rho[m0 : i + 1], dtype=np.float64) - rho[n]) / (rho[n + 1] - rho[n])
        a[:, j] = np.vander(u, k, increasing=True).T @ w  # sum_m w_m u_m^d, d = 0 .. k-1
    b = 1.0 / np.arange(1, k + 1)
    return [float(c) for c in np.linalg.solve(a, b)]


def ghvb_routine(
    pts: Sequence[Point], coeffs: Sequence[Sequence[float]], start: int, beta: float, denoise_last: bool = False
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """Steps ``n < start + 1`` are DDIM; then ``x_{n+1} = (alpha_{n+1}/alpha_n) x_n +
    alpha_{n+1} (rho_{n+1} - rho_n) sum_j c_j v_{n-j}`` with the moving average ``v`` of ``eps``;
    with ``denoise_last`` the last step (onto clean data) is DDIM too, ``x_0 = D``."""
    depth = max(len(c) for c in coeffs)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        vs: list[torch.Tensor] = []
        for i, c in enumerate(coeffs):
            p, q = pts[i], pts[i + 1]
            x, d = yield Eval(x, p.t)
            eps = _eps(x, d, p)
            if i < start or (denoise_last and i == len(coeffs) - 1):  # zero-SNR start, or the denoising last step: DDIM
                x = combine(d, q.alpha, [(q.sigma, eps)])
                continue
            v = eps if i == start else combine(vs[0], 1.0 - beta, [(beta, eps)])
            vs = [v, *vs[: depth - 1]]
            if i == start:
                x = combine(d, q.alpha, [(q.sigma, eps)])  # order 1: DDIM, written without 1/alpha_n
                continue
            g = q.alpha * (q.sigma / q.alpha - p.sigma / p.alpha)  # alpha_{n+1} (rho_{n+1} - rho_n)
            x = combine(x, q.alpha / p.alpha, [(g * cj, vj) for cj, vj in zip(c, vs)])
        return x

    return routine


def _register_ghvb(order: int) -> None:
    @register(
        name=f"ghvb_{order}",
        family="momentum",
        order=order,
        evals_per_step=1,
        stochastic=False,
        model_kind="diffusion",
        paper=_PAPER + ", GHVB, with coefficients for variable steps",
        summary=f"generalised heavy ball of order {order} on eps in rho; beta=1 is Adams-Bashforth {order} (LMS)",
        options={"beta": 0.8, "denoise_final": True},
    )
    def build(setup: Setup) -> Program:
        beta = _beta(setup)
        grid = setup.grid(setup.nfe)
        pts = setup.points(grid)
        rho = [p.sigma / p.alpha if p.alpha > 0 else math.inf for p in pts]
        start = next(i for i, r in enumerate(rho) if math.isfinite(r))
        coeffs = [
            ghvb_coefficients(rho, start, n, min(order, n - start + 1), beta) if n > start else [1.0]
            for n in range(setup.nfe)
        ]
        denoise_last = math.isinf(pts[-1].lam) and final_is_denoising(setup, "rho")
        return setup.program(grid, [p.t for p in pts[:-1]], ghvb_routine(pts, coeffs, start, beta, denoise_last))


for _k in (2, 3, 4):
    _register_ghvb(_k)
