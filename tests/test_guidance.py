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
