"""Momentum samplers: reductions to their base solvers, the paper's GHVB coefficients, k-diffusion's LMS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.samplers.momentum import ghvb_coefficients


@pytest.fixture(scope="module")
def setting(digits_mixture, ddpm_schedule):
    noise = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return digits_mixture.denoiser(ddpm_schedule), noise


@pytest.mark.parametrize("nfe", [5, 12])
def test_beta_one_is_the_base_solver(setting, nfe):
    den, noise = setting

    def same(a, b):
        return float((a - b).abs().max()) < 1e-12

    assert same(fewstep.sample(den, noise, "hb_dpmpp_2m", nfe, beta=1.0), fewstep.sample(den, noise, "dpmpp_2m", nfe))
    for k in (2, 3):
        # AB-k in rho, integrating the last interval onto clean data at full order as k-diffusion does
        lms = fewstep.sample(den, noise, f"deis_{k}", nfe, basis="rho", lower_order_final=False, denoise_final=False)
        assert same(fewstep.sample(den, noise, "hb_plms", nfe, beta=1.0, plms_order=k, denoise_final=False), lms)
        assert same(fewstep.sample(den, noise, f"ghvb_{k}", nfe, beta=1.0, denoise_final=False), lms)
    # and momentum changes the result
    assert not same(fewstep.sample(den, noise, "hb_dpmpp_2m", nfe), fewstep.sample(den, noise, "dpmpp_2m", nfe))


@pytest.mark.parametrize("nfe", [6, 15])
def test_hb_plms_without_momentum_equals_k_diffusion_lms(setting, ddpm_schedule, digits_mixture, nfe):
    kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is a dev dependency")
    den, noise = setting
    grid = fewstep.samplers.prepare("hb_plms", nfe, ddpm_schedule).grid.tolist()
    rho = torch.tensor([ddpm_schedule.sigma(t) / ddpm_schedule.alpha(t) for t in grid], dtype=torch.float64)

    def ve_denoiser(x, sigma):  # the same model in k-diffusion's variable x / alpha
        return digits_mixture.posterior_mean(x, 1.0, float(sigma.flatten()[0]))

    x_T = noise / ddpm_schedule.alpha(grid[0])  # our start, in x / alpha
    ref = kd.sample_lms(ve_denoiser, x_T, rho, disable=True, order=4)
    out = fewstep.sample(den, noise, "hb_plms", nfe, beta=1.0, plms_order=4, denoise_final=False)
    assert float((out - ref).norm() / ref.norm()) < 1e-9


@pytest.mark.parametrize("beta", [0.3, 0.6, 0.9])
def test_ghvb_on_equal_steps_has_the_papers_coefficients(beta):
    """On equal steps, once the start-up transient of the average has decayed, the variable-step
    order conditions give the paper's constant GHVB coefficients (Wizadwongsa et al. 2024; in their
    code, the Adams mixer with parameter beta, divided by beta)."""
    rho = list(np.linspace(10.0, 0.0, 121))
    paper = {
        2: np.array([2 + beta, -(2 - beta)]) / 2,
        3: np.array([18 + 5 * beta, -(24 - 8 * beta), 6 - beta]) / 12,
        4: np.array([46 + 9 * beta, -(78 - 19 * beta), 42 - 5 * beta, -(10 - beta)]) / 24,
    }
    for k, c in paper.items():
        assert np.allclose(ghvb_coefficients(rho, 0, 110, k, beta), c / beta, rtol=0, atol=1e-7)


def test_bad_momentum_options(setting):
    den, noise = setting
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        fewstep.sample(den, noise, "ghvb_3", 5, beta=0.0)
    with pytest.raises(ValueError, match="plms_order must be 1, 2, 3 or 4"):
        fewstep.sample(den, noise, "hb_plms", 5, plms_order=5)


@pytest.mark.parametrize("nfe,end", [(8, "zero"), (20, "zero"), (20, "min"), (8, "min")])
def test_hb_dpmpp_2m_is_the_authors_scheduler(setting, ddpm_schedule, nfe, end):
    """A transcription of the authors' MomentumDPMSolverMultistepScheduler (sWizad/momentum-diffusion):
    momentum on the second-order updates only, the average started at the first such update's
    direction ``D0 + D1/2``; first-order steps (the first, a lower-order final step below 15 steps,
    the step onto clean data) are plain DPM-Solver++(1)."""
    den, noise = setting
    beta = 0.7
    out, info = fewstep.sample(den, noise, "hb_dpmpp_2m", nfe, beta=beta, end=end, return_info=True)
    pts = [(ddpm_schedule.alpha(t), ddpm_schedule.sigma(t)) for t in info.grid]
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in pts]
    x, vel, prev = noise.clone(), None, None
    for i, t in enumerate(info.grid[:-1]):
        d = den(x, torch.tensor(t, dtype=torch.float64))
        (a_t, s_t), s_s, h = pts[i + 1], pts[i][1], lam[i + 1] - lam[i]
        first_order = i == 0 or (i == nfe - 1 and (s_t == 0 or nfe < 15))
        if first_order:
            x = (s_t / s_s) * x + a_t * -math.expm1(-h) * d
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            diff = d + 0.5 * (d - prev) / r0
            vel = diff if vel is None else (1 - beta) * vel + beta * diff
            x = (s_t / s_s) * x - a_t * math.expm1(-h) * vel
        prev = d
    assert torch.allclose(out, x, rtol=0, atol=1e-10), float((out - x).abs().max())
