"""Schedules: identical to diffusers' alphas_cumprod, exact inverses, valid grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from fewstep.schedules import (
    EDM,
    SPACINGS,
    FlowMatching,
    VPContinuous,
    VPDiscrete,
    default_spacing,
    diffusers_betas,
    from_config,
    from_diffusers,
    time_grid,
)

BETA_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", rescale_betas_zero_snr=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(1e-4, 0.03, 500).tolist(), num_train_timesteps=500),
]


@pytest.mark.parametrize("cfg", BETA_CONFIGS, ids=lambda c: c.get("beta_schedule", "trained") + ("_zsnr" if c.get("rescale_betas_zero_snr") else ""))
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_alphas_cumprod_identical_to_diffusers(cfg, cls):
    ref = cls(**cfg)
    for source in (ref.config, dict(ref.config), ref):
        sched = from_diffusers(source)
        assert isinstance(sched, VPDiscrete)
        assert torch.equal(sched.alphas_cumprod, ref.alphas_cumprod.to(torch.float64))
    assert sched.zero_terminal_snr == bool(cfg.get("rescale_betas_zero_snr", False))


def test_dpmsolver_alphas_cumprod_match_before_its_zero_snr_clamp():
    ref = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    sched = from_diffusers(ref.config)
    # DPMSolverMultistepScheduler clamps a zero terminal alpha_bar to 2**-24; everything else is identical.
    assert torch.equal(sched.alphas_cumprod[:-1], ref.alphas_cumprod[:-1].to(torch.float64))
    assert float(sched.alphas_cumprod[-1]) == 0.0 and float(ref.alphas_cumprod[-1]) == 2**-24


def _all_schedules():
    return [
        from_diffusers(DDPMScheduler().config),
        from_diffusers(DDPMScheduler(beta_schedule="squaredcos_cap_v2").config),
        from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True).config),
        VPContinuous("linear"),
        VPContinuous("cosine"),
        EDM(),
        FlowMatching(shift=3.0),
    ]


@pytest.mark.parametrize("sched", _all_schedules(), ids=repr)
def test_lambda_round_trip(sched):
    t = torch.linspace(sched.t_zero, sched.t_max, 20001, dtype=torch.float64)[1:]
    lam = sched.lambda_(t)
    finite = torch.isfinite(lam)
    back = sched.t_from_lambda(lam[finite])
    assert float((back - t[finite]).abs().max()) < 1e-6
    # monotone: lambda decreases with time
    assert bool(torch.all(lam[finite][1:] < lam[finite][:-1]))
    assert sched.lambda_(sched.t_zero) == math.inf


@pytest.mark.parametrize("sched", [s for s in _all_schedules() if s.kind == "vp"], ids=repr)
def test_vp_alpha_sigma_unit_norm(sched):
    t = torch.linspace(sched.t_zero, sched.t_max, 5001, dtype=torch.float64)
    assert float((sched.alpha(t) ** 2 + sched.sigma(t) ** 2 - 1).abs().max()) < 1e-12


def test_vp_discrete_matches_alphas_cumprod_at_integers_and_clean_data():
    sched = from_diffusers(DDPMScheduler().config)
    n = torch.arange(0, 1000, dtype=torch.float64)
    assert torch.allclose(sched.alpha(n) ** 2, sched.alphas_cumprod, rtol=1e-13, atol=0)
    assert sched.alpha(-1.0) == 1.0 and sched.sigma(-1.0) == 0.0
    # float inputs give floats, tensors give float64 tensors
    assert isinstance(sched.alpha(10.0), float)
    assert sched.alpha(torch.tensor([1.0, 2.0])).dtype == torch.float64


def test_zero_snr_ends():
    sched = from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True).config)
    assert sched.alpha(sched.t_max) == 0.0 and sched.lambda_(sched.t_max) == -math.inf
    assert sched.t_from_lambda(-math.inf) == sched.t_max


def test_continuous_vp_closed_forms():
    lin = VPContinuous("linear", beta_min=0.1, beta_max=20.0)
    t = 0.37
    assert math.isclose(lin.log_alpha(t), -0.25 * t * t * 19.9 - 0.05 * t, rel_tol=1e-14)
    cos = VPContinuous("cosine")
    s = 0.008
    expect = math.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    assert math.isclose(cos.alpha(t), expect, rel_tol=1e-13)


@pytest.mark.parametrize("sched", _all_schedules(), ids=repr)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_grids_are_valid(sched, spacing):
    try:
        grid = time_grid(sched, 7, spacing)
    except ValueError as err:  # spacings that do not apply to this schedule must say why
        why = ("VPDiscrete", "zero SNR", "flow-matching", "sigma table", "does not apply", "outside this schedule's range",
               "steps, not 7")
        assert any(w in str(err) for w in why), str(err)
        return
    assert grid.dtype == torch.float64 and len(grid) == 8
    assert bool(torch.all(grid[1:] < grid[:-1]))
    assert float(grid[-1]) == sched.t_zero
    if spacing in ("leading", "vp"):  # diffusers' leading spacing, k-diffusion's fixed VP levels: at or below t_max
        assert float(grid[0]) <= sched.t_max
    else:
        assert math.isclose(float(grid[0]), sched.t_max, abs_tol=1e-9)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 25])
def test_diffusers_spacings_equal_dpmsolver_timesteps(spacing, steps):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(steps)
    grid = time_grid(from_diffusers(ref.config), steps, spacing, steps_offset=ref.config.steps_offset)
    assert grid[:-1].tolist() == ref.timesteps.double().tolist()
    assert float(grid[-1]) == -1.0  # final_sigmas_type="zero": clean data


def test_karras_grid_equals_k_diffusion():
    kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is a dev dependency")
    for n in (5, 10, 40):
        ref = kd.get_sigmas_karras(n, 0.002, 80.0, rho=7.0).double()
        grid = time_grid(EDM(0.002, 80.0), n, "karras")
        assert torch.allclose(grid, ref, rtol=1e-6, atol=0)  # k-diffusion builds its ramp in float32


def test_end_min_and_t_start():
    sched = VPContinuous("linear")
    grid = time_grid(sched, 4, "logsnr", end="min", t_start=0.5)
    assert math.isclose(float(grid[0]), 0.5) and math.isclose(float(grid[-1]), sched.t_min)
    lam = sched.lambda_(grid)
    assert torch.allclose(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(4), rtol=1e-10)


def test_user_grid_and_errors():
    sched = from_diffusers(DDPMScheduler().config)
    assert time_grid(sched, 2, [999, 500, -1]).tolist() == [999.0, 500.0, -1.0]
    with pytest.raises(ValueError, match="needs 3 times"):
        time_grid(sched, 2, [999, -1])
    with pytest.raises(ValueError, match="decrease strictly"):
        time_grid(sched, 2, [500, 999, -1])
    with pytest.raises(ValueError, match="outside the schedule's time range"):
        time_grid(sched, 2, [1500, 500, -1])
    with pytest.raises(ValueError, match="did you mean 'karras'"):
        time_grid(sched, 3, "karas")
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(sched, 0)
    zsnr = from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True).config)
    with pytest.raises(ValueError, match="zero SNR"):
        time_grid(zsnr, 4, "logsnr")
    with pytest.raises(ValueError, match="VPDiscrete"):
        time_grid(EDM(), 4, "trailing")


def test_other_families_from_diffusers_and_config_round_trip():
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    flow = from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(flow, FlowMatching) and flow.shift == 3.0
    # shift lowers lambda by log(shift) at matching grid positions
    u = torch.linspace(0.9, 0.1, 5, dtype=torch.float64)
    assert torch.allclose(flow.lambda_(flow.shift_time(u)), flow.lambda_(u) - math.log(3.0), atol=1e-12)
    edm = from_diffusers(EDMEulerScheduler())
    assert isinstance(edm, EDM) and edm.sigma(1.5) == 1.5 and edm.alpha(1.5) == 1.0
    for s in _all_schedules():
        r = from_config(s.config())
        t = torch.linspace(s.t_zero, s.t_max, 11, dtype=torch.float64)[1:-1]
        assert torch.allclose(r.lambda_(t), s.lambda_(t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot tell the noise schedule"):
        from_diffusers({"_class_name": "Mystery"})


def test_default_spacing_per_family():
    assert default_spacing(EDM()) == "karras"
    assert default_spacing(FlowMatching()) == "shifted"
    assert default_spacing(VPContinuous()) == "time_quadratic"


def test_betas_error_names_choices():
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        diffusers_betas(beta_schedule="cosine")


# --- endpoints, whatever the rounding of the torch build ----------------------------------------

FAMILIES = {
    "vp_linear": lambda: from_diffusers(dict(beta_schedule="linear")),
    "vp_scaled_linear": lambda: from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "vp_cosine_discrete": lambda: from_diffusers(dict(beta_schedule="squaredcos_cap_v2")),
    "vp_zero_snr": lambda: from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)),
    "vp_continuous_linear": lambda: VPContinuous("linear"),
    "vp_continuous_cosine": lambda: VPContinuous("cosine"),
    "edm": lambda: EDM(),
    "flow": lambda: FlowMatching(),
    "flow_shift3": lambda: FlowMatching(shift=3.0),
}


def _check_endpoints(sched):
    t0, t_min, t_max = sched.t_zero, sched.t_min, sched.t_max
    for like in (float(t0), torch.tensor(float(t0), dtype=torch.float64)):  # Python and tensor inputs
        assert float(sched.alpha(like)) == 1.0 and float(sched.sigma(like)) == 0.0
        assert float(sched.lambda_(like)) == math.inf and float(sched.log_sigma(like)) == -math.inf
    dense = torch.cat([torch.linspace(t0, t_max, 2001, dtype=torch.float64), torch.tensor([t_min, t_max], dtype=torch.float64)])
    la, ls = sched.log_alpha_sigma(dense)
    assert not bool(torch.isnan(la).any() or torch.isnan(ls).any())
    assert bool((la <= 0).all()), "alpha must lie in [0, 1]"
    if sched.kind == "vp":
        assert bool((ls <= 0).all()), "a VP sigma must lie in [0, 1]"
        assert torch.allclose(torch.exp(2 * la) + torch.exp(2 * ls), torch.ones_like(la), rtol=0, atol=1e-12)
    assert math.isfinite(sched.lambda_(t_min)) and math.isfinite(sched.sigma(t_max))
    lam = sched.lambda_(dense[:2001])
    assert bool((lam[1:] <= lam[:-1]).all()), "log-SNR must not increase with time"
    assert sched.t_from_lambda(math.inf) == t0
    if sched.zero_terminal_snr:
        assert sched.alpha(t_max) == 0.0 and sched.sigma(t_max) == 1.0 and sched.lambda_(t_max) == -math.inf


@pytest.mark.parametrize("name", FAMILIES)
def test_schedule_endpoints_are_exact(name):
    _check_endpoints(FAMILIES[name]())


def _one_ulp_off(fn):
    """``fn`` as another build might round it: one ulp up, except where every conforming library is
    exact (at argument 0, log at 1, and results 0 or infinite such as exp(-inf))."""

    def wrapped(x, *args, **kwargs):
        out = fn(x, *args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        xt = torch.as_tensor(x)
        exact = (xt == 0) | ((xt == 1) if fn in (torch.log, torch.log1p) else torch.zeros_like(xt, dtype=torch.bool))
        exact = exact | ~torch.isfinite(out) | (out == 0)
        return torch.where(exact, out, torch.nextafter(out, torch.full_like(out, math.inf)))

    return wrapped


@pytest.mark.parametrize("name", FAMILIES)
def test_schedule_endpoints_survive_other_rounding(name, monkeypatch):
    """The cosine VP schedule used to compute log alpha(0) = log cos(a0) - log cos(a0): +1e-20 on one
    torch build made sigma(0) NaN and every sampler's output NaN.  With every elementary function
    rounded one ulp differently, the endpoints must stay exact and nothing may become NaN."""
    sched = FAMILIES[name]()
    for fn in ("cos", "sin", "tan", "exp", "log", "expm1", "log1p", "sqrt", "arccos", "atan2", "sigmoid"):
        monkeypatch.setattr(torch, fn, _one_ulp_off(getattr(torch, fn)))
    _check_endpoints(sched)


def test_cosine_inverse_is_accurate_near_clean_data():
    sched = VPContinuous("cosine")
    t = torch.tensor([1e-12, 1e-9, 1e-6, 1e-3, 0.5, 0.99], dtype=torch.float64)
    back = sched.t_from_lambda(sched.lambda_(t))
    assert torch.allclose(back, t, rtol=1e-12, atol=0)
