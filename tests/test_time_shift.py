"""Time-Shift samplers: reduction to the base solvers, and the variance matching on a model whose
exposure bias is known exactly (data = a point mass at 0, so D = 0 and x_t = sigma_t z)."""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep import FewstepScheduler
from fewstep.samplers.time_shift import shifted_times
from fewstep.schedules import VPContinuous

SCHED = VPContinuous("linear")


@pytest.mark.parametrize("base", ["ddim", "dpmpp_2m", "dpmpp_3m", "deis_3"])
def test_without_shift_it_is_the_base_solver(digits_mixture, ddpm_schedule, base):
    den = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = fewstep.sample(den, noise, base, 7)
    for opts in ({"cutoff": 1.0}, {"window": 0.0}):
        assert torch.allclose(fewstep.sample(den, noise, "ts_" + base, 7, **opts), ref, rtol=0, atol=1e-12)
    shifted = fewstep.sample(den, noise, "ts_" + base, 7)
    assert float((shifted - ref).abs().max()) > 1e-3


def _t_of_variance(v: float) -> float:
    """VP: sigma^2 = v  <=>  lambda = log(alpha / sigma) = 0.5 log((1 - v) / v)."""
    return float(SCHED.t_from_lambda(0.5 * math.log((1.0 - v) / v)))


def test_shifted_times_match_the_variance():
    v = torch.tensor([0.5, 0.7, 0.99], dtype=torch.float64)
    t = shifted_times(SCHED, v, 0.2, 0.6)
    assert t[0].item() == pytest.approx(_t_of_variance(0.5), abs=1e-6)
    assert t[1].item() == pytest.approx(_t_of_variance(0.7), abs=1e-6)
    assert t[2].item() == 0.6  # outside the window: its edge


def test_exposure_bias_is_removed_on_an_exact_model():
    """Start 2% too wide (an exposure bias of the first step).  With D = 0 DDIM only rescales,
    so the bias persists; the time-shift sampler evaluates the second step at the time whose
    variance the sample has, which re-couples sample and time: the output has exactly the
    variance of its time."""
    z = torch.randn(5, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)  # unit sample variance per sample
    grid = [1.0, 0.35, 0.25, 0.12]
    seen = []

    def point_mass(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    out = fewstep.sample(point_mass, 1.02 * z, "ts_ddim", 3, schedule=SCHED, spacing=grid, window=1.0, cutoff=0.3)
    s1, s_end = SCHED.sigma(0.35) / SCHED.sigma(1.0), SCHED.sigma(0.12)
    assert seen[1].shape == (5,)  # one time per sample
    assert torch.allclose(seen[1], torch.full((5,), _t_of_variance((1.02 * s1) ** 2), dtype=torch.float64), atol=1e-5)
    assert float(seen[2]) == 0.25  # below the cutoff: the nominal time
    assert torch.allclose(out.var(1) / s_end**2, torch.ones(5, dtype=torch.float64), atol=1e-6)
    ddim = fewstep.sample(point_mass, 1.02 * z, "ddim", 3, schedule=SCHED, spacing=grid)
    assert torch.allclose(ddim.var(1) / s_end**2, torch.full((5,), (1.02 / SCHED.sigma(1.0)) ** 2, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match=r"chooses its evaluation times while sampling.*fewstep.sample"):
        FewstepScheduler(sampler="ts_dpmpp_2m").set_timesteps(5)
    with pytest.raises(ValueError, match="fractions of the schedule's time range"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 4), "ts_ddim", 4, schedule=SCHED, window=30)
    with pytest.raises(ValueError, match="at least 2"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 1), "ts_ddim", 4, schedule=SCHED)
