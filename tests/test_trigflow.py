"""TrigFlow from any schedule (fewstep.trigflow), the sCM sampler against diffusers' SCMScheduler,
and the sCM tangent (torch.func.jvp through a network) against a central finite difference."""

from __future__ import annotations

import math

import pytest
import torch

import fewstep
from fewstep.schedules import EDM, FlowMatching, TrigFlow, VPContinuous, VPSigma, from_config
from fewstep.trigflow import TrigFlowMap, TrigFlowNetwork


def _families(ddpm):
    return {"vp_discrete": ddpm, "vp_continuous": VPContinuous(), "edm": EDM(), "flow": FlowMatching(shift=3.0), "vp_sigma": VPSigma(),
            "trigflow": TrigFlow(0.7)}


@pytest.mark.parametrize("family", ["vp_discrete", "vp_continuous", "edm", "flow", "vp_sigma", "trigflow"])
def test_trigflow_map_round_trips_and_matches_snr(family, ddpm_schedule):
    """Time s -> angle -> s to 1e-10 (relative to the time range), state x_s -> x_t -> x_s to 1e-12,
    and the mapped coefficients are TrigFlow's: c alpha = cos t, c sigma = sigma_d sin t (1e-12)."""
    sch = _families(ddpm_schedule)[family]
    m = TrigFlowMap(sch, 0.5)
    s = torch.linspace(sch.t_min, sch.t_max, 257, dtype=torch.float64)
    t = m.angle(s)
    assert bool((t[1:] > t[:-1]).all()) and 0 < m.t_min < m.t_max <= math.pi / 2
    assert float((m.time(t) - s).abs().max()) <= 1e-10 * max(1.0, abs(sch.t_max))
    c, a, sg = m.scale(s), sch.alpha(s), sch.sigma(s)
    assert float((c * a - torch.cos(t)).abs().max()) < 1e-12 and float((c * sg - 0.5 * torch.sin(t)).abs().max()) < 1e-12
    x = torch.randn(257, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert float((m.from_trigflow(m.to_trigflow(x, s), t) - x).abs().max()) < 1e-12
    assert m.time(0.0) == sch.t_zero and m.angle(sch.t_zero) == 0.0
    with pytest.raises(ValueError, match="outside"):
        m.time(m.t_max + 1e-3) if m.t_max < math.pi / 2 - 1e-3 else m.time(-0.1)


@pytest.mark.parametrize("family", ["vp_discrete", "edm", "flow"])
def test_mixture_denoiser_in_trigflow_form_is_the_closed_form(family, ddpm_schedule, digits_mixture):
    """The exact mixture's denoiser of any schedule, mapped to TrigFlow, equals the mixture's posterior
    mean under x_t = cos t x_0 + sigma_d sin t eps (float64, 1e-10), per sample times included."""
    sch = _families(ddpm_schedule)[family]
    m = TrigFlowMap(sch, 0.5)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, generator=g, dtype=torch.float64) * (m.t_max - 0.02) + 0.01
    x0 = digits_mixture.sample(32, generator=g)
    x_t = torch.cos(t)[:, None] * x0 + 0.5 * torch.sin(t)[:, None] * torch.randn(32, 64, generator=g, dtype=torch.float64)
    ours = m.denoiser(digits_mixture.denoiser(sch))(x_t, t)
    closed = digits_mixture.posterior_mean(x_t, torch.cos(t), 0.5 * torch.sin(t))
    assert float((ours - closed).abs().max()) < 1e-10
    trig = digits_mixture.denoiser(TrigFlow(0.5))(x_t, t)  # the TrigFlow schedule itself
    assert float((trig - closed).abs().max()) < 1e-10
    assert from_config(TrigFlow(0.5).config()).config() == TrigFlow(0.5).config()


class _Out(torch.nn.Module):
    """A fixed smooth stand-in for ``sigma_d F(x_t, t)`` (what SANA-Sprint hands SCMScheduler)."""

    def __init__(self, dim=6):
        super().__init__()
        self.w = torch.randn(dim, dim, generator=torch.Generator().manual_seed(3)) / 3

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return torch.tanh(x @ self.w + t)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_sampler_equals_diffusers_scm_scheduler(steps):
    """On TrigFlow with sigma_d = 0.5 and the same generator: fewstep.sample(..., "scm", n) equals
    diffusers' SCMScheduler loop (max_timesteps = pi/2; intermediate 1.3 at two steps) to 1e-6
    (float32; SCMScheduler holds the angles in float32)."""
    from diffusers import SCMScheduler

    sd = 0.5
    out = _Out()

    def f(x, t):  # sCM eq. 5: f = cos t x - sin t sigma_d F
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1).to(x.dtype)
        return torch.cos(tt) * x - torch.sin(tt) * out(x, t)

    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    ours = fewstep.sample(f, noise, "scm", steps, schedule=TrigFlow(sd), generator=torch.Generator().manual_seed(7))
    sch = SCMScheduler(sigma_data=sd)
    sch.set_timesteps(steps, max_timesteps=math.pi / 2, intermediate_timesteps=1.3 if steps == 2 else None)
    x, gen = noise * sd, torch.Generator().manual_seed(7)
    for t in sch.timesteps[:-1]:
        res = sch.step(out(x, t), t, x, generator=gen)
        x = res.prev_sample
    assert float((ours - res.pred_original_sample).abs().max()) < 1e-6


def test_scm_sampler_through_both_doors_on_a_vp_schedule(ddpm_schedule, eps_net):
    """On DDPM's schedule the angles map to equal-SNR times (pi/2 clamps to t_max), and the push door
    (FewstepScheduler in diffusers' loop) gives the pull door's tensors (1e-6)."""
    from fewstep import FewstepScheduler
    from fewstep.models import PredictionDenoiser

    den = PredictionDenoiser(eps_net, ddpm_schedule, "epsilon")
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    prog = fewstep.samplers.prepare("scm", 2, ddpm_schedule)
    m = TrigFlowMap(ddpm_schedule, 0.5)
    assert prog.eval_times[0] == ddpm_schedule.t_max and abs(m.angle(prog.eval_times[1]) - 1.3) < 1e-12
    pull = fewstep.sample(den, noise, "scm", 2, schedule=ddpm_schedule, generator=torch.Generator().manual_seed(1))
    sch = FewstepScheduler(sampler="scm")
    sch.set_timesteps(2)
    x, gen = noise * sch.init_noise_sigma, torch.Generator().manual_seed(1)
    for ts in sch.timesteps:
        x = sch.step(eps_net(x, ts), ts, x, generator=gen).prev_sample
    assert float((x - pull).abs().max()) < 1e-6


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).double()


def _tiny_transformer():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=2, num_layers=2,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=2).double().eval()  # eval: no label dropout


@pytest.mark.parametrize("kind", ["unet", "transformer"])
def test_jvp_equals_central_difference_through_a_diffusers_network(kind, ddpm_schedule):
    """The sCM tangent dF along (v, dt) by torch.func.jvp, through a tiny UNet2DModel (epsilon) and a
    tiny DiT transformer (v) on the SDPA processor the trainer installs (run on PyTorch's math
    kernel), against the central difference of the same float64 network:

    * along the state (dt = 0), h = 1e-4: equal to 1e-7 relative (measured 5e-9 and 2e-9);
    * along (v, cos t sin t), sCM's direction: the difference converges to the JVP at second order
      (error falls > 50x from h = 1e-2 to 1e-3, measured 90x) down to 5e-3 relative; below that
      h the float32 timestep embedding inside diffusers (get_timestep_embedding casts to float32)
      dominates the difference, not the JVP.  The ``fd`` fallback (h = 1e-3) agrees to 1e-2."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from fewstep.models import DiffusersDenoiser

    net = _tiny_unet() if kind == "unet" else _tiny_transformer()
    blocks = [m for m in net.modules() if isinstance(m, Attention)]
    assert blocks
    for m in blocks:  # what Distiller(attention="sdpa") installs
        m.set_processor(AttnProcessor2_0())
    pt = "epsilon" if kind == "unet" else "v_prediction"
    F = TrigFlowNetwork(DiffusersDenoiser(net, schedule=ddpm_schedule, prediction_type=pt), 0.5)
    g = torch.Generator().manual_seed(0)
    cond = {} if kind == "unet" else {"class_labels": torch.tensor([1, 2, 3])}
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=torch.float64)
    v = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)

    def rel(dt, h):
        _, df = F.tangent(x, t, v, dt, **cond)
        with torch.no_grad():
            ref = (F(x + h * v, t + h * dt, **cond) - F(x - h * v, t - h * dt, **cond)) / (2 * h)
        return float((df - ref).norm() / ref.norm()), df

    still = torch.zeros(3, dtype=torch.float64)
    if kind == "unet" and torch.__version__ < "2.7":
        # torch 2.6's forward-mode group_norm fails inside UNet2DModel ("view size is not compatible"):
        # the tangent falls back to the central difference with a warning, and says why
        with pytest.warns(RuntimeWarning, match="falls back to central finite differences"):
            F.tangent(x, t, torch.zeros_like(x), still)
        assert F.fallback_reason is not None
        return
    assert rel(still, 1e-4)[0] < 1e-7
    assert F.fallback_reason is None
    dt = torch.cos(t) * torch.sin(t)
    coarse, (fine, df) = rel(dt, 1e-2)[0], rel(dt, 1e-3)
    assert fine < 5e-3 and coarse > 50 * fine, (coarse, fine)
    f, dfd = F.tangent(x, t, v, dt, method="fd", fd_step=1e-3, **cond)
    with torch.no_grad():
        assert float((f - F(x, t, **cond)).abs().max()) < 1e-12
    assert float((dfd - df).norm() / df.norm()) < 1e-2


def test_data_prediction_students_are_refused(ddpm_schedule):
    from fewstep.models import PredictionDenoiser

    with pytest.raises(ValueError, match="singular"):
        TrigFlowNetwork(PredictionDenoiser(lambda x, t: x, ddpm_schedule, "sample"))
