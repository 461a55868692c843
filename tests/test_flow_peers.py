"""Flow-matching and EDM samplers equal diffusers' on identical settings, and the pull door equals
the push door for every push-style sampler on a flow transformer and on an EDM UNet (issue 13).

Identical settings: the same network outputs at the same states (the network here sees the
solver's own noise level; diffusers' DPM-Solver / UniPC with flow sigmas would feed a real network
``int(1000 sigma)``, see ``test_flow_dpm_solver_truncates_the_network_timestep``), the same grid
(diffusers' sigmas), the same first state.  diffusers computes in float32, so the bound is a
relative difference of 1e-5 in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DModel,
    UniPCMultistepScheduler,
)

import fewstep
from fewstep import FewstepScheduler
from fewstep.models import DiffusersDenoiser, PredictionDenoiser
from fewstep.schedules import from_diffusers

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")
W = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def velocity(x, timestep, **_):
    """A smooth flow network: u(x, t) with t = timestep / 1000."""
    t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / 1000.0
    return torch.tanh(x @ W.to(x.dtype)) * (1 + t) + 0.3 * x * t


def edm_net(x_in, c_noise, **_):
    """A smooth EDM-preconditioned network F(c_in x, c_noise)."""
    c = torch.as_tensor(c_noise, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    return torch.tanh(x_in @ W.to(x_in.dtype)) + 0.1 * c * x_in


@pytest.fixture
def x_T():
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _flow_loop(sch, x, steps, **set_kw):
    """diffusers' loop, the network fed 1000 sigma (the solver's noise level)."""
    sch.set_timesteps(steps, **set_kw)
    x = x.clone()
    for i, t in enumerate(sch.timesteps):
        sigma = float(sch.sigmas[sch.step_index if sch.step_index is not None else i])
        x = sch.step(velocity(x, 1000.0 * sigma), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_equals_flow_match_euler(x_T, steps, shift):
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref = _flow_loop(sch, x_T, steps)
    den = PredictionDenoiser(velocity, from_diffusers(sch.config), "flow_prediction")
    out = fewstep.sample(den, x_T, "euler", steps, spacing=sch.sigmas.double())  # x_T at sigma = 1 is the noise
    assert rel(out, ref) < TOL


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("order", [2, 3])
def test_flow_dpmpp_equals_dpm_solver_with_flow_sigmas(x_T, steps, order):
    sch = DPMSolverMultistepScheduler(solver_order=order, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sch.set_timesteps(steps)
    den = PredictionDenoiser(velocity, from_diffusers(sch.config), "flow_prediction")
    extra = {"d2_weight": 0.5} if order == 3 else {}  # diffusers' 3M weights its D2 term by 1/2 (second order)
    x = x_T * float(sch.sigmas[0])  # diffusers' grid starts at shift(1 - 1/N) < 1: the same first state
    program = fewstep.samplers.prepare(f"dpmpp_{order}m", steps, den.schedule, spacing=sch.sigmas.double(), **extra)
    out, _ = fewstep.samplers.core.run_program(program, den, x)
    ref = _flow_loop(sch, x, steps)
    assert rel(out, ref) < TOL


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("order", [2, 3])
def test_flow_unipc_equals_unipc_with_flow_sigmas(x_T, steps, order):
    sch = UniPCMultistepScheduler(solver_order=order, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    sch.set_timesteps(steps)
    x = x_T * float(sch.sigmas[0])
    ref = _flow_loop(sch, x, steps)
    den = PredictionDenoiser(velocity, from_diffusers(sch.config), "flow_prediction")
    program = fewstep.samplers.prepare(f"unipc_{order}", steps, den.schedule, spacing=sch.sigmas.double())
    out, _ = fewstep.samplers.core.run_program(program, den, x)
    assert rel(out, ref) < TOL


def test_flow_dpm_solver_truncates_the_network_timestep():
    """diffusers' DPM-Solver / UniPC with flow sigmas hand the network int64 timesteps int(1000 sigma)
    while they step with sigma itself; FewstepScheduler hands it 1000 sigma exactly (one time per
    evaluation, as FlowMatchEulerDiscreteScheduler does)."""
    cfg = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction").config
    native = UniPCMultistepScheduler.from_config(cfg)
    native.set_timesteps(5)
    ours = FewstepScheduler.from_config(cfg, sampler="unipc_2", spacing="diffusers")
    ours.set_timesteps(5)
    assert native.timesteps.dtype == torch.int64 and ours.timesteps.dtype == torch.float32
    assert torch.allclose(ours.timesteps.double(), 1000.0 * native.sigmas[:-1].double(), rtol=1e-6)
    assert torch.equal(native.timesteps, (1000.0 * native.sigmas[:-1]).to(torch.int64))


@pytest.mark.parametrize("steps", [5, 12])
def test_edm_dpmpp_2m_equals_edm_dpm_solver(x_T, steps):
    sch = EDMDPMSolverMultistepScheduler()
    sch.set_timesteps(steps)
    x = x_T * sch.config.sigma_max  # the paper's start (diffusers' init_noise_sigma is sqrt(sigma_max^2 + 1))
    ref = x.clone()
    for t in sch.timesteps:
        ref = sch.step(edm_net(sch.scale_model_input(ref, t), t), t, ref).prev_sample
    den = DiffusersDenoiser(edm_net, sch)  # c_in, c_noise, c_skip, c_out from the config
    out = fewstep.sample(den, x_T, "dpmpp_2m", steps, spacing=sch.sigmas.double())
    assert rel(out, ref) < TOL


def test_edm_preconditioning_equals_diffusers():
    """c_in, c_noise and c_skip x + c_out F against EDMEulerScheduler's own functions, both prediction types."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for prediction_type in ("epsilon", "v_prediction"):
        sch = EDMEulerScheduler(prediction_type=prediction_type)
        den = DiffusersDenoiser(edm_net, sch)
        for sigma in (0.01, 1.3, 70.0):
            s = torch.tensor(sigma, dtype=torch.float64)
            want = sch.precondition_outputs(x, edm_net(sch.precondition_inputs(x, s), sch.precondition_noise(s)), s)
            assert rel(den(x, sigma), want) < 1e-6
    assert float(den.schedule.model_timestep(1.3)) == pytest.approx(0.25 * math.log(1.3))


# --- pull equals push for every push-style sampler ----------------------------------------------------

PUSH = [n for n in fewstep.available() if fewstep.spec(n).push_style]


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=2, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=4, out_channels=2, pos_embed_max_size=8,
    ).eval()


@pytest.fixture(scope="module")
def edm_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.mark.parametrize("name", PUSH)
def test_pull_equals_push_on_a_flow_transformer(sd3, name):
    """A diffusers-style loop with FewstepScheduler (the SD3 pipeline's transformer call) and
    fewstep.sample(DiffusersDenoiser(transformer, scheduler)) give the same tensors."""
    native = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch = FewstepScheduler.from_config(native.config, sampler=name)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)),
            "pooled_projections": torch.randn(2, 4, generator=torch.Generator().manual_seed(2))}
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    nfe = max(5, fewstep.spec(name).min_nfe)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sch.set_timesteps(nfe)
        x = noise * sch.init_noise_sigma
        for t in sch.timesteps:
            out = sd3(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, **cond)[0]
            x = sch.step(out, t, x, generator=g).prev_sample
        pull = fewstep.sample(DiffusersDenoiser(sd3, native), noise, name, nfe, cond=cond, generator=torch.Generator().manual_seed(4))
    assert len(sch.timesteps) == nfe
    assert bool(torch.isfinite(x).all())
    assert float((x - pull).abs().max()) <= 1e-6 * float(pull.abs().max())


@pytest.mark.parametrize("name", PUSH)
def test_pull_equals_push_on_an_edm_unet(edm_unet, name):
    native = EDMEulerScheduler()
    sch = FewstepScheduler.from_config(native.config, sampler=name)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    nfe = max(5, fewstep.spec(name).min_nfe)
    with torch.no_grad():
        sch.set_timesteps(nfe)
        x = noise * sch.init_noise_sigma
        g = torch.Generator().manual_seed(4)
        for t in sch.timesteps:
            x = sch.step(edm_unet(sch.scale_model_input(x, t), t).sample, t, x, generator=g).prev_sample
        pull = fewstep.sample(DiffusersDenoiser(edm_unet, native), noise, name, nfe, generator=torch.Generator().manual_seed(4))
    assert bool(torch.isfinite(x).all())
    assert float((x - pull).abs().max()) <= 1e-6 * float(pull.abs().max())
