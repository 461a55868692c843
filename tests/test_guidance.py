"""CFG++ samplers: the paper's DDIM update, reductions, and the limits of the push front door."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep import FewstepScheduler
from fewstep.models import ClassifierFreeGuidance, GaussianMixture
from fewstep.samplers import prepare
from fewstep.samplers.core import UnguidedWarning


@pytest.fixture(scope="module")
def guided(digits_mixture, ddpm_schedule):
    """Class-conditional model: ``c = 1`` is the mixture's first component, ``c = 0`` the mixture."""
    one = GaussianMixture(torch.ones(1), digits_mixture.means[:1], digits_mixture.covariances[:1])
    d_u, d_c = digits_mixture.denoiser(ddpm_schedule), one.denoiser(ddpm_schedule)

    def den(x, t, c):
        return torch.where(c.reshape(-1, 1) > 0.5, d_c(x, t), d_u(x, t))

    den.schedule = ddpm_schedule
    return den


COND = {"c": torch.ones(1, 1, dtype=torch.float64)}
UNCOND = {"c": torch.zeros(1, 1, dtype=torch.float64)}


def test_cfgpp_ddim_is_the_papers_update(guided, ddpm_schedule):
    """Chung et al. 2024, the DDIM update: ``x' = alpha' D_w + sigma' eps_u``."""
    cfg = ClassifierFreeGuidance(guided, 0.6, UNCOND)
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fewstep.sample(cfg, noise, "cfgpp_ddim", 6, cond=COND)
    x, grid = noise.clone(), prepare("ddim", 6, ddpm_schedule).grid.tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        (a, s), (a2, s2) = ddpm_schedule.alpha_sigma(t), ddpm_schedule.alpha_sigma(t_next)
        d_w = cfg(x, torch.tensor(t, dtype=torch.float64), **COND)
        x = a2 * d_w + s2 * (x - a * cfg.last_uncond) / s
    assert torch.allclose(out, x, rtol=0, atol=1e-10)
    plain = fewstep.sample(cfg, noise, "ddim", 6, cond=COND)
    assert float((plain - out).abs().max()) > 1e-2


def test_cfgpp_dpmpp_2m_steps_from_the_guided_point(guided):
    """Without guidance (scale 0: the unconditional model) CFG++ is DPM-Solver++(2M); with it,
    each step starts from ``x + alpha (D_w - D_u)``."""
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg0 = ClassifierFreeGuidance(guided, 0.0, UNCOND)
    a = fewstep.sample(cfg0, noise, "cfgpp_dpmpp_2m", 8, cond=COND)
    b = fewstep.sample(lambda x, t: guided(x, t, **UNCOND), noise, "dpmpp_2m", 8, schedule=guided.schedule)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    cfg = ClassifierFreeGuidance(guided, 0.6, UNCOND)
    c = fewstep.sample(cfg, noise, "cfgpp_dpmpp_2m", 8, cond=COND)
    d = fewstep.sample(cfg, noise, "dpmpp_2m", 8, cond=COND)
    assert float((c - d).abs().max()) > 1e-2 and bool(torch.isfinite(c).all())


def test_unguided_denoiser_warns_and_runs_the_base_sampler(digits_mixture, ddpm_schedule):
    den = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(3, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with pytest.warns(UnguidedWarning, match="treated as unguided"):
        out = fewstep.sample(den, noise, "cfgpp_ddim", 5)
    assert torch.allclose(out, fewstep.sample(den, noise, "ddim", 5), rtol=0, atol=1e-12)


def test_clear_errors(guided):
    class Broken:
        schedule = guided.schedule
        last_uncond = None

        def __call__(self, x, t):
            return x

    with pytest.raises(ValueError, match="last_uncond is None, expected shape"):
        fewstep.sample(Broken(), torch.randn(2, 64), "cfgpp_ddim", 3)
    with pytest.raises(ValueError, match=r"combines the conditional and unconditional outputs itself.*ClassifierFreeGuidance"):
        FewstepScheduler(sampler="cfgpp_dpmpp_2m").set_timesteps(5)


def _authors_cfgpp_2m(cfg, noise, grid, schedule, cond, guided_history=False):
    """A direct transcription of the CFG++ authors' DPM-Solver++(2M) CFG++ loop
    (CFGpp-diffusion/CFGpp, latent_sdxl.py, DPMpp2mCFGppSolver), in k-diffusion's variables
    ``x / alpha`` and ``sigma / alpha`` of any VP schedule."""
    sig = [schedule.sigma(t) / schedule.alpha(t) for t in grid]
    t_fn = lambda s: -torch.log(torch.tensor(s, dtype=torch.float64))  # noqa: E731
    x = noise / schedule.alpha(grid[0])
    old_uncond = None
    for i in range(len(grid) - 1):
        a = schedule.alpha(grid[i])
        denoised = cfg(x * a, torch.tensor(grid[i], dtype=torch.float64), **cond)
        uncond = cfg.last_uncond
        if old_uncond is None or sig[i + 1] == 0:
            x = denoised + (x - uncond) / sig[i] * sig[i + 1]
        else:
            t, t_next = t_fn(sig[i]), t_fn(sig[i + 1])
            h = t_next - t
            r = (t - t_fn(sig[i - 1])) / h
            x = denoised - torch.exp(-h) * uncond - torch.expm1(-h) * (denoised - old_uncond) / (2 * r) + torch.exp(-h) * x
        old_uncond = denoised if guided_history else uncond
    return x * schedule.alpha(grid[-1])


@pytest.mark.parametrize("scale", [0.3, 0.8])
@pytest.mark.parametrize("end", ["zero", "min"])
def test_cfgpp_dpmpp_2m_is_the_authors_update(guided, ddpm_schedule, scale, end):
    """The D1 difference pairs the current guided prediction with the previous *unconditional* one."""
    cfg = ClassifierFreeGuidance(guided, scale, UNCOND)
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out, info = fewstep.sample(cfg, noise, "cfgpp_dpmpp_2m", 9, cond=COND, end=end, return_info=True)
    ref = _authors_cfgpp_2m(cfg, noise, info.grid, ddpm_schedule, COND)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10), float((out - ref).abs().max())
    # the previous *guided* prediction in D1 (fewstep's earlier variant) is measurably different
    other = _authors_cfgpp_2m(cfg, noise, info.grid, ddpm_schedule, COND, guided_history=True)
    assert float((out - other).abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["cfgpp_ddim", "cfgpp_dpmpp_2m"])
def test_cfgpp_refuses_a_classical_guidance_scale(guided, name):
    calls = []

    def counted(x, t, c):
        calls.append(1)
        return guided(x, t, c)

    counted.schedule = guided.schedule
    for w in (7.5, -0.1, torch.tensor([0.5, 1.5])):
        cfg = ClassifierFreeGuidance(counted, w, UNCOND)
        with pytest.raises(ValueError, match=r"lambda in \[0, 1\].*guidance_scale is"):
            fewstep.sample(cfg, torch.randn(2, 64, dtype=torch.float64), name, 4, cond=COND)
    assert not calls  # refused before any evaluation
    fewstep.sample(ClassifierFreeGuidance(counted, 1.0, UNCOND), torch.randn(2, 64, dtype=torch.float64), name, 4, cond=COND)
