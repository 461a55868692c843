"""Sampler registry and the pull front door: exact NFE, clear errors, dtypes, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

import fewstep
from fewstep.models import PredictionDenoiser
from fewstep.samplers import NonFiniteError
from fewstep.samplers.core import NoiseSource
from fewstep.schedules import EDM, FlowMatching, VPContinuous, from_diffusers

from conftest import CountingDenoiser

ALL = fewstep.available()
DDPM = from_diffusers(DDPMScheduler().config)


def test_registry_metadata():
    assert {"ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2s", "dpmpp_3s", "dpmpp_2m_sde", "deis_1", "deis_2", "deis_3"} <= set(ALL)
    for name in ALL:
        s = fewstep.spec(name)
        d = s.describe()
        assert d["name"] == name and s.paper and s.summary and s.evals_per_step >= 1
        assert s.model_kind in ("diffusion", "consistency")
    assert fewstep.spec("dpmpp_3m").order == 3 and fewstep.spec("dpmpp_2m_sde").stochastic
    assert fewstep.samplers.available(family="deis") == ["deis_1", "deis_2", "deis_3", "lms"]  # lms: rhoAB-DEIS


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpmpp2m'.*did you mean 'dpmpp_2m'"):
        fewstep.spec("dpmpp2m")
    with pytest.raises(ValueError, match="did you mean"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 3), "ddmi", 5, schedule=DDPM)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 7, 10, 13])
@pytest.mark.parametrize("end", ["zero", "min"])
def test_exact_nfe(name, nfe, end, eps_net):
    den = CountingDenoiser(PredictionDenoiser(eps_net, DDPM, "epsilon"))
    out, info = fewstep.sample(den, torch.randn(3, 8, dtype=torch.float64), name, nfe, end=end, return_info=True,
                               generator=torch.Generator().manual_seed(0))
    assert den.calls == nfe == info.nfe
    assert bool(torch.isfinite(out).all())
    # evaluation times are real schedule times with sigma > 0
    assert all(DDPM.sigma(t) > 0 for t in den.times)


@pytest.mark.parametrize("name", [n for n in ALL if fewstep.spec(n).push_style])
@pytest.mark.parametrize("nfe", [5, 32, 50, 200])
def test_evaluation_times_are_training_times(name, nfe):
    """Every evaluation of every default grid is at a time the network was trained on."""
    try:
        program = fewstep.samplers.prepare(name, nfe, DDPM)
    except ValueError as err:  # a budget this sampler cannot meet (lcm's timestep table) says how
        assert "nfe" in str(err) or "steps" in str(err), str(err)
        return
    assert all(DDPM.t_min <= t <= DDPM.t_max for t in program.eval_times)


@pytest.mark.parametrize("name", ALL)
def test_budget_below_minimum_says_the_minimum(name):
    with pytest.raises(ValueError, match=rf"needs at least nfe={fewstep.spec(name).min_nfe}"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 3), name, 0, schedule=DDPM)
    with pytest.raises(TypeError, match="nfe must be an int"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 3), name, 2.5, schedule=DDPM)


def test_singlestep_budget_split():
    from fewstep.samplers.dpm_solver import singlestep_orders

    assert singlestep_orders(10, 2, True) == [2, 2, 2, 2, 1, 1]
    assert singlestep_orders(9, 3, False) == [3, 3, 3]
    # a remainder of one evaluation becomes two second-order steps: no first-order step caps order 3
    assert singlestep_orders(11, 3, True) == [3, 3, 2, 2, 1]
    assert singlestep_orders(10, 3, False) == [3, 3, 2, 2]
    assert singlestep_orders(12, 3, True) == [3, 3, 3, 2, 1]
    assert singlestep_orders(2, 3, True) == [1, 1] and singlestep_orders(1, 3, False) == [1]
    for n in range(1, 20):
        for o in (2, 3):
            for to_data in (True, False):
                orders = singlestep_orders(n, o, to_data)
                assert sum(orders) == n
                body = orders[:-1] if to_data else orders
                if o == 3 and len(body) > 1:  # no first-order step before the end unless the budget is tiny
                    assert min(body) >= 2, (n, orders)


def test_unknown_option_is_an_error_not_a_network_input(eps_net):
    den = PredictionDenoiser(eps_net, DDPM, "epsilon")
    with pytest.raises(TypeError, match=r"ddim has no option 'etta'.*did you mean 'eta'"):
        fewstep.sample(den, torch.randn(2, 8), "ddim", 4, etta=0.5)
    with pytest.raises(TypeError, match="cond must be a mapping"):
        fewstep.sample(den, torch.randn(2, 8), "ddim", 4, cond=[1, 2])


def test_bad_inputs_are_clear_errors(eps_net):
    den = PredictionDenoiser(eps_net, DDPM, "epsilon")
    with pytest.raises(TypeError, match="floating-point"):
        fewstep.sample(den, torch.ones(2, 8, dtype=torch.int64), "ddim", 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fewstep.sample(den, [[0.0] * 8], "ddim", 4)
    with pytest.raises(ValueError, match="batched"):
        fewstep.sample(den, torch.randn(8), "ddim", 4)
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\) for input shape \(2, 8\)"):
        fewstep.sample(lambda x, t: x[:, :4], torch.randn(2, 8), "ddim", 4, schedule=DDPM)
    with pytest.raises(ValueError, match="pass schedule="):
        fewstep.sample(lambda x, t: x, torch.randn(2, 8), "ddim", 4)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 8), "ddim", 4, schedule="ddpm")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        fewstep.sample(den, torch.randn(2, 8), "ddim", 4, eta=-1)


@pytest.mark.parametrize("name", ALL)
def test_nan_from_network_names_the_cause(name):
    calls = {"n": 0}

    def bad(x, t):
        calls["n"] += 1
        return torch.full_like(x, float("nan")) if calls["n"] == 3 else torch.zeros_like(x)

    with pytest.raises(NonFiniteError, match=r"NaN/inf at evaluation 3 of 6.*float16 overflow"):
        fewstep.sample(bad, torch.randn(2, 8), name, 6, schedule=DDPM)


def test_prediction_type_schedule_mismatch():
    with pytest.raises(ValueError, match="flow_prediction.*rectified-flow schedule"):
        PredictionDenoiser(lambda x, t: x, DDPM, "flow_prediction")
    with pytest.raises(ValueError, match="v_prediction.*variance-preserving"):
        PredictionDenoiser(lambda x, t: x, EDM(), "v")
    with pytest.raises(ValueError, match="unknown prediction_type 'epsillon'.*did you mean 'epsilon'"):
        PredictionDenoiser(lambda x, t: x, DDPM, "epsillon")
    zsnr = from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True).config)
    den = PredictionDenoiser(lambda x, t: torch.zeros_like(x), zsnr, "epsilon")
    with pytest.raises(ValueError, match="zero SNR.*v_prediction"):
        fewstep.sample(den, torch.randn(2, 8), "ddim", 4, spacing="trailing")


@pytest.mark.parametrize("name", ALL)
def test_zero_snr_start_and_zero_final_sigma_stay_finite(name, eps_net):
    zsnr = from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True).config)
    den = PredictionDenoiser(eps_net, zsnr, "v_prediction")
    for spacing in ("trailing", "time_uniform", "time_quadratic"):
        for nfe in (1, 2, 5, 9):
            out = fewstep.sample(den, torch.randn(4, 8, dtype=torch.float64), name, nfe, spacing=spacing,
                                 generator=torch.Generator().manual_seed(0))
            assert bool(torch.isfinite(out).all()), (spacing, nfe)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(name, dtype, eps_net, digits_mixture):
    seen = set()
    inner = digits_mixture.denoiser(DDPM)

    def den(x, t):
        seen.add(x.dtype)
        assert t.dtype == torch.float64  # schedule maths stays float64
        return inner(x, t).to(x.dtype)

    noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    out = fewstep.sample(den, noise.to(dtype), name, 8, schedule=DDPM, generator=g())
    assert out.dtype == dtype and seen == {dtype}
    # half-precision networks get a float32 sampler state (and float32 sampler noise)
    ref = fewstep.sample(inner, noise, name, 8, generator=g())
    tol = {torch.float16: 0.02, torch.bfloat16: 0.1, torch.float32: 1e-6}[dtype]
    assert float((out.float() - ref).abs().mean()) < tol
    if not fewstep.spec(name).stochastic:
        ref64 = fewstep.sample(inner, noise.double(), name, 8)
        assert float((ref.double() - ref64).abs().max()) < 1e-4


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_batch_independent(name, digits_mixture):
    den = digits_mixture.denoiser(DDPM)
    noise = torch.randn(6, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]  # noqa: E731
    a = fewstep.sample(den, noise, name, 7, generator=gens())
    b = fewstep.sample(den, noise, name, 7, generator=gens())
    assert torch.equal(a, b)
    # per-sample generators: a sample does not depend on its batch companions
    parts = [fewstep.sample(den, noise[i : i + 2], name, 7, generator=gens()[i : i + 2]) for i in (0, 2, 4)]
    assert torch.allclose(torch.cat(parts), a, rtol=0, atol=1e-12)


def test_stochastic_samplers_use_the_generator(digits_mixture):
    den = digits_mixture.denoiser(DDPM)
    noise = torch.randn(4, 64, dtype=torch.float64)
    for name, opts in (("dpmpp_2m_sde", {}), ("ddim", {"eta": 1.0})):
        a = fewstep.sample(den, noise, name, 6, generator=torch.Generator().manual_seed(1), **opts)
        b = fewstep.sample(den, noise, name, 6, generator=torch.Generator().manual_seed(2), **opts)
        assert not torch.allclose(a, b)
    # eta = 0 makes the SDE solver the ODE solver
    a = fewstep.sample(den, noise, "dpmpp_2m_sde", 6, eta=0.0)
    b = fewstep.sample(den, noise, "dpmpp_2m", 6)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


class NoNoise(NoiseSource):
    """A noise source that fails the test if a sampler draws from it."""

    def randn_like(self, x):
        raise AssertionError("a deterministic program drew noise")


@pytest.mark.parametrize("name", ALL)
def test_registry_stochastic_flag_is_the_default_options_program(name, digits_mixture):
    """``spec.stochastic`` describes the sampler under its default options; the program (and
    ``SampleInfo.stochastic``) follows the options actually used, and deterministic runs never
    touch the noise source."""
    s = fewstep.spec(name)
    program = fewstep.samplers.prepare(name, max(4, s.min_nfe), DDPM)
    assert program.stochastic == s.stochastic
    if not s.needs:
        den = digits_mixture.denoiser(DDPM)
        noise = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1) if s.stochastic else NoNoise()
        _, info = fewstep.sample(den, noise, name, max(4, s.min_nfe), generator=gen, return_info=True)
        assert info.stochastic == s.stochastic


def test_options_decide_whether_a_run_is_stochastic():
    for name, opts, stochastic in (("ddim", {"eta": 1.0}, True), ("ddim", {}, False), ("ctm", {"gamma": 0.5}, True),
                                   ("ctm", {}, False), ("tcd", {"gamma": 0.0}, False), ("cm_multistep", {}, True)):
        assert fewstep.samplers.prepare(name, 4, DDPM, **opts).stochastic == stochastic, (name, opts)
    assert fewstep.samplers.prepare("cm_multistep", 1, DDPM).stochastic is False  # one step: nothing to re-noise
    assert "gamma > 0 re-noises (stochastic)" in fewstep.spec("ctm").summary


def test_conditioning_reaches_the_network_and_callback_sees_every_eval(eps_net):
    got = []

    def den(x, t, *, scale):
        got.append(scale)
        return x * 0 + scale

    steps = []
    out = fewstep.sample(den, torch.randn(2, 3), "dpmpp_3s", 7, schedule=DDPM, cond={"scale": 0.5},
                         callback=lambda i, t, x, x0: steps.append(i))
    assert got == [0.5] * 7 and steps == list(range(7))
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-5)


def test_sampling_keeps_no_graph_unless_asked():
    net = torch.nn.Linear(3, 3)
    den = PredictionDenoiser(lambda x, t: net(x), DDPM, "epsilon")
    noise = torch.randn(4, 3)
    with torch.enable_grad():
        out = fewstep.sample(den, noise, "dpmpp_2m", 4)
        assert not out.requires_grad  # like a diffusers pipeline: no activations kept per step
        noise.requires_grad_(True)
        out = fewstep.sample(den, noise, "dpmpp_2m", 4, grad=True)
        assert out.requires_grad
        out.sum().backward()
    assert noise.grad is not None and net.weight.grad is not None
    assert bool(torch.isfinite(noise.grad).all()) and float(net.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("schedule", [VPContinuous("cosine"), EDM(), FlowMatching(shift=2.0)], ids=repr)
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3s", "deis_3"])
def test_other_schedule_families_solve_the_ode(schedule, name):
    """Gaussian data N(0, c^2): the exact ODE scales x_t by sqrt((a_1^2 c^2 + s_1^2) / (a_0^2 c^2 + s_0^2))."""
    c = 0.5

    def den(x, t):
        a, s = schedule.alpha(t), schedule.sigma(t)
        return (a * c * c / (a * a * c * c + s * s)).to(x.dtype) * x

    noise = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t0 = schedule.t_max if not schedule.zero_terminal_snr else 0.99
    out = fewstep.sample(den, noise, name, 60, schedule=schedule, spacing="logsnr", end="min", t_start=t0)
    a0, s0 = schedule.alpha_sigma(t0)
    a1, s1 = schedule.alpha_sigma(schedule.t_min)
    exact = noise * schedule.noise_scale(t0) * math.sqrt((a1**2 * c * c + s1**2) / (a0**2 * c * c + s0**2))
    tol = 0.06 if fewstep.spec(name).order == 1 else 0.01  # 60 steps over ~15 units of log-SNR
    assert float((out - exact).abs().max()) < tol * float(exact.abs().max())


# --- fuzz: every bad input names its cause (issue 12) -------------------------------------------


@pytest.fixture
def mix_den(digits_mixture):
    return digits_mixture.denoiser(DDPM)


def test_absurd_budget_is_refused_at_once(mix_den):
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"nfe=10000000 is more than fewstep plans.*at most 100000"):
        fewstep.sample(mix_den, torch.randn(2, 64), "dpmpp_2m", 10**7)
    assert time.perf_counter() - start < 5


def test_nan_noise_is_the_noise_not_the_denoiser(mix_den):
    noise = torch.randn(2, 64)
    noise[1, 3] = float("nan")
    with pytest.raises(ValueError, match="noise contains NaN or inf"):
        fewstep.sample(mix_den, noise, "ddim", 4)
    with pytest.raises(ValueError, match="noise is empty"):
        fewstep.sample(mix_den, torch.randn(0, 64), "ddim", 4)


def test_nan_option_is_named(mix_den):
    with pytest.raises(ValueError, match=r"ddim: option eta=nan is NaN"):
        fewstep.sample(mix_den, torch.randn(2, 64), "ddim", 4, eta=float("nan"))
    with pytest.raises(ValueError, match="clip_denoised must be finite"):
        fewstep.sample(mix_den, torch.randn(2, 64), "ddim", 4, clip_denoised=float("inf"))


class _NanNoise(fewstep.samplers.core.NoiseSource):
    """Finite noise except from the ``bad``-th draw on."""

    def __init__(self, bad):
        super().__init__(torch.Generator().manual_seed(0))
        self.draws, self.bad = 0, bad

    def randn_like(self, x):
        self.draws += 1
        z = super().randn_like(x)
        return z * float("nan") if self.draws >= self.bad else z


@pytest.mark.parametrize("end,where", [("zero", r"before evaluation 3 of 4"), ("min", r"in the final sample")])
def test_nan_state_is_blamed_on_the_sampler_not_the_denoiser(mix_den, end, where):
    bad = 2 if end == "zero" else 4  # end="min": the last step adds noise too, after the last evaluation
    with pytest.raises(fewstep.samplers.NonFiniteError, match=where + r".*every denoiser output so far was finite.*eta=0.5"):
        fewstep.sample(mix_den, torch.randn(2, 64, dtype=torch.float64), "ddim", 4, eta=0.5, end=end, generator=_NanNoise(bad))


def test_option_types_are_checked(mix_den):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="sample_max_value must be at least 1"):
        fewstep.sample(mix_den, x, "ddim", 4, thresholding=True, sample_max_value=0.0)
    with pytest.raises(ValueError, match="sample_max_value must be at least 1"):
        fewstep.sample(mix_den, x, "ddim", 4, thresholding=True, sample_max_value=-2)
    with pytest.raises(TypeError, match="thresholding must be True or False"):
        fewstep.sample(mix_den, x, "ddim", 4, thresholding="yes")
    with pytest.raises(TypeError, match=r"orders must be whole numbers.*1.5"):
        fewstep.sample(mix_den, x, "dpmpp_3m", 4, orders=[1, 1.5, 2, 1])
    with pytest.raises(TypeError, match=r"lower_order_final must be True.*got 'no'"):
        fewstep.sample(mix_den, x, "dpmpp_2m", 4, lower_order_final="no")
    with pytest.raises(TypeError, match="denoise_final must be True or False"):
        fewstep.sample(mix_den, x, "deis_2", 4, denoise_final=0)
    # the integer form of lower_order_final is a step threshold
    ramp = fewstep.samplers.prepare("dpmpp_3m", 12, DDPM, end="min", lower_order_final=10).orders
    full = fewstep.samplers.prepare("dpmpp_3m", 12, DDPM, end="min", lower_order_final=13).orders
    assert ramp[-1] == 3 and full[-2:] == [2, 1]


def test_readme_import_gives_the_tune_function():
    from fewstep.samplers import tune

    assert callable(tune) and tune.__module__ == "fewstep.samplers.tuning"
    assert fewstep.samplers.tune is tune


def test_push_door_refuses_bad_model_output_and_budget():
    from fewstep import FewstepScheduler

    sch = FewstepScheduler(sampler="dpmpp_2m")
    with pytest.raises(TypeError, match=r"num_inference_steps must be a whole number.*2.5"):
        sch.set_timesteps(2.5)
    sch.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    t = sch.timesteps[0]
    with pytest.raises(ValueError, match=r"model output of shape \(2, 8, 8, 8\).*learned variance"):
        sch.step(torch.randn(2, 8, 8, 8), t, x)
    bad = torch.randn(2, 4, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(fewstep.samplers.NonFiniteError, match="model output at evaluation 1 of 4.*holds NaN/inf"):
        sch.step(bad, t, x)
    zsnr = FewstepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                            spacing="trailing", sampler="ddim")
    zsnr.set_timesteps(4)
    with pytest.raises(ValueError, match="epsilon-prediction cannot give x0 at zero SNR.*v_prediction"):
        zsnr.step(torch.randn(2, 4, 8, 8), zsnr.timesteps[0], x)
    # a prediction whose conversion overflows is named as the model output's, not the sampler's
    sch.set_timesteps(4)
    with pytest.raises(fewstep.samplers.NonFiniteError, match="epsilon output at evaluation 1.*NaN/inf data prediction"):
        sch.step(torch.full((2, 4, 8, 8), 3e38), sch.timesteps[0], torch.full((2, 4, 8, 8), -3e38))
