"""Gradient estimation (Permenter & Yuan 2024, "Interpreting and Improving Diffusion Models from an
Optimization Perspective", ICML 2024, Algorithm 2), ComfyUI's ``gradient_estimation``.

Reading the denoiser as a gradient of the distance to the data manifold, the paper replaces the
noise prediction of DDIM's step by the estimate ``eps_bar_i = gamma eps_i + (1 - gamma) eps_{i-1}``
(``gamma = 2``), a momentum-like extrapolation from the previous step:
``y_{i+1} = y_i + (rho_{i+1} - rho_i) eps_bar_i`` in EDM's ``y = x / alpha``, ``rho = sigma / alpha``
(``eps = (y - D) / rho``), i.e. ``x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} (rho_{i+1} - rho_i) eps_bar_i``.
The first step is DDIM; a step onto clean data is the denoising step ``x = D``.  First order: the
weights sum to one, and ``gamma = 2`` is not the second-order choice (3/2 on equal steps).
"""

from __future__ import annotations

import math

from fewstep.samplers._expint import LinearStep, ddim_coefficients, linear_multistep_routine
from fewstep.samplers.core import Program, Setup
from fewstep.samplers.registry import register


@register(
    name="gradient_estimation",
    family="gradient_estimation",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper="Permenter & Yuan 2024, Interpreting and Improving Diffusion Models from an Optimization Perspective (ICML 2024), Algorithm 2",
    summary="DDIM with the noise estimate gamma eps_i + (1 - gamma) eps_{i-1} (ge_gamma=2); ge_gamma=1 is DDIM",
    options={"ge_gamma": 2.0},
)
def build_gradient_estimation(setup: Setup) -> Program:
    gamma = setup.options["ge_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gradient_estimation: ge_gamma must be a finite number (2 in the paper, 1: DDIM), got {gamma!r}")
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    steps = []
    for i in range(setup.nfe):
        s, t = pts[i], pts[i + 1]
        if i == 0 or math.isinf(t.lam):  # DDIM: the first step (also out of zero SNR), the denoising step
            c_x, c_d, _ = ddim_coefficients(s, t)
            steps.append(LinearStep(c_x, (c_d,)))
            continue
        g = t.alpha * (t.sigma / t.alpha - s.sigma / s.alpha)  # alpha_{i+1} (rho_{i+1} - rho_i)
        steps.append(LinearStep(t.alpha / s.alpha, (), (g * gamma, g * (1.0 - float(gamma)))))
    return setup.program(grid, [p.t for p in pts[:-1]], linear_multistep_routine(pts, steps))
