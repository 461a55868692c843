"""Ancestral samplers: k-diffusion's ``sample_euler_ancestral``, ``sample_dpm_2_ancestral`` and
``sample_dpmpp_2s_ancestral`` (Crowson, k-diffusion), AUTOMATIC1111's "Euler a", "DPM2 a" and
"DPM++ 2S a".

Each step from ``rho_i`` to ``rho_{i+1}`` (``rho = sigma / alpha``, EDM's noise level) splits the
target level as ancestral sampling does (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models": the DDPM posterior's variance for ``eta = 1``; k-diffusion's ``get_ancestral_step``):
``rho_up = min(rho_{i+1}, eta rho_{i+1} sqrt(1 - rho_{i+1}^2 / rho_i^2))``,
``rho_down = sqrt(rho_{i+1}^2 - rho_up^2)``.  A deterministic step goes from ``rho_i`` to
``rho_down`` and ``s_noise`` times fresh noise of level ``rho_up`` brings the state to
``rho_{i+1}``: in ``x`` (any schedule) ``x_{i+1} = alpha_{i+1} (y_down + rho_up z)``.  The
deterministic step is

* ``euler_ancestral``: Euler (= DDIM) to ``rho_down``;
* ``dpm_2_ancestral``: k-diffusion's DPM-2 step (``edm.dpm2_interval``) to ``rho_down``;
* ``dpmpp_2s_ancestral``: DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Algorithm 1, the
  midpoint in log-SNR) to ``rho_down``.

A step onto clean data has no noise and is the Euler step ``x = D``.  The two-evaluation samplers
budget as Heun does (``steps=n`` to clean data is ``nfe = 2n - 1``; other budgets begin with an Euler
ancestral step, and so does a start at zero SNR); their full steps need ``rho_down > 0``, so an
``eta`` that takes all of a step's level into the noise (possible for ``eta > 1``) is refused
(k-diffusion would silently make that step an Euler step and change the evaluation count).
The ancestral rule is EDM's (in ``rho``) on every schedule; ComfyUI uses its own rule on
rectified-flow models (``sample_euler_ancestral_RF``), which fewstep does not follow.
"""

from __future__ import annotations

from fewstep.samplers._expint import Interval, ancestral
from fewstep.samplers.core import Point, Program, Setup, nonnegative_options
from fewstep.samplers.dpm_solver import singlestep_interval
from fewstep.samplers.edm import dpm2_interval, euler_interval, staged_program
from fewstep.samplers.registry import register

_OPTIONS = {"eta": 1.0, "s_noise": 1.0}
_KD = "k-diffusion (Crowson), sampling.sample_{}; ancestral step of Ho et al. 2020, DDPM"


def _full(setup: Setup, eta: float, s_noise: float, step) -> object:
    """A two-evaluation ancestral step; refused where ``eta`` leaves no deterministic part."""

    def full(s: Point, t: Point, n: int) -> Interval:
        def to_down(a: Point, d: Point) -> Interval:
            if d.sigma == 0.0:
                raise ValueError(
                    f"{setup.spec.name}: eta={eta} turns the whole step to sigma/alpha={t.sigma / t.alpha:.4g} into noise "
                    "(sigma_down = 0), leaving no second-order step; use eta <= 1"
                )
            return step(a, d)

        return ancestral(s, t, eta, s_noise, to_down)

    return full


def _program(setup: Setup, two_stage) -> Program:
    eta, s_noise = nonnegative_options(setup, "eta", "s_noise")
    one = lambda s, t, n: ancestral(s, t, eta, s_noise, euler_interval)  # noqa: E731
    return staged_program(setup, one, None if two_stage is None else _full(setup, eta, s_noise, two_stage))


@register(
    name="euler_ancestral",
    family="ancestral",
    order=1,
    evals_per_step=1,
    stochastic=True,
    model_kind="diffusion",
    paper=_KD.format("euler_ancestral"),
    summary="A1111's 'Euler a': Euler to sigma_down, then fresh noise up to the next level (eta, s_noise); eta=0 is euler",
    options=dict(_OPTIONS),
)
def build_euler_ancestral(setup: Setup) -> Program:
    return _program(setup, None)


@register(
    name="dpm_2_ancestral",
    family="ancestral",
    order=1,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=True,
    model_kind="diffusion",
    paper=_KD.format("dpm_2_ancestral"),
    summary="A1111's 'DPM2 a': k-diffusion's DPM-2 step to sigma_down, then noise; steps=n is nfe = 2n - 1",
    options=dict(_OPTIONS),
)
def build_dpm_2_ancestral(setup: Setup) -> Program:
    return _program(setup, lambda s, d: dpm2_interval(setup, s, d))


@register(
    name="dpmpp_2s_ancestral",
    family="ancestral",
    order=1,
    evals_per_step=2,
    final_step_evals=1,
    stochastic=True,
    model_kind="diffusion",
    paper=_KD.format("dpmpp_2s_ancestral") + "; Lu et al. 2022, DPM-Solver++, Algorithm 1",
    summary="A1111's 'DPM++ 2S a': DPM-Solver++(2S) to sigma_down, then noise; steps=n is nfe = 2n - 1",
    options=dict(_OPTIONS),
)
def build_dpmpp_2s_ancestral(setup: Setup) -> Program:
    return _program(setup, lambda s, d: singlestep_interval(setup, s, d, 2))
