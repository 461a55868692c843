"""Multistep consistency samplers: equality with diffusers' LCM/TCD schedulers, and exactness with
perfect consistency models built from the exact probability-flow ODE of a small Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

import fewstep
from fewstep import FewstepScheduler
from fewstep.eval.frechet import frechet_distance_from_features as fd
from fewstep.models import GaussianMixture, PredictionDenoiser
from fewstep.samplers._expint import e1
from fewstep.samplers.core import NoiseSource
from fewstep.schedules import VPContinuous, from_diffusers

N = 500


class Float32Noise(NoiseSource):
    """Draws as diffusers' ``randn_tensor`` does for a float32 sample on the CPU."""

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.dtype)


# --- diffusers ----------------------------------------------------------------------------------


def _lcm_consistency_function(net, sch, prediction_type):
    """LCM's boundary condition around the network's x0 (what LCMScheduler applies inside step())."""
    den = PredictionDenoiser(net, from_diffusers(sch.config), prediction_type)

    def f(x, t):
        u = 10.0 * float(t)  # timestep_scaling = 10, sigma_data = 0.5
        return 0.25 / (u * u + 0.25) * x + u / math.sqrt(u * u + 0.25) * den(x, t)

    return f


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_equals_diffusers(eps_net, steps, prediction_type):
    x_T = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    sch = LCMScheduler(prediction_type=prediction_type)
    sch.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in sch.timesteps:
        x = sch.step(eps_net(x, t), t, x, generator=g).prev_sample
    f = _lcm_consistency_function(eps_net, sch, prediction_type)
    out, info = fewstep.sample(f, x_T.double(), "lcm", steps, schedule=from_diffusers(sch.config),
                               generator=Float32Noise(torch.Generator().manual_seed(5)), return_info=True)
    assert info.eval_times == sch.timesteps.double().tolist()  # LCM's skipping-step timesteps by default
    assert float((out - x).norm() / x.norm()) < 1e-5


@pytest.mark.parametrize("steps", [2, 6])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 1.0])
def test_tcd_equals_diffusers(eps_net, steps, gamma):
    x_T = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    sch = TCDScheduler(prediction_type="epsilon")
    sch.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in sch.timesteps:
        x = sch.step(eps_net(x, t), t, x, eta=gamma, generator=g).prev_sample
    den = PredictionDenoiser(eps_net, from_diffusers(sch.config), "epsilon")
    # TCDScheduler's last jump lands on timestep 0 (not on clean data): end="min"
    out = fewstep.sample(den, x_T.double(), "tcd", steps, end="min", gamma=gamma,
                         generator=Float32Noise(torch.Generator().manual_seed(5)))
    assert float((out - x).norm() / x.norm()) < 1e-5


def test_tcd_without_noise_is_ddim(eps_net, ddpm_schedule):
    den = PredictionDenoiser(eps_net, ddpm_schedule, "epsilon")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = [999.0, 700.0, 450.0, 200.0, -1.0]
    a = fewstep.sample(den, x, "tcd", 4, spacing=grid, gamma=0.0)
    b = fewstep.sample(den, x, "ddim", 4, spacing=grid)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_ctm_and_push_limits():
    with pytest.raises(ValueError, match=r"feeds the model the time it jumps to.*fewstep.sample"):
        FewstepScheduler(sampler="ctm").set_timesteps(4)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 3), "tcd", 3, schedule=VPContinuous(), gamma=1.5)
    with pytest.raises(ValueError, match="raise original_inference_steps to at least 60"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 3), "lcm", 60, schedule=from_diffusers(LCMScheduler().config))


# --- perfect models on an exact mixture -----------------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64) * 0.3
    cov = a @ a.transpose(1, 2) + 0.05 * torch.eye(2, dtype=torch.float64)
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [1.0, -2.0]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, cov)


SCHED = VPContinuous("linear")


def _solve(mixture, x, t, s):
    return mixture.ode_solve(x, SCHED, float(t), float(s), rtol=1e-7, atol=1e-7)


def _through(x, t: float, s: float, x_s):
    """The data prediction whose DDIM step from ``(x, t)`` to ``s`` lands on ``x_s``."""
    if s == SCHED.t_zero:
        return x_s
    (a_t, sg_t), (a_s, sg_s) = SCHED.alpha_sigma(t), SCHED.alpha_sigma(s)
    h = math.log(a_s / sg_s) - math.log(a_t / sg_t)
    return (x_s - (sg_s / sg_t) * x) / (a_s * e1(h))


class ExactJump:
    """CTM's ``g(x, t, s)`` of the exact ODE: the DDIM line from ``(x, t)`` through its ODE solution at ``s``."""

    takes_target_time = True

    def __init__(self, mixture):
        self.mixture = mixture

    def __call__(self, x, t, s):
        t, s = float(t), float(s)
        return _through(x, t, s, _solve(self.mixture, x, t, s))


@pytest.fixture(scope="module")
def data(mixture):
    gen = torch.Generator().manual_seed(1)
    x_T = mixture.sample_marginal(N, SCHED.t_max, SCHED, generator=gen) / SCHED.noise_scale(SCHED.t_max)
    fresh = mixture.sample(N, generator=gen)
    floor = sum(fd(mixture.sample(N, generator=gen), mixture.sample(N, generator=gen)) for _ in range(8)) / 8
    return x_T, fresh, floor  # exact marginal noise, a fresh data sample, the mean sampling floor


@pytest.mark.parametrize("name,nfe,opts", [("cm_multistep", 1, {}), ("cm_multistep", 3, {}), ("tcd", 2, {"gamma": 1.0}),
                                           ("ctm", 3, {"gamma": 0.5})])
def test_perfect_consistency_model_samples_exactly(mixture, data, name, nfe, opts):
    """With the exact ODE map as consistency function, x_T from the exact marginal and exact
    re-noising, every step's input is exactly distributed, so the samples are: their Fréchet
    distance to fresh data is at the sampling floor (0.010-0.015 against a floor of 0.011; one-step
    DDIM from the exact denoiser is at 4.4)."""
    x_T, fresh, floor = data
    f = ExactJump(mixture) if name == "ctm" else (lambda x, t: _solve(mixture, x, t, SCHED.t_zero))
    out = fewstep.sample(f, x_T, name, nfe, schedule=SCHED, generator=torch.Generator().manual_seed(2), **opts)
    assert fd(out, fresh) < 3 * floor
    ddim = fewstep.sample(mixture.denoiser(SCHED), x_T, "ddim", 1, schedule=SCHED)
    assert fd(ddim, fresh) > 30 * floor


def test_ctm_without_noise_follows_the_exact_ode(mixture):
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = fewstep.sample(ExactJump(mixture), x_T, "ctm", 3, schedule=SCHED)
    assert torch.allclose(out, _solve(mixture, x_T, SCHED.t_max, SCHED.t_zero), atol=1e-5)


class ExactSegments:
    """A perfect multistep consistency model: the data prediction whose DDIM step to the lower edge
    of the current segment lands on the exact ODE solution there."""

    def __init__(self, mixture, edges):
        self.mixture, self.edges = mixture, edges

    def __call__(self, x, t):
        t = float(t)
        e = max(v for v in self.edges if v < t - 1e-12)
        return _through(x, t, e, _solve(self.mixture, x, t, e))


def test_mcd_with_a_perfect_segment_model_is_exact(mixture):
    edges = [1.0, 0.6, 0.3, 0.1, 0.0]
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = ExactSegments(mixture, edges)
    out, info = fewstep.sample(f, x_T, "mcd", 4, schedule=SCHED, edges=edges, return_info=True)
    assert info.eval_times == edges[:-1]
    assert torch.allclose(out, _solve(mixture, x_T, 1.0, 0.0), atol=1e-5)
    # fewer steps skip edges evenly; more steps split segments uniformly in time
    assert fewstep.samplers.prepare("mcd", 2, SCHED, edges=edges).eval_times == [1.0, 0.3]
    assert fewstep.samplers.prepare("mcd", 6, SCHED, edges=edges).eval_times == pytest.approx([1.0, 0.8, 0.6, 0.45, 0.3, 0.1])
    assert fewstep.samplers.prepare("mcd", 3, SCHED, segments=3).grid.tolist() == fewstep.samplers.prepare("ddim", 3, SCHED).grid.tolist()


@pytest.mark.parametrize("nfe", [1, 3, 5])
def test_cm_multistep_is_algorithm_1(mixture, nfe):
    """Song et al. 2023, Algorithm 1 on EDM with CM's epsilon: x <- f(x_T, T); then
    x_tau = x + sqrt(tau^2 - eps^2) z and x <- f(x_tau, tau).  The value of f is the state at epsilon
    (no DDIM move from it), and the last f is the sample."""
    from fewstep.schedules import EDM

    sch, eps = EDM(sigma_min=0.002, sigma_max=80.0), 0.002
    f = mixture.denoiser(sch)  # any function of (x, t) serves as the consistency function here
    noise = torch.randn(6, mixture.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out, info = fewstep.sample(f, noise, "cm_multistep", nfe, boundary_time=eps, return_info=True,
                               generator=torch.Generator().manual_seed(9))
    taus, g = info.grid[:-1], torch.Generator().manual_seed(9)
    x = f(noise * taus[0], torch.tensor(taus[0], dtype=torch.float64))
    for tau in taus[1:]:
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = f(x + math.sqrt(tau**2 - eps**2) * z, torch.tensor(tau, dtype=torch.float64))
    assert torch.allclose(out, x, rtol=0, atol=1e-9), float((out - x).abs().max())  # measured 2e-11
