"""EDM's Euler and Heun against k-diffusion on identical sigmas, and Heun's budgets."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep.samplers.edm import heun_plan
from fewstep.schedules import EDM, time_grid

W = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / 3
EDM_SCHEDULE = EDM(0.002, 80.0)


def den(x, sigma):
    s = torch.as_tensor(sigma, dtype=x.dtype)
    s = s.reshape(-1, 1) if s.ndim else s
    return torch.tanh(x @ W) / (1 + s**2) + 0.1 * x * s**2 / (1 + s**2)


@pytest.fixture
def noise():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


@pytest.mark.parametrize("steps", [2, 5, 12])
@pytest.mark.parametrize("to_zero", [True, False])
def test_heun_and_euler_equal_k_diffusion(noise, steps, to_zero):
    kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is a dev dependency")
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0).double()
    if not to_zero:
        sigmas = sigmas[:-1]
    n = len(sigmas) - 1
    ref = kd.sample_heun(den, noise * sigmas[0], sigmas, disable=True)
    out, info = fewstep.sample(den, noise, "heun", 2 * n - 1 if to_zero else 2 * n, schedule=EDM_SCHEDULE,
                               spacing=sigmas, return_info=True)
    assert float((out - ref).norm() / ref.norm()) < 1e-10  # float64 rounding over sigma 80 -> 0.002
    assert info.nfe == (2 * n - 1 if to_zero else 2 * n)
    ref = kd.sample_euler(den, noise * sigmas[0], sigmas, disable=True)
    out = fewstep.sample(den, noise, "euler", n, schedule=EDM_SCHEDULE, spacing=sigmas)
    assert float((out - ref).norm() / ref.norm()) < 1e-10  # float64 rounding over sigma 80 -> 0.002


def test_euler_is_ddim(noise, ddpm_schedule):
    d = lambda x, t: torch.tanh(x @ W)  # noqa: E731
    a = fewstep.sample(d, noise, "euler", 7, schedule=ddpm_schedule)
    b = fewstep.sample(d, noise, "ddim", 7, schedule=ddpm_schedule)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_heun_budgets():
    # to clean data: Heun steps cost 2, the final Euler step 1; the parity is made up by a first Euler step
    assert heun_plan(9, True) == (0, 4) and heun_plan(10, True) == (1, 4) and heun_plan(1, True) == (0, 0)
    assert heun_plan(8, False) == (0, 4) and heun_plan(9, False) == (1, 4)
    assert heun_plan(9, True, zero_snr_start=True) == (2, 3)  # Heun cannot start at rho = inf
    for n in range(1, 12):
        for to_data in (True, False):
            e, h = heun_plan(n, to_data)
            assert e + 2 * h + to_data == n


def test_heun_on_an_explicit_grid_says_which_budget_works(noise):
    sigmas = torch.tensor(time_grid(EDM_SCHEDULE, 6, "karras").tolist()[:-1] + [0.0], dtype=torch.float64)  # 6 steps to 0
    with pytest.raises(ValueError, match=r"grid of 6 steps costs nfe=11.*got nfe=10"):
        fewstep.sample(den, noise, "heun", 10, schedule=EDM_SCHEDULE, spacing=sigmas)
    with pytest.raises(ValueError, match=r"grid of 5 steps costs nfe=10"):
        fewstep.sample(den, noise, "heun", 9, schedule=EDM_SCHEDULE, spacing=sigmas[:-1])


def test_heun_with_a_parity_euler_step_stays_second_order(digits_mixture):
    """An odd budget without a final step onto data starts with one Euler step: still second order."""
    from fewstep.schedules import VPContinuous

    sched = VPContinuous("linear", t_min=1e-3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = digits_mixture.ode_solve(x, sched, sched.t_max, sched.t_min)
    errs = [float((fewstep.sample(digits_mixture.denoiser(sched), x, "heun", n, spacing="logsnr", end="min") - ref)
                  .pow(2).mean().sqrt()) for n in (97, 193)]
    assert 3.3 < errs[0] / errs[1] < 4.7


def test_heun_decides_zero_snr_from_its_first_grid_time(eps_net):
    """On a zero-terminal-SNR schedule only a grid that starts at zero SNR needs Euler first steps:
    a teacher step over [500, 300] (distillation's IntervalSolver builds a grid that does not start
    at t_max) is one Heun step with two evaluations, equal to heun on that explicit grid."""
    from diffusers import DDPMScheduler

    from fewstep.distill.teacher import IntervalSolver
    from fewstep.models import PredictionDenoiser
    from fewstep.samplers.core import run_program
    from fewstep.schedules import from_diffusers

    zsnr = from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True))
    program = IntervalSolver("heun", zsnr).program(500.0, 300.0)
    assert program.eval_times == [500.0, 300.0]  # Heun: at the start, then at the Euler prediction
    den = PredictionDenoiser(eps_net, zsnr, "v_prediction")
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = fewstep.samplers.prepare("heun", 2, zsnr, spacing=[500.0, 300.0])
    euler = fewstep.samplers.prepare("euler", 2, zsnr, spacing=[500.0, 400.0, 300.0])
    assert torch.equal(run_program(program, den, x)[0], run_program(ref, den, x)[0])
    assert not torch.allclose(run_program(program, den, x)[0], run_program(euler, den, x)[0])
    # from t_max (alpha = 0) the budget is still met with Euler first steps, and stays finite
    start = fewstep.samplers.prepare("heun", 4, zsnr, spacing="trailing")
    assert start.grid[0] == zsnr.t_max and len(start.eval_times) == 4
    assert bool(torch.isfinite(run_program(start, den, x)[0]).all())
