"""Every k-diffusion / ComfyUI spacing equals its definition on the same model sigmas, and the
published step tables reproduce the published numbers (issue 15).

The k-diffusion side calls k-diffusion's own ``get_sigmas_*``; ComfyUI's schedulers (GPL-3.0, read
only) are transcribed here independently from their definitions in ``comfy/samplers.py`` and
``comfy/model_sampling.py`` (ComfyUI master, 2025): each model exposes a sorted sigma table, a map
``timestep(sigma)`` and its inverse ``sigma(timestep)``, and each scheduler is a rule on those.
fewstep's grids are compared through the k-diffusion noise level ``k_sigma`` of their times.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fewstep.schedules import EDM, FlowMatching, VPContinuous, VPDiscrete, diffusers_betas, k_sigma, time_grid
from fewstep.step_tables import AYS_SIGMAS, AYS_TIMESTEPS, GITS_SD15

kd = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is a dev dependency")


def sd15() -> VPDiscrete:
    return VPDiscrete.from_betas(diffusers_betas(1000, 0.00085, 0.012, "scaled_linear"))


class ComfyDiscrete:
    """ComfyUI's ModelSamplingDiscrete: sigma table sqrt((1 - a)/a), timestep = nearest index,
    sigma(ts) = exp of the linear interpolation of log sigma between indices."""

    def __init__(self, sched: VPDiscrete):
        ac = sched.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()
        self.log_sigmas = self.sigmas.log()

    def timestep(self, sigma):
        return float(torch.argmin((math.log(sigma) - self.log_sigmas).abs()))

    def sigma(self, ts):
        ts = min(max(float(ts), 0.0), len(self.sigmas) - 1)
        lo, hi, w = math.floor(ts), math.ceil(ts), ts - math.floor(ts)
        return math.exp((1 - w) * float(self.log_sigmas[lo]) + w * float(self.log_sigmas[hi]))


class ComfyEDM:
    """ComfyUI's ModelSamplingContinuousEDM: 1000 log-uniform sigmas, timestep = log(sigma) / 4."""

    def __init__(self, sigma_min, sigma_max):
        self.sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000, dtype=torch.float64).exp()

    def timestep(self, sigma):
        return 0.25 * math.log(sigma)

    def sigma(self, ts):
        return math.exp(ts / 0.25)


class ComfyFlow:
    """ComfyUI's ModelSamplingDiscreteFlow (SD3): sigma(ts) = shift(ts / 1000), timestep = 1000 sigma."""

    def __init__(self, shift):
        self.shift = shift
        self.sigmas = torch.tensor([self.sigma(k) for k in range(1, 1001)], dtype=torch.float64)

    def timestep(self, sigma):
        return sigma * 1000

    def sigma(self, ts):
        t = ts / 1000.0
        return self.shift * t / (1 + (self.shift - 1) * t)


def comfy(ms, name, n, alpha=0.6, beta=0.6, threshold_noise=0.025):
    """ComfyUI's schedulers as defined in comfy/samplers.py, transcribed (n sigmas, then 0)."""
    table = [float(v) for v in ms.sigmas]
    if name == "simple":
        return [table[-(1 + int(x * len(table) / n))] for x in range(n)] + [0.0]
    if name == "ddim_uniform":
        out, x = [], 1
        while x < len(table):
            out.append(table[x])
            x += max(len(table) // n, 1)
        return out[::-1] + [0.0]
    if name in ("normal", "sgm_uniform"):
        start, end = ms.timestep(table[-1]), ms.timestep(table[0])
        ts = np.linspace(start, end, n + 1)[:-1] if name == "sgm_uniform" else np.linspace(start, end, n)
        return [ms.sigma(v) for v in ts] + [0.0]
    if name == "beta":
        total = len(table) - 1
        ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), alpha, beta) * total)
        out, last = [], -1
        for v in ts:
            if v != last:
                out.append(table[int(v)])
            last = v
        return out + [0.0]
    if name == "linear_quadratic":
        if n == 1:
            fr = [1.0, 0.0]
        else:
            ls = n // 2
            lin = [i * threshold_noise / ls for i in range(ls)]
            diff = ls - threshold_noise * n
            qs = n - ls
            a, b = diff / (ls * qs**2), threshold_noise / ls - 2 * diff / qs**2
            c = a * ls**2
            fr = [1.0 - v for v in lin + [a * i * i + b * i + c for i in range(ls, n)] + [1.0]]
        return [f * table[-1] for f in fr]
    if name == "kl_optimal":  # A1111 pull request 15608 / ComfyUI: tan of atan-uniform levels
        lo, hi = math.atan(table[0]), math.atan(table[-1])
        return [math.tan((i / (n - 1)) * lo + (1 - i / (n - 1)) * hi) for i in range(n)] + [0.0]
    raise KeyError(name)


MODELS = {
    "sd15": (sd15, lambda s: ComfyDiscrete(s)),
    "edm": (lambda: EDM(0.002, 120.0), lambda s: ComfyEDM(0.002, 120.0)),
    # ComfyUI's flow sigma_min is shift(1/1000): the same schedule in fewstep has t_min = shift(1/N)
    "flow": (lambda: FlowMatching(shift=3.0, t_min=3 * 0.001 / (1 + 2 * 0.001)), lambda s: ComfyFlow(3.0)),
}
COMFY = ["simple", "ddim_uniform", "normal", "sgm_uniform", "beta", "linear_quadratic", "kl_optimal"]


def levels(sched, grid):
    return k_sigma(sched, grid).tolist()


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", COMFY)
@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_comfyui_schedulers(model, name, n):
    make, comfy_ms = MODELS[model]
    sched = make()
    if name == "kl_optimal" and n == 1:
        ref = [float(comfy_ms(sched).sigmas[-1]), 0.0]  # ComfyUI divides by n - 1 = 0 here; the limit is sigma_max
    else:
        ref = comfy(comfy_ms(sched), name, n)
    if len(ref) != n + 1:  # ComfyUI's rule gives another step count at this n: fewstep refuses, saying so
        with pytest.raises(ValueError, match=f"gives {len(ref) - 1} steps, not {n}"):
            time_grid(sched, n, name)
        return
    if name == "linear_quadratic" and model != "flow":
        low = float(comfy_ms(sched).sigmas[0])
        if min(ref[:-1]) < low:  # Mochi's schedule below the model's smallest level: refused
            with pytest.raises(ValueError, match="below this model's smallest level"):
                time_grid(sched, n, name)
            return
    got = levels(sched, time_grid(sched, n, name))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=0)


def test_ddim_uniform_and_beta_counts_are_refused_where_comfyui_changes_them():
    sched = sd15()
    assert len(comfy(ComfyDiscrete(sched), "ddim_uniform", 7)) == 9  # ComfyUI: 8 steps for 7
    with pytest.raises(ValueError, match="gives 8 steps, not 7"):
        time_grid(sched, 7, "ddim_uniform")
    assert len(comfy(ComfyDiscrete(sched), "beta", 800)) < 801  # duplicates merged
    with pytest.raises(ValueError, match="merges"):
        time_grid(sched, 800, "beta")


@pytest.mark.parametrize("n", [1, 5, 12])
@pytest.mark.parametrize("end", ["zero", "min"])
def test_k_diffusion_sigma_spacings(n, end):
    """karras / exponential / polyexponential equal k-diffusion's functions on the same range (float32
    there: 2e-7 relative), on an EDM and on a VP model (sigma = sigma/alpha)."""
    for sched in (EDM(0.002, 80.0), sd15()):
        lo, hi = k_sigma(sched, sched.t_min), k_sigma(sched, sched.t_max)
        m = n if end == "zero" else n + 1
        for name, ref in (
            ("karras", kd.get_sigmas_karras(m, lo, hi, rho=7.0)),
            ("exponential", kd.get_sigmas_exponential(m, lo, hi)),
            ("polyexponential", kd.get_sigmas_polyexponential(m, lo, hi, rho=1.0)),
            ({"name": "polyexponential", "rho": 2.0}, kd.get_sigmas_polyexponential(m, lo, hi, rho=2.0)),
            ({"name": "karras", "rho": 3.0}, kd.get_sigmas_karras(m, lo, hi, rho=3.0)),
        ):
            ref = ref.double()[: n + 1] if end == "zero" else ref.double()[:-1]
            got = torch.tensor(levels(sched, time_grid(sched, n, name, end=end)), dtype=torch.float64)
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=5e-6, atol=1e-7)


def test_vp_spacing_is_k_diffusion_get_sigmas_vp():
    sched = VPContinuous("linear", beta_min=0.1, beta_max=20.0, t_min=1e-3)
    got = torch.tensor(levels(sched, time_grid(sched, 10, "vp")), dtype=torch.float64)
    t = torch.linspace(1, 1e-3, 10, dtype=torch.float64)  # k-diffusion's formula, in float64
    np.testing.assert_allclose(got.numpy(), [*torch.sqrt(torch.exp(19.9 * t**2 / 2 + 0.1 * t) - 1).tolist(), 0.0], rtol=1e-9)
    # k-diffusion computes exp(.) - 1 in float32, which cancels at small t (2e-4 relative at t = 1e-3)
    np.testing.assert_allclose(got.numpy(), kd.get_sigmas_vp(10).double().numpy(), rtol=3e-4)
    # on the VP-linear SDE itself, k-diffusion's vp sigmas are uniform times from 1 to 1e-3
    np.testing.assert_allclose(time_grid(sched, 10, "vp")[:-1].numpy(), np.linspace(1, 1e-3, 10), rtol=1e-9)
    with pytest.raises(ValueError, match="outside this schedule's range"):  # levels up to 152 on a model that stops at 80
        time_grid(EDM(0.002, 80.0), 10, "vp")


def test_spacing_parameters_are_checked():
    sched = sd15()
    a = time_grid(sched, 10, {"name": "beta", "alpha": 0.5, "beta": 0.7})
    np.testing.assert_allclose(levels(sched, a), comfy(ComfyDiscrete(sched), "beta", 10, alpha=0.5, beta=0.7), rtol=1e-10)
    with pytest.raises(TypeError, match="no parameter 'gamma'"):
        time_grid(sched, 10, {"name": "beta", "gamma": 1.0})
    with pytest.raises(ValueError, match="unknown spacing 'karas'.*karras"):
        time_grid(sched, 10, "karas")
    with pytest.raises(ValueError, match="sigma table"):  # ComfyUI's schedulers need a model's discrete table
        time_grid(VPContinuous("linear"), 10, "simple")
    with pytest.raises(ValueError, match="use end='zero'"):
        time_grid(sched, 10, "simple", end="min")


# ---------------------------------------------------------------------------------------------
# published tables
# ---------------------------------------------------------------------------------------------


def test_ays_tables_are_the_published_numbers():
    """The 10-step AYS schedules are the published ones (as diffusers ships them: timesteps of SD 1.5
    and SDXL, sigmas of SVD with the smallest level replaced by 0); on SD 1.5's schedule the
    timestep tables give the model's sigmas at those timesteps and then clean data."""
    from diffusers.schedulers import AysSchedules

    for name, key in (("ays_sd15", "StableDiffusionTimesteps"), ("ays_sdxl", "StableDiffusionXLTimesteps")):
        assert list(AYS_TIMESTEPS[name][:10]) == AysSchedules[key] and AYS_TIMESTEPS[name][10] == 0
    assert list(AYS_SIGMAS["ays_svd"][:10]) == AysSchedules["StableDiffusionVideoSigmas"][:10]
    sched = sd15()
    for name in ("ays_sd15", "ays_sdxl"):
        grid = time_grid(sched, 10, name)
        assert grid.tolist() == [*map(float, AYS_TIMESTEPS[name][:10]), -1.0]
    svd = EDM(0.002, 700.0)
    np.testing.assert_allclose(time_grid(svd, 10, "ays_svd").tolist(), [*AYS_SIGMAS["ays_svd"][:10], 0.0], rtol=1e-12)
    with pytest.raises(ValueError, match="does not apply"):  # SD's timesteps on a model of another sigma range
        time_grid(VPDiscrete.from_betas(diffusers_betas(1000)), 10, "ays_sd15")


@pytest.mark.parametrize("n", [4, 20, 32])
def test_ays_log_linear_interpolation(n):
    """Other step counts: log sigma interpolated linearly over the table's positions (NVIDIA's
    AYS how-to), n + 1 levels of which the last becomes clean data."""
    sched = sd15()
    table = np.asarray([float(k_sigma(sched, float(t))) for t in AYS_TIMESTEPS["ays_sdxl"]])
    xs = np.linspace(0, 1, len(table))
    ref = np.exp(np.interp(np.linspace(0, 1, n + 1), xs, np.log(table[::-1])))[::-1]
    got = levels(sched, time_grid(sched, n, "ays_sdxl"))
    np.testing.assert_allclose(got[1:-1], ref[1:-1], rtol=1e-10)
    assert got[-1] == 0.0 and math.isclose(got[0], float(k_sigma(sched, sched.t_max)), rel_tol=1e-12)
    end_min = levels(sched, time_grid(sched, n, "ays_sdxl", end="min"))
    assert math.isclose(end_min[-1], float(k_sigma(sched, sched.t_min)), rel_tol=1e-12)


def test_gits_tables():
    """GITS (coefficient 1.20, SD 1.5): n + 1 levels for n = 2..20 on SD 1.5's scale (every level
    within 0.2% of one of the model's own sigmas: GITS picks times on a teacher's trajectory),
    beyond 20 the 20-step row interpolated; the 10-step row is the authors' published one."""
    sched = sd15()
    table = ComfyDiscrete(sched).sigmas
    for n, row in enumerate(GITS_SD15, start=2):
        assert len(row) == n + 1 and list(row) == sorted(row, reverse=True)
        nearest = [float(table[torch.argmin((table.log() - math.log(v)).abs())]) for v in row]
        np.testing.assert_allclose(row, nearest, rtol=2e-3)
    # the authors' 10-step schedule (the ComfyUI node's default coefficient 1.20), transcribed
    published_10 = [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
                    0.19894916, 0.09824532, 0.02916753]
    assert list(GITS_SD15[10 - 2]) == published_10
    got = levels(sched, time_grid(sched, 10, "gits_sd15"))
    np.testing.assert_allclose(got[1:-1], published_10[1:-1], rtol=1e-10)
    assert got[-1] == 0.0
    assert len(time_grid(sched, 30, "gits_sd15")) == 31
    with pytest.raises(ValueError, match="does not apply"):  # a table for SD's sigma range on another model
        time_grid(EDM(0.002, 80.0), 10, "gits_sd15")
