"""RES multistep: the second-order multistep exponential integrator of Zhang, Tao, Chen et al.
2023 ("Improved Order Analysis and Design of Exponential Integrator for Diffusion Models
Sampling", arXiv:2308.02157, the refined exponential solver with its multistep order-2 conditions),
as ComfyUI's ``res_multistep`` and ``res_multistep_ancestral`` run it.

In data prediction with ``h = lambda_{i+1} - lambda_i`` (EDM form, ``y = x / alpha``):
``y_{i+1} = e^{-h} y_i + h (b_1 D_i + b_2 D_{i-1})`` with ``b_1 = phi_1(-h) - phi_2(-h) / c_2``,
``b_2 = phi_2(-h) / c_2``, ``c_2`` the previous evaluation's position in units of ``h``
(``phi_1(z) = (e^z - 1)/z``, ``phi_2(z) = (phi_1(z) - 1)/z``).  Since ``h phi_1(-h) = 1 - e^{-h}``
and ``h phi_2(-h) = e2(h)``, this is DPM-Solver++(2M) with the ``heun`` form of its derivative term
(``_expint.dpmpp_multistep_weights``): the same weights, written once here for the ancestral case.
The first step and a step onto clean data are first order.

``res_multistep_ancestral`` takes each step to the ancestral ``sigma_down`` (``eta``,
``s_noise``, :func:`_expint.ancestral_split`) and adds fresh noise up to the next level.  Its
``c_2`` is ComfyUI's: ``(lambda_{i-1} - lambda_down,{i-1}) / h`` with ``lambda_down,{i-1}`` where the
previous *deterministic* step landed (not ``lambda_i``, where ``D_i`` was evaluated); fewstep follows
ComfyUI, whose sampler this is (the paper has no ancestral variant).  At ``eta = 0`` both are
``res_multistep``.
"""

from __future__ import annotations

import math

from fewstep.samplers._expint import LinearStep, ancestral_split, ddim_coefficients, down_point, e1, e2, linear_multistep_routine
from fewstep.samplers.core import Program, Setup, nonnegative_options
from fewstep.samplers.registry import register

_PAPER = "Zhang et al. 2023, Improved Order Analysis and Design of Exponential Integrator for Diffusion Models Sampling (arXiv:2308.02157); ComfyUI's res_multistep"


def _build(setup: Setup) -> Program:
    eta, s_noise = nonnegative_options(setup, "eta", "s_noise")
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    steps, prev_down = [], None
    for i in range(setup.nfe):
        s, t = pts[i], pts[i + 1]
        down, up = ancestral_split(s, t, eta)
        d = down_point(t, down)
        c_z = s_noise * up * t.sigma
        h = d.lam - s.lam
        if i == 0 or d.sigma == 0.0:  # first step, or all the way to clean data: Euler (DPM-Solver++(1))
            c_x, c_d, _ = ddim_coefficients(s, d)
            steps.append(LinearStep(c_x, (c_d,), (), c_z))
        else:
            c2 = (pts[i - 1].lam - prev_down.lam) / h  # ComfyUI's position of the previous evaluation
            g = d.alpha * e2(h) / c2 if math.isfinite(c2) else 0.0
            steps.append(LinearStep(d.sigma / s.sigma, (d.alpha * e1(h) - g, g), (), c_z))
        prev_down = d
    stochastic = any(st.c_z for st in steps)
    return setup.program(grid, [p.t for p in pts[:-1]], linear_multistep_routine(pts, steps), stochastic=stochastic)


@register(
    name="res_multistep",
    family="res",
    order=2,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER,
    summary="second-order multistep exponential integrator (RES); the same weights as dpmpp_2m(solver_type='heun')",
    options={"eta": 0.0, "s_noise": 1.0},
)
def build_res_multistep(setup: Setup) -> Program:
    return _build(setup)


@register(
    name="res_multistep_ancestral",
    family="res",
    order=1,
    evals_per_step=1,
    stochastic=True,
    model_kind="diffusion",
    paper=_PAPER + "_ancestral",
    summary="RES multistep to the ancestral sigma_down, then fresh noise (eta, s_noise), as ComfyUI",
    options={"eta": 1.0, "s_noise": 1.0},
)
def build_res_multistep_ancestral(setup: Setup) -> Program:
    return _build(setup)
