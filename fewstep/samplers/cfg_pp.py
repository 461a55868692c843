"""CFG++ (Chung, Kim, Park, Nam & Ye 2024, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models", arXiv:2406.08070), for DDIM and multistep DPM-Solver++.

Classifier-free guidance itself is a denoiser, :class:`fewstep.models.ClassifierFreeGuidance`
(``D_w = D_u + w (D_c - D_u)``), and works with every sampler and in every diffusers pipeline.
CFG++ changes the *sampler*: after denoising with the guided prediction it re-noises with the
unconditional one (the paper's DDIM update):

    x_{t'} = alpha_{t'} D_w(x_t) + sigma_{t'} eps_u(x_t),   eps_u = (x_t - alpha_t D_u) / sigma_t.

In the exponential-integrator form of DDIM, ``x_{t'} = (sigma_{t'}/sigma_t) x + alpha_{t'}(1 - e^{-h}) D``,
this is the same step taken from the state ``x + alpha_t (D_w - D_u)`` (the guided data point with
the unconditional noise).

``cfgpp_dpmpp_2m`` is the authors' DPM-Solver++(2M) CFG++ (CFGpp-diffusion/CFGpp, ``latent_sdxl.py``,
``DPMpp2mCFGppSolver``; written there in k-diffusion's sigma form), in any schedule:

    x_{t'} = (sigma_{t'}/sigma_t) (x + alpha_t (D_w - D_u)) + alpha_{t'} (1 - e^{-h}) D_w
             + alpha_{t'} (1 - e^{-h}) / (2 r) (D_w - D_u^{prev}),    r = h_{prev} / h,

i.e. the DPM-Solver++(2M) step from the re-noised state whose difference ``D1`` pairs the current
*guided* prediction with the previous *unconditional* one (not the previous guided one).  As in the
authors' code, the first step and a step onto clean data are the first-order (DDIM) CFG++ update,
and there is no other lower-order final step (``lower_order_final=False`` by default).  Tested
equal to a direct transcription of the authors' loop.

The guidance scale is the ``ClassifierFreeGuidance`` one, which CFG++ requires in ``[0, 1]`` (the
paper's ``lambda``: ``0`` is the unconditional model, ``1`` the conditional one; CFG++ replaces a
large CFG scale by a ``lambda`` in between, not by the same number).  A scale outside it is an
error before the first evaluation.
CFG++ is not a discretisation of an ODE: every step moves the state by ``alpha (D_w - D_u)``, a
jump that does not shrink with the step, so results do not converge as the budget grows
(measured on the exact mixture: successive doublings of NFE 20-320 differ by 0.08-0.16 RMSE);
``order = 0`` in the registry.  With an unguided denoiser (no ``last_uncond``) the samplers are
their base samplers, with a warning.

A diffusers pipeline guides inside its own loop and gives the scheduler only ``D_w``, so these
samplers run through :func:`fewstep.sample` only (``FewstepScheduler`` says so).
"""

from __future__ import annotations

from fewstep.samplers.core import Program, Setup
from fewstep.samplers.dpm_solver import _multistep
from fewstep.samplers.registry import register

_PAPER = "Chung et al. 2024, CFG++: Manifold-constrained Classifier Free Guidance (arXiv:2406.08070)"


@register(
    name="cfgpp_ddim",
    family="cfg_pp",
    order=0,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", DDIM update",
    summary="DDIM with CFG++ re-noising; needs a ClassifierFreeGuidance denoiser (scale in [0, 1])",
    push_style=False,
    needs=("uncond",),
)
def build_cfgpp_ddim(setup: Setup) -> Program:
    return _multistep(setup, 1, renoise_uncond=True)


@register(
    name="cfgpp_dpmpp_2m",
    family="cfg_pp",
    order=0,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + ", with DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)",
    summary="DPM-Solver++(2M) with CFG++ re-noising; needs a ClassifierFreeGuidance denoiser (scale in [0, 1])",
    options={"lower_order_final": False, "solver_type": "midpoint"},
    push_style=False,
    needs=("uncond",),
)
def build_cfgpp_dpmpp_2m(setup: Setup) -> Program:
    return _multistep(setup, 2, renoise_uncond=True)
