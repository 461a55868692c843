"""The peers' samplers, run on any model that fewstep runs: diffusers' schedulers with every
timestep spacing they offer, and k-diffusion's samplers on Karras and exponential sigmas.

A model is given as a fewstep denoiser ``D(x, t)`` on a discrete VP schedule (what a diffusers
UNet is); the peers see it the way they see a network: diffusers' schedulers get the noise
prediction ``eps = (x - alpha D) / sigma`` at their integer timestep, k-diffusion gets the data
prediction in its variable ``x / alpha`` at ``sigma / alpha``.  Every configuration is run with a
call counter and kept only if it spends exactly the budget asked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
)

from fewstep.schedules import VPDiscrete

SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "logSNR": {"use_lu_lambdas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}

SOLVERS = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"solver_order": 2}),
    "DPM++ 3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "DPM++ 2S": (DPMSolverSinglestepScheduler, {"solver_order": 2}),
    "DPM++ 3S": (DPMSolverSinglestepScheduler, {"solver_order": 3}),
    "UniPC-2 bh1": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh1"}),
    "UniPC-2 bh2": (UniPCMultistepScheduler, {"solver_order": 2, "solver_type": "bh2"}),
    "UniPC-3 bh2": (UniPCMultistepScheduler, {"solver_order": 3, "solver_type": "bh2"}),
    "DEIS-2": (DEISMultistepScheduler, {"solver_order": 2}),
    "DEIS-3": (DEISMultistepScheduler, {"solver_order": 3}),
    "DDIM": (DDIMScheduler, {"clip_sample": False}),
}


class _Counter:
    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn, self.calls = fn, 0

    def __call__(self, *args: object) -> torch.Tensor:
        self.calls += 1
        return self.fn(*args)


def _diffusers_run(sch, eps: Callable, noise: torch.Tensor, nfe: int) -> tuple[torch.Tensor, int]:
    counter = _Counter(eps)
    sch.set_timesteps(nfe)
    x = noise.clone() * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(counter(x, t), t, x).prev_sample
    return x, counter.calls


def _k_diffusion_run(name: str, schedule: VPDiscrete, denoiser: Callable, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, int]:
    import k_diffusion.sampling as kd

    def ve(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma.flatten()[0])
        t = float(schedule.t_from_lambda(-math.log(s)))
        return denoiser(x * schedule.alpha(t), torch.tensor(t, dtype=torch.float64)).to(x.dtype)

    counter = _Counter(ve)
    x = noise * float(sigmas[0])  # k-diffusion starts from sigma_max * noise in x / alpha
    fn = {"DPM++ 2M": kd.sample_dpmpp_2m, "Heun": kd.sample_heun, "LMS": kd.sample_lms, "Euler": kd.sample_euler}[name]
    with torch.no_grad():
        out = fn(counter, x, sigmas.to(noise.dtype), disable=True)
    return out, counter.calls


def peer_outputs(denoiser: Callable, schedule: VPDiscrete, noise: torch.Tensor, nfe: int, scheduler_config: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, samples)`` for every peer configuration that spends exactly ``nfe`` evaluations.

    ``scheduler_config`` holds the model's diffusers schedule keys (default: DDPM's linear betas)."""
    cfg = dict(scheduler_config or {})

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = float(t)
        a, s = schedule.alpha_sigma(tt)
        return (x - a * denoiser(x, torch.tensor(tt, dtype=torch.float64)).to(x.dtype)) / s

    with torch.no_grad():
        for solver, (cls, kw) in SOLVERS.items():
            for spacing, sk in SPACINGS.items():
                if cls is DDIMScheduler and spacing not in ("linspace", "leading", "trailing"):
                    continue
                try:
                    sch = cls(**cfg, **kw, **sk)
                    out, calls = _diffusers_run(sch, eps, noise, nfe)
                except (ValueError, RuntimeError, IndexError, TypeError):  # a combination diffusers refuses
                    continue
                if calls == nfe and bool(torch.isfinite(out).all()):
                    yield f"diffusers {solver} {spacing}", out
        rho_min = schedule.sigma(schedule.t_min) / schedule.alpha(schedule.t_min)
        rho_max = schedule.sigma(schedule.t_max) / schedule.alpha(schedule.t_max)
        import k_diffusion.sampling as kd

        grids = {
            "karras": lambda n: kd.get_sigmas_karras(n, rho_min, rho_max, rho=7.0),
            "exponential": lambda n: kd.get_sigmas_exponential(n, rho_min, rho_max),
        }
        for name in ("DPM++ 2M", "LMS", "Euler", "Heun"):
            steps = (nfe + 1) // 2 if name == "Heun" else nfe  # Heun to sigma = 0 costs 2n - 1
            for gname, g in grids.items():
                out, calls = _k_diffusion_run(name, schedule, denoiser, noise, g(steps).double())
                if calls == nfe and bool(torch.isfinite(out).all()):
                    yield f"k-diffusion {name} {gname}", out
