"""UniPC against diffusers' UniPCMultistepScheduler, and DC-Solver's fitted compensation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UniPCMultistepScheduler

import fewstep
from fewstep import FewstepScheduler
from fewstep.eval.exact import ExactStudy
from fewstep.models import PredictionDenoiser
from fewstep.samplers.dc_solver import compensation_weights, fit_dc_ratios
from fewstep.schedules import from_diffusers

TOL = 1e-5  # diffusers computes in float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _diffusers(sch, net, x, steps):
    sch.set_timesteps(steps)
    x = x.clone()
    for t in sch.timesteps:
        x = sch.step(net(x, t), t, x).prev_sample
    return x


@pytest.fixture
def x_T():
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("steps", [4, 7, 12])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant,final", [("bh2", "zero"), ("bh1", "sigma_min"), ("bh2", "sigma_min")])
def test_unipc_equals_diffusers(eps_net, x_T, steps, order, variant, final):
    sch = UniPCMultistepScheduler(solver_order=order, solver_type=variant, final_sigmas_type=final,
                                  prediction_type="v_prediction" if steps == 7 else "epsilon")
    ref = _diffusers(sch, eps_net, x_T, steps)
    den = PredictionDenoiser(eps_net, from_diffusers(sch.config), sch.config.prediction_type)
    end = -1.0 if final == "zero" else 0.0  # diffusers' sigma_min final is timestep 0
    grid = torch.cat([sch.timesteps.double(), torch.tensor([end], dtype=torch.float64)])
    out = fewstep.sample(den, x_T, f"unipc_{order}", steps, spacing=grid, solver_type=variant)
    assert rel(out, ref) < TOL


def test_unipc_corrector_options_equal_diffusers(eps_net, x_T):
    sch = UniPCMultistepScheduler(solver_order=3, disable_corrector=[1, 3], lower_order_final=False,
                                  final_sigmas_type="sigma_min", timestep_spacing="trailing")
    ref = _diffusers(sch, eps_net, x_T, 8)
    den = PredictionDenoiser(eps_net, from_diffusers(sch.config), "epsilon")
    grid = torch.cat([sch.timesteps.double(), torch.tensor([0.0], dtype=torch.float64)])
    out = fewstep.sample(den, x_T, "unipc_3", 8, spacing=grid, disable_corrector=[1, 3], lower_order_final=False)
    assert rel(out, ref) < TOL
    plain = fewstep.sample(den, x_T, "unipc_3", 8, spacing=grid, lower_order_final=False)
    assert rel(plain, ref) > 1e-4  # the disabled correctors mattered


def test_bh1_to_clean_data_stays_finite_where_diffusers_does_not(eps_net, x_T):
    """diffusers' bh1 multiplies B(h) = -inf by zero in the final step onto sigma = 0."""
    sch = UniPCMultistepScheduler(solver_type="bh1")
    assert torch.isnan(_diffusers(sch, eps_net, x_T, 5)).any()
    den = PredictionDenoiser(eps_net, from_diffusers(sch.config), "epsilon")
    assert torch.isfinite(fewstep.sample(den, x_T, "unipc_2", 5, solver_type="bh1")).all()


def test_corrector_adds_one_order(digits_mixture):
    """UniP-p is order p; with UniC it is p + 1 (the registry's order), at no extra evaluation."""
    from fewstep.schedules import VPContinuous

    sched = VPContinuous("linear", t_min=1e-3)
    noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = digits_mixture.ode_solve(noise, sched, sched.t_max, sched.t_min)
    den = digits_mixture.denoiser(sched)

    def slope(**opts):
        errs = [float((fewstep.sample(den, noise, "unipc_2", n, spacing="logsnr", end="min", lower_order_final=False, **opts)
                       - ref).pow(2).mean().sqrt()) for n in (128, 256)]
        return math.log(errs[0] / errs[1]) / math.log(2)

    assert abs(slope(corrector=False) - 2) < 0.3 and abs(slope() - 3) < 0.3


# --- DC-Solver ----------------------------------------------------------------------------------


def test_compensation_weights_interpolate():
    from fewstep.samplers.core import points
    from fewstep.eval.exact import default_schedule

    pts = points(default_schedule(), [900.0, 700.0, 400.0, 100.0])
    w = compensation_weights(pts, 2, 1.0, 2)  # ratio 1: m_i itself
    assert w == pytest.approx((1.0, 0.0, 0.0), abs=1e-12)
    w = compensation_weights(pts, 2, 0.5, 2)  # a quadratic in t is reproduced at tau = 550
    vals = [t * t for t in (400.0, 700.0, 900.0)]
    assert sum(wj * v for wj, v in zip(w, vals)) == pytest.approx(550.0**2, rel=1e-12)


@pytest.fixture(scope="module")
def study():
    return ExactStudy.make(num_samples=256, seed=3)


@pytest.mark.parametrize("order", [2, 3])
def test_dc_without_ratios_is_unipc(study, order):
    """So DC-Solver's convergence order is UniPC's (tests/test_convergence.py measures it once)."""
    den = study.model.denoiser(study.schedule)
    for spacing in ("time_quadratic", "logsnr"):
        a = fewstep.sample(den, study.noise[:16], f"dc_unipc_{order}", 9, spacing=spacing, lower_order_final=False)
        b = fewstep.sample(den, study.noise[:16], f"unipc_{order}", 9, spacing=spacing, lower_order_final=False)
        assert torch.equal(a, b)


def test_fitted_ratios_help_on_unseen_samples_and_round_trip(study, tmp_path):
    den = study.model.denoiser(study.schedule)
    fit_noise = torch.randn(12, 64, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    opts = fit_dc_ratios(den, fit_noise, "dc_unipc_3", 8, solver_type="bh1")
    assert len(opts["dc_ratios"]) == 8 and opts["dc_ratios"][:2] == [1.0, 1.0] and opts["solver_type"] == "bh1"
    assert any(abs(r - 1.0) > 0.01 for r in opts["dc_ratios"])
    base = study.evaluate("unipc_3", 8, solver_type="bh1").rmse
    dc = study.evaluate("dc_unipc_3", 8, **opts).rmse
    assert dc < 0.85 * base  # 0.046 vs 0.073 here
    # plain data: JSON and a scheduler config carry the fitted sampler
    back = json.loads(json.dumps(opts))
    assert study.evaluate("dc_unipc_3", 8, **back).rmse == dc
    sch = FewstepScheduler(sampler="dc_unipc_3", sampler_options=back)
    sch.save_pretrained(tmp_path)
    assert FewstepScheduler.from_pretrained(tmp_path).config.sampler_options["dc_ratios"] == opts["dc_ratios"]


def test_fitted_ratios_refuse_another_budget_or_grid(study):
    den = study.model.denoiser(study.schedule)
    opts = {"dc_ratios": [1.0, 1.0, 1.1, 0.9, 1.0], "dc_grid": fewstep.samplers.prepare("dc_unipc_2", 5, study.schedule).grid.tolist()}
    noise = study.noise[:2]
    with pytest.raises(ValueError, match=r"fitted for nfe=5, not nfe=6.*fit_dc_ratios"):
        fewstep.sample(den, noise, "dc_unipc_2", 6, **opts)
    with pytest.raises(ValueError, match="fitted on the grid"):
        fewstep.sample(den, noise, "dc_unipc_2", 5, spacing="logsnr", **opts)
    with pytest.raises(ValueError, match="first 2 ratios must be 1"):
        fewstep.sample(den, noise, "dc_unipc_2", 5, dc_ratios=[1.0, 0.9, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="is what fit_dc_ratios computes"):
        fit_dc_ratios(den, noise, "dc_unipc_2", 5, dc_ratios=[1.0] * 5)


@pytest.mark.parametrize("order", [2, 3])
def test_dc_with_a_ratio_other_than_one_is_first_order(digits_mixture, order):
    """The trade DC-Solver makes, measured in the setting of tests/test_convergence.py: a ratio
    rho != 1 moves the compensated prediction by (1 - rho) h, so with a fixed ratio 0.9 the error
    falls like NFE^-1 (measured slope 1.02 for both orders), where ratio 1 (plain UniPC) falls like
    NFE^-(order+1) (measured 2.9 and 4.3).  Hence the registry's order=1 for dc_unipc_*."""
    import numpy as np

    from fewstep.schedules import VPContinuous

    sched = VPContinuous("linear", t_min=1e-3)
    noise = torch.randn(32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = digits_mixture.ode_solve(noise, sched, sched.t_max, sched.t_min)
    den = digits_mixture.denoiser(sched)
    nfes = [128, 192, 288, 432]

    def slope(ratio):
        errs = []
        for n in nfes:
            out = fewstep.sample(den, noise, f"dc_unipc_{order}", n, spacing="logsnr", end="min", lower_order_final=False,
                                 dc_ratios=[1.0, 1.0] + [ratio] * (n - 2))
            errs.append(float(torch.sqrt(torch.mean((out - ref) ** 2))))
        return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]

    assert abs(slope(0.9) - 1.0) < 0.2
    assert slope(1.0) > order + 0.5
    assert fewstep.spec(f"dc_unipc_{order}").order == 1
