"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", ICLR 2021)."""

from __future__ import annotations

from fewstep.samplers._expint import LinearStep, ddim_coefficients, linear_multistep_routine
from fewstep.samplers.core import Program, Setup
from fewstep.samplers.registry import register


@register(
    name="ddim",
    family="ddim",
    order=1,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper="Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models, eq. 12 (eta: eq. 16)",
    summary="first-order; eta=0 deterministic (DPM-Solver++(1)), eta>0 adds fresh noise (eta=1: DDPM-like)",
    options={"eta": 0.0},
)
def build_ddim(setup: Setup) -> Program:
    """One evaluation per step: ``x_t = alpha_t D + sqrt(sigma_t^2 - c_z^2) eps_hat + c_z z``."""
    eta = float(setup.options["eta"])
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    steps = []
    for i in range(setup.nfe):
        c_x, c_d, c_z = ddim_coefficients(pts[i], pts[i + 1], eta)
        steps.append(LinearStep(c_x, (c_d,), (), c_z))
    return setup.program(grid, [p.t for p in pts[:-1]], linear_multistep_routine(pts, steps), stochastic=eta > 0)
