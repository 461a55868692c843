"""The samplers k-diffusion, ComfyUI and AUTOMATIC1111 users know, with the same numbers (issue 15):
equality with k-diffusion's own ``sample_*`` functions on identical sigmas and noise (float64,
relative difference under 1e-5; measured 1e-14), with diffusers' schedulers that implement them,
through the registry and through ``fewstep.k_diffusion``; names, aliases, ``steps=`` budgets and
the Brownian-tree noise source."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import fewstep
import fewstep.k_diffusion as K
from fewstep.samplers import BrownianNoise
from fewstep.schedules import EDM
from k_helpers import ListNoise, den, rel  # noqa: E402  (tests/k_helpers.py)

kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is a dev dependency")
TOL = 1e-5
def _noises(n, shape=(5, 8)):
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64) for i in range(n)]


# (registry name, options for both, fewstep options that are k-diffusion's behaviour)
CASES = [
    ("euler", {}, {}),
    ("heun", {}, {}),
    ("dpm_2", {}, {}),
    ("lms", {}, {"denoise_final": False}),
    ("lms", {"order": 3}, {"denoise_final": False}),
    ("dpmpp_2m", {}, {}),
    ("euler_ancestral", {}, {}),
    ("euler_ancestral", {"eta": 0.6, "s_noise": 0.9}, {}),
    ("dpm_2_ancestral", {}, {}),
    ("dpm_2_ancestral", {"eta": 0.5, "s_noise": 1.1}, {}),
    ("dpmpp_2s_ancestral", {}, {}),
    ("dpmpp_2s_ancestral", {"eta": 0.7}, {}),
    ("dpmpp_sde", {}, {}),
    ("dpmpp_sde", {"eta": 0.5, "s_noise": 0.8, "r": 0.4}, {}),
    ("dpmpp_2m_sde", {}, {"lower_order_final": False}),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7, "s_noise": 0.9}, {"lower_order_final": False}),
    ("dpmpp_3m_sde", {}, {"lower_order_final": False, "d2_weight": 0.5}),
    ("dpmpp_3m_sde", {"eta": 0.5}, {"lower_order_final": False, "d2_weight": 0.5}),
]


def _k_run(name, sigmas, x, kopts, noises):
    fn = getattr(kd, f"sample_{name}")
    extra = {}
    if "noise_sampler" in inspect.signature(fn).parameters:
        it = iter(list(noises))
        extra["noise_sampler"] = lambda s, sn: next(it)
    return fn(den, x, sigmas, disable=True, **kopts, **extra)


@pytest.mark.parametrize("steps", [3, 10])
@pytest.mark.parametrize("name, kopts, fopts", CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_registry_equals_k_diffusion(name, kopts, fopts, steps):
    """The registry sampler on an EDM schedule whose grid is k-diffusion's sigmas, with the same
    noise draws in the same order, is k-diffusion's ``sample_<name>``."""
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0).double()
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noises = _noises(3 * steps)
    ref = _k_run(name, sigmas, noise * sigmas[0], kopts, noises)
    out = fewstep.sample(den, noise, name, steps=steps, schedule=EDM(0.002, 80.0), spacing=sigmas,
                         generator=ListNoise(noises), **kopts, **fopts)
    assert rel(out, ref) < TOL


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("churn", [dict(s_churn=2.0), dict(s_churn=40.0, s_noise=1.003), dict(s_churn=5.0, s_tmin=0.05, s_tmax=10.0)])
def test_churn_equals_k_diffusion(monkeypatch, name, churn):
    """EDM's churn (Algorithm 2): k-diffusion 0.1.1 draws torch.randn_like at every step and uses the
    draw where S_tmin <= sigma <= S_tmax; fewstep draws only there, so it gets those draws."""
    steps = 8
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0).double()
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noises = _noises(steps)
    it = iter(list(noises))
    with monkeypatch.context() as m:
        m.setattr(torch, "randn_like", lambda x: next(it))
        ref = getattr(kd, f"sample_{name}")(den, noise * sigmas[0], sigmas, disable=True, **churn)
    used = [z for z, s in zip(noises, sigmas[:-1]) if churn.get("s_tmin", 0.0) <= float(s) <= churn.get("s_tmax", math.inf)]
    out, info = fewstep.sample(den, noise, name, steps=steps, schedule=EDM(0.002, 80.0), spacing=sigmas,
                               generator=ListNoise(used), return_info=True, **churn)
    assert rel(out, ref) < TOL and info.stochastic
    if churn.get("s_tmax", math.inf) >= float(sigmas[0]):  # the first evaluation is at sigma_hat = (1 + gamma) sigma_max
        assert info.eval_times[0] > float(sigmas[0])


@pytest.mark.parametrize("name, kopts, fopts", [c for c in CASES if c[0] in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")][::2],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_brownian_noise_equals_k_diffusion_tree(name, kopts, fopts):
    """k-diffusion's default noise for its SDE samplers, a BrownianTreeNoiseSampler over the grid's
    [sigma_min, sigma_max]: BrownianNoise with the same seed (and the tree's ends) gives the same samples."""
    pytest.importorskip("torchsde")
    steps = 10
    sigmas = kd.get_sigmas_karras(steps, 0.002, 80.0).double()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    lo, hi = float(sigmas[sigmas > 0].min()), float(sigmas.max())
    ref = getattr(kd, f"sample_{name}")(den, x * sigmas[0], sigmas, disable=True,
                                         noise_sampler=kd.BrownianTreeNoiseSampler(x * sigmas[0], lo, hi, seed=42), **kopts)
    out = fewstep.sample(den, x, name, steps=steps, schedule=EDM(lo, hi), spacing=sigmas,
                         generator=BrownianNoise(42, sigma_min=lo, sigma_max=hi), **kopts, **fopts)
    assert rel(out, ref) < TOL
    # one seed per sample: each sample its own path, independent of the batch it is in
    per = [fewstep.sample(den, x[i:i + 1], name, steps=steps, schedule=EDM(lo, hi), spacing=sigmas,
                          generator=BrownianNoise([7 + i]), **kopts, **fopts) for i in range(2)]
    both = fewstep.sample(den, x[:2], name, steps=steps, schedule=EDM(lo, hi), spacing=sigmas,
                          generator=BrownianNoise([7, 8]), **kopts, **fopts)
    assert torch.equal(torch.cat(per), both)


# ---------------------------------------------------------------------------------------------
# the k-diffusion-shaped API
# ---------------------------------------------------------------------------------------------

K_NAMES = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
           "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.mark.parametrize("name", K_NAMES)
def test_api_equals_k_diffusion(name):
    """fewstep.k_diffusion.sample_<name> is a drop-in for k_diffusion.sampling.sample_<name>: the
    same samples and the same callback dicts, with k-diffusion's default options."""
    steps = 7
    sigmas = kd.get_sigmas_karras(steps, 0.03, 14.6).double()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * sigmas[0]
    kw_k, kw_f = {}, {}
    if "noise_sampler" in inspect.signature(getattr(kd, f"sample_{name}")).parameters:
        lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
        kw_k = {"noise_sampler": kd.BrownianTreeNoiseSampler(x, lo, hi, seed=5)}
        kw_f = {"noise_sampler": K.BrownianTreeNoiseSampler(x, lo, hi, seed=5)}
    got_k, got_f = [], []
    ref = getattr(kd, f"sample_{name}")(den, x, sigmas, disable=True, callback=got_k.append, **kw_k)
    out = getattr(K, f"sample_{name}")(den, x, sigmas, callback=got_f.append, **kw_f)
    assert rel(out, ref) < TOL
    assert [d["i"] for d in got_f] == [d["i"] for d in got_k] == list(range(steps))
    for a, b in zip(got_k, got_f):
        assert set(b) >= {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert float(a["sigma"]) == float(b["sigma"]) and math.isclose(float(a["sigma_hat"]), float(b["sigma_hat"]), rel_tol=1e-12)
        assert rel(b["denoised"], a["denoised"]) < TOL and rel(b["x"], a["x"]) < TOL


def test_api_grids_and_helpers_equal_k_diffusion():
    for f, args in (("karras", (10, 0.002, 80.0)), ("exponential", (10, 0.002, 80.0)), ("polyexponential", (10, 0.002, 80.0, 2.0))):
        a, b = getattr(K, f"get_sigmas_{f}")(*args), getattr(kd, f"get_sigmas_{f}")(*args)
        assert a.dtype == b.dtype and float((a - b).abs().max() / b.max()) < 1e-6
    assert float((K.get_sigmas_vp(10) - kd.get_sigmas_vp(10)).abs().max() / 152) < 1e-6
    s = torch.tensor(3.0, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        assert [float(v) for v in K.get_ancestral_step(s, s / 2, eta)] == [float(v) for v in kd.get_ancestral_step(s, s / 2, eta)]
    x = torch.randn(2, 3)
    assert torch.equal(K.to_d(x, torch.tensor([2.0, 2.0]), x / 2), kd.to_d(x, torch.tensor([2.0, 2.0]), x / 2))
    assert torch.equal(K.append_zero(s.reshape(1)), kd.append_zero(s.reshape(1)))
    assert K.sample_dpmpp_2m_sde_gpu is K.sample_dpmpp_2m_sde


def test_api_comfyui_seed_and_short_grids():
    """extra_args['seed'] seeds the noise as ComfyUI does (a generator seeded seed + 1 on the CPU),
    and the model receives the seed too; a grid of one level returns x."""
    sigmas = kd.get_sigmas_karras(6, 0.03, 14.6).double()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * sigmas[0]
    seen = []

    def model(xx, sigma, seed=None):
        seen.append(seed)
        return den(xx, sigma)

    out = K.sample_euler_ancestral(model, x, sigmas, extra_args={"seed": 11})
    g = torch.Generator().manual_seed(12)
    ref = kd.sample_euler_ancestral(den, x, sigmas, disable=True,
                                    noise_sampler=lambda s, sn: torch.randn(x.shape, dtype=x.dtype, generator=g))
    assert rel(out, ref) < TOL and set(seen) == {11}
    assert K.sample_euler(den, x, sigmas[:1]) is x


# ---------------------------------------------------------------------------------------------
# diffusers' schedulers of the same samplers
# ---------------------------------------------------------------------------------------------


def _diffusers(cls, steps, spacing, x_T, net, noise_sampler=None, **kw):
    sch = cls(timestep_spacing=spacing, steps_offset=int(spacing == "leading"), **kw)
    sch.set_timesteps(steps)
    if noise_sampler is not None:
        sch.noise_sampler = noise_sampler
    x = x_T * sch.init_noise_sigma
    g = torch.Generator().manual_seed(5)
    for t in sch.timesteps:
        out = net(sch.scale_model_input(x, t), t)
        extra = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
        x = sch.step(out, t, x, **extra).prev_sample
    return sch, x


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("cls_name, name, fopts", [
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", {}),
    ("KDPM2DiscreteScheduler", "dpm_2", {}),
    ("KDPM2AncestralDiscreteScheduler", "dpm_2_ancestral", {}),
    ("LMSDiscreteScheduler", "lms", {"denoise_final": False}),
    ("DPMSolverSDEScheduler", "dpmpp_sde", {}),
])
def test_equals_diffusers(eps_net, cls_name, name, fopts, steps, spacing):
    """diffusers runs these in the variance-exploding form on its float32 sigmas; fewstep runs the
    registry sampler on the DDPM schedule with the grid of those sigmas, from the same start (diffusers'
    init_noise_sigma) and with the same noise: its generator's draws in order, or for DPMSolverSDE the
    draws of its noise sampler in order.  (DPMSolverSDE's own Brownian tree is queried at float32
    times computed by diffusers; a Brownian path is only Hoelder-1/2 in time, so one float32 ulp moves
    its noise by ~1e-4: the tree itself is compared with k-diffusion's in float64 above.)"""
    import diffusers

    from fewstep.models import PredictionDenoiser
    from fewstep.schedules import from_diffusers

    cls = getattr(diffusers, cls_name)
    x_T = torch.randn(6, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    noises = _noises(2 * steps, x_T.shape)
    draws = iter(list(noises))
    sampler = (lambda s, sn: next(draws)) if name == "dpmpp_sde" else None
    sch, ref = _diffusers(cls, steps, spacing, x_T, eps_net, noise_sampler=sampler)
    den_ = PredictionDenoiser(eps_net, from_diffusers(sch.config), "epsilon")
    sig = torch.unique_consecutive(sch.sigmas.double())  # the two-evaluation schedulers repeat their sigmas
    grid = torch.tensor([den_.schedule.t_from_lambda(-math.log(float(s))) if s > 0 else -1.0 for s in sig], dtype=torch.float64)
    start = float(sch.init_noise_sigma) / math.sqrt(1 + float(sig[0]) ** 2)  # diffusers' start, in VP form
    gen = ListNoise(noises) if name == "dpmpp_sde" else torch.Generator().manual_seed(5)
    out = fewstep.sample(den_, x_T * start, name, steps=len(grid) - 1, spacing=grid, generator=gen, **fopts)
    assert rel(out, ref) < TOL


# ---------------------------------------------------------------------------------------------
# names, aliases, steps
# ---------------------------------------------------------------------------------------------


def test_names_and_aliases_resolve():
    from fewstep.samplers.registry import resolve

    assert fewstep.spec("euler_a").name == "euler_ancestral" and fewstep.spec("Euler a").name == "euler_ancestral"
    s, presets, spacing = resolve("dpmpp_2m_karras")
    assert (s.name, presets, spacing) == ("dpmpp_2m", {}, "karras")
    assert resolve("DPM++ 2M SDE Karras")[0].name == "dpmpp_2m_sde" and resolve("DPM++ 2M SDE Karras")[2] == "karras"
    assert resolve("dpmpp_2m_sde_heun_exponential")[1:] == ({"solver_type": "heun"}, "exponential")
    assert resolve("uni_pc")[:2] == (fewstep.spec("unipc_3"), {"solver_type": "bh1"})
    assert resolve("euler_a_sgm_uniform")[2] == "sgm_uniform" and resolve("heun_ddim_uniform")[2] == "ddim_uniform"
    for name in ("DPM2 a Karras", "DPM++ 2S a", "k_lms", "dpmpp_3m_sde_gpu", "DPM++ SDE"):
        resolve(name)
    with pytest.raises(ValueError, match="unknown sampler 'eulr_a'.*euler_a"):
        fewstep.spec("eulr_a")
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve("dpmpp_2m_karass")
    assert "euler_a" not in fewstep.available()  # aliases are not registry entries


def test_combined_names_drive_both_doors(digits_mixture, ddpm_schedule):
    den_ = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = fewstep.sample(den_, noise, "dpmpp_2m_karras", 8)
    b = fewstep.sample(den_, noise, "dpmpp_2m", 8, spacing="karras")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already names the spacing 'karras'"):
        fewstep.sample(den_, noise, "dpmpp_2m_karras", 8, spacing="logsnr")
    c = fewstep.sample(den_, noise, "DPM++ 2M SDE Heun Karras", 8, generator=torch.Generator().manual_seed(1))
    d = fewstep.sample(den_, noise, "dpmpp_2m_sde", 8, spacing="karras", solver_type="heun", generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, d)
    from fewstep import FewstepScheduler
    from fewstep.models.prediction import from_x0

    sch = FewstepScheduler(sampler="euler_a_karras", sampler_options={"eta": 0.5})
    sch.set_timesteps(6)
    x = noise.clone()
    for i, t in enumerate(sch.timesteps):
        tt = float(sch.program.eval_times[i])
        a_, s_ = sch.schedule.alpha_sigma(tt)
        x = sch.step(from_x0("epsilon", den_(x, torch.tensor(tt, dtype=torch.float64)), x, a_, s_), t, x,
                     generator=torch.Generator().manual_seed(2) if i == 0 else None).prev_sample
    assert sch.program.spec.name == "euler_ancestral" and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name, steps, nfe", [("heun", 10, 19), ("dpm_2", 10, 19), ("dpmpp_sde", 10, 19), ("dpmpp_2s_ancestral", 4, 7),
                                               ("dpmpp_3s", 5, 13), ("dpmpp_2m", 10, 10), ("euler_ancestral", 10, 10), ("unipc_3", 7, 7)])
def test_steps_count_as_k_diffusion_counts(digits_mixture, name, steps, nfe):
    """steps=N is N solver steps (k-diffusion's len(sigmas) - 1): 10 Heun steps to sigma = 0 cost 19
    evaluations; the grid has N steps; steps and nfe are exclusive."""
    from fewstep.samplers.core import prepare, steps_to_nfe

    sched = EDM(0.002, 80.0)
    assert steps_to_nfe(name, steps, sched, spacing="karras") == nfe
    program = prepare(name, None, sched, steps=steps, spacing="karras")
    assert program.nfe == nfe and program.num_steps == steps and sum(program.evals_per_grid_step()) == nfe
    den_ = digits_mixture.denoiser(sched)
    out, info = fewstep.sample(den_, torch.randn(2, 64, dtype=torch.float64), name, steps=steps, return_info=True,
                               generator=torch.Generator().manual_seed(0))
    assert info.nfe == nfe and len(info.grid) == steps + 1
    with pytest.raises(TypeError, match="not both"):
        fewstep.sample(den_, torch.randn(2, 64, dtype=torch.float64), name, nfe, steps=steps)
    with pytest.raises(TypeError, match="steps must be an int"):
        prepare(name, None, sched, steps=2.5)
    if fewstep.spec(name).evals_per_step == 2:  # without the final step onto clean data every step costs two
        assert steps_to_nfe(name, steps, sched, end="min") == 2 * steps
