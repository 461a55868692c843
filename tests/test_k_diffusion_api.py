"""``fewstep.k_diffusion`` drives a tiny diffusers UNet the way ComfyUI's KSampler does, with the
same output as the registry sampler on the model's own schedule (issue 15).

ComfyUI's KSampler, read from ``comfy/samplers.py`` (not copied): the model is wrapped as a
k-diffusion denoiser in the variance-exploding form (input scaled by ``1 / sqrt(sigma^2 + 1)``,
``D = x - sigma eps``), the sigmas come from the scheduler, the noise is scaled to
``sqrt(1 + sigma_max^2)`` (its ``max_denoise`` start), the sampler function is called with
``extra_args={"seed": seed}`` (which seeds the sampler's noise) and a callback, and the output at
``sigma = 0`` is the sample.  The registry runs the same sampler on the UNet's VP schedule through
``DiffusersDenoiser``; the two runs meet because every registry sampler is written in forms that do
not depend on the ``x / alpha`` scaling.  The UNet runs in float64, so the bound is float64 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel

import fewstep
import fewstep.k_diffusion as K
from fewstep.models import DiffusersDenoiser
from fewstep.schedules import from_diffusers, k_sigma, time_grid

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
NAMES = ["euler", "heun", "dpmpp_2m", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_3m_sde",
         "lms", "ipndm_v", "res_multistep", "gradient_estimation", "er_sde"]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.double().eval()


def comfy_model(unet, sched):
    """ComfyUI's eps model wrapper as a k-diffusion denoiser (the fractional timestep of sigma, as
    k-diffusion's DiscreteEpsDDPMDenoiser with quantize=False; ComfyUI itself rounds to the nearest
    training timestep)."""

    def model(x, sigma, seed=None, **_):
        s = sigma.reshape(-1, 1, 1, 1)
        t = sched.t_from_lambda(-torch.log(sigma.double().cpu()))
        eps = unet(x / torch.sqrt(s**2 + 1), t.to(torch.float32)).sample
        return x - s * eps

    return model


@pytest.mark.parametrize("name", NAMES)
def test_ksampler_style_call_equals_registry(unet, name, one_thread):
    sched = from_diffusers(CONFIG)
    steps, seed = 6, 5
    grid = time_grid(sched, steps, "karras")
    sigmas = k_sigma(sched, grid)  # the KSampler's sigmas: karras on the model's range, then 0
    noise = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # ComfyUI's max_denoise start
    out = getattr(K, f"sample_{name}")(comfy_model(unet, sched), x, sigmas, extra_args={"seed": seed},
                                       callback=lambda d: calls.append((d["i"], float(d["sigma"]))), disable=True)
    assert calls == [(i, float(sigmas[i])) for i in range(steps)]
    spec = fewstep.spec(name)
    if name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):  # ComfyUI's default: a Brownian tree with that seed
        lo, hi = float(sigmas[sigmas > 0].min()), float(sigmas.max())
        gen = fewstep.samplers.BrownianNoise(seed, sigma_min=lo, sigma_max=hi)
    else:  # ComfyUI's default noise sampler: a CPU generator seeded seed + 1
        gen = torch.Generator().manual_seed(seed + 1)
    from fewstep.k_diffusion import _K_DEFAULTS  # the options the API takes from k-diffusion / ComfyUI

    ref = fewstep.sample(DiffusersDenoiser(unet, CONFIG), noise, name, steps=steps, spacing="karras", generator=gen,
                         **_K_DEFAULTS.get(name, {}))
    # a Brownian path is only Hoelder-1/2 in time: the API queries it at the given sigmas, the registry at
    # sigma/alpha of its times, equal to 1e-16, which moves the noise by ~1e-8
    tol = 1e-7 if isinstance(gen, fewstep.samplers.BrownianNoise) else 1e-10
    assert spec.name == name and float((out - ref).norm() / ref.norm()) < tol
