"""The recipes' details, each against a direct transcription of its reference on a toy: the
dropout mask shared by student and target (consistency_models' RNG restore), MCD's loss in
x-space (Heek et al. 2024, Algorithm 2), LCD's ``cond_proj`` initialised as LCM's training code
leaves it, the sampling EMA (diffusers' ``EMAModel`` rule), and nested conditioning (SDXL's
``added_cond_kwargs``) through guidance and the teacher's per-sample step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

import fewstep
from fewstep.distill import CD, MCD, ConsistencyStudent, Distiller, DistillConfig, MixtureData, sample_generators
from fewstep.distill.objective import Batch, Models


class DropoutNet(ModelMixin, ConfigMixin):
    """``tanh(dropout(x W) + t / 1000)`` as a data prediction (a diffusers model, so a student
    built on it saves); every dropout mask it draws is appended to ``masks`` (shared by copies,
    to see the student's and the target's)."""

    masks: list = []

    @register_to_config
    def __init__(self, dim: int = 4, p: float = 0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=torch.Generator().manual_seed(5)) / 2)
        self.p = p

    def forward(self, x, timestep):
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1)
        h = x @ self.w.to(x.dtype)
        if self.training:
            mask = (torch.rand(h.shape) >= self.p).to(h.dtype) / (1 - self.p)  # drawn from the global RNG, as nn.Dropout
            DropoutNet.masks.append(mask)
            h = h * mask
        return torch.tanh(h + t / 1000.0)


def _gauss_teacher(sch, c=0.5):
    def teacher(x, t):  # E[x0 | x_t] for x0 ~ N(0, c^2 I)
        tt = t.to("cpu", torch.float64).reshape(-1, 1)
        a, s = sch.alpha(tt), sch.sigma(tt)
        return (a * c * c / (a * a * c * c + s * s)).to(x.dtype) * x

    return teacher


def test_student_and_target_share_the_dropout_mask(ddpm_schedule):
    """CD with a stop-gradient target and a network with dropout: the loss equals consistency_models'
    order transcribed here (``state = get_rng_state(); pred = f(x_{n+1}); set_rng_state(state);
    target = f(x_hat_n)``) to 1e-6, the two forwards draw identical masks, and without the restore
    the loss is another number (the masks matter)."""
    sch = ddpm_schedule
    teacher = _gauss_teacher(sch)
    obj = CD(num_intervals=5, teacher_sampler="ddim", target_ema=0.0)
    obj.bind(sch, (4,), 10)
    tau = obj.grid
    student = ConsistencyStudent(DropoutNet().train(), sch, "sample", obj.boundary())
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(9)) * 0.5
    DropoutNet.masks.clear()
    torch.manual_seed(123)
    ours = float(obj.loss(Models(student, student, teacher), Batch(x0, {}, sample_generators(1, 0, range(16)), 0))[0].detach())
    assert len(DropoutNet.masks) == 2 and torch.equal(DropoutNet.masks[0], DropoutNet.masks[1])

    def f(x, t):
        u = 10.0 * (t - tau[0].double())
        c_skip, c_out = (0.25 / (u * u + 0.25)).reshape(-1, 1), (u / torch.sqrt(u * u + 0.25)).reshape(-1, 1)
        return c_skip * x + c_out * student.network(x, t).double()

    def transcription(restore: bool) -> float:
        x_hi, x_lo, t_hi, t_lo = [], [], [], []
        for b, g in enumerate(sample_generators(1, 0, range(16))):
            n = int(torch.randint(5, (1,), generator=g))
            z = torch.randn((4,), generator=g).double()
            th, tl = float(tau[n + 1]), float(tau[n])
            (ah, sh), (al, sl) = sch.alpha_sigma(th), sch.alpha_sigma(tl)
            xh = (ah * x0[b].double() + sh * z)[None]
            d = teacher(xh, torch.tensor([th]))
            x_hi.append(xh), x_lo.append(al * d + sl * (xh - ah * d) / sh), t_hi.append(th), t_lo.append(tl)
        x_hi, x_lo = torch.cat(x_hi).float(), torch.cat(x_lo).float()
        torch.manual_seed(123)
        state = torch.get_rng_state()
        pred = f(x_hi, torch.tensor(t_hi, dtype=torch.float64))
        if restore:
            torch.set_rng_state(state)
        with torch.no_grad():
            target = f(x_lo, torch.tensor(t_lo, dtype=torch.float64))
        return float(((pred - target) ** 2).mean().detach())

    assert ours == pytest.approx(transcription(True), rel=1e-6)
    assert abs(transcription(False) - ours) > 0.05 * ours


def test_the_ema_target_trains_with_the_students_dropout_mask(tmp_path, one_thread, ddpm_schedule):
    """In the trainer the EMA target runs in train mode and draws the student's mask: every loss
    (preflight and 3 steps) records equal mask pairs."""
    from fewstep.models import GaussianMixture

    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture(torch.tensor([0.5, 0.5], dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64),
                         torch.eye(4, dtype=torch.float64).expand(2, 4, 4) * 0.1)
    DropoutNet.masks.clear()
    cfg = DistillConfig(output_dir=tmp_path, steps=3, batch_size=4, progress=False, checkpoint_every=100, cpu=True)
    Distiller(CD(num_intervals=4, teacher_sampler="ddim", target_ema=0.9), MixtureData(gm), gm.denoiser(ddpm_schedule), DropoutNet(),
              prediction_type="sample", config=cfg).train()
    m = DropoutNet.masks
    assert len(m) == 2 * 4 and all(torch.equal(m[2 * i], m[2 * i + 1]) for i in range(4))
    assert not torch.equal(m[2], m[4])  # and each step draws new masks


def test_mcd_loss_is_heek_et_al_algorithm_2_in_x_space(ddpm_schedule):
    """MCD's loss against Heek, Hoogeboom & Salimans 2024, Algorithm 2, written out here: teacher
    DDIM step t -> s, z_ref = DDIM_{s -> t_e}(x_s, f(x_s, s)) (x_s itself when s is the edge),
    x_ref = (z_ref - sigma_e/sigma_t x_t) / (alpha_e - alpha_t sigma_e/sigma_t), loss = mean
    ||f(x_t, t) - x_ref||^2 (to 1e-5).  The z-space distance the trainer used before is this
    times (alpha_e - alpha_t sigma_e/sigma_t)^2 per sample: 1 on the last segment (edge = clean
    data) and small on the first interval above a noisy edge."""
    sch = ddpm_schedule
    teacher = _gauss_teacher(sch)
    obj = MCD(num_intervals=4, segments=2, teacher_sampler="ddim")
    obj.bind(sch, (4,), 10)
    tau = obj.grid
    student = ConsistencyStudent(DropoutNet(p=0.0).eval(), sch, "sample", obj.boundary())
    x0 = torch.randn(24, 4, generator=torch.Generator().manual_seed(2)) * 0.5
    ours = float(obj.loss(Models(student, student, teacher), Batch(x0, {}, sample_generators(4, 0, range(24)), 0))[0])

    def ddim(x, d, t, s):
        (at, st), (as_, ss) = sch.alpha_sigma(t), sch.alpha_sigma(s)
        return as_ * d + ss * (x - at * d) / st

    rows = []  # (interval, c^2, x-space term, z-space term)
    with torch.no_grad():
        for b, g in enumerate(sample_generators(4, 0, range(24))):
            n = int(torch.randint(4, (1,), generator=g))
            z = torch.randn((4,), generator=g).double()
            e = (n // 2) * 2
            t, s, te = float(tau[n + 1]), float(tau[n]), float(tau[e])
            at, st = sch.alpha_sigma(t)
            ae, se = sch.alpha_sigma(te)
            xt = (at * x0[b].double() + st * z)[None]
            xs = ddim(xt, teacher(xt, torch.tensor([t])), t, s)
            z_ref = xs if s == te else ddim(xs, student(xs.float(), torch.tensor([s], dtype=torch.float64)).double(), s, te)
            c = ae - at * se / st
            x_ref = (z_ref - se / st * xt) / c
            x_hat = student(xt.float(), torch.tensor([t], dtype=torch.float64)).double()
            rows.append((n, c * c, float(((x_hat - x_ref) ** 2).mean()), float(((ddim(xt, x_hat, t, te) - z_ref) ** 2).mean())))
    assert ours == pytest.approx(sum(r[2] for r in rows) / len(rows), rel=1e-5)
    assert {r[0] for r in rows} == {0, 1, 2, 3}
    for n, c2, xterm, zterm in rows:
        assert zterm == pytest.approx(c2 * xterm, rel=1e-4, abs=1e-10)
        assert (c2 == pytest.approx(1.0)) if n < 2 else (c2 < 1.0)
    print("c^2 on the first interval above the noisy edge:", max(r[1] for r in rows if r[0] == 2))


def test_lcd_cond_proj_is_initialised_as_lcm():
    """LCM's training code builds the student from the teacher's config with
    ``time_cond_proj_dim`` and loads the teacher's weights with ``strict=False``, so ``cond_proj``
    keeps ``torch.nn.Linear``'s default initialisation.  fewstep's student: every teacher weight
    copied, ``cond_proj`` equal to ``torch.nn.Linear(d, C, bias=False)`` drawn under the run's
    seed (not zero), reproducible from the seed."""
    from diffusers import UNet2DConditionModel

    from fewstep._util import derived_seed
    from fewstep.distill import lcd_student_network

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                   cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4)
    student = lcd_student_network(teacher, 32, seed=3)
    w = student.time_embedding.cond_proj.weight
    torch.manual_seed(derived_seed("lcd-cond-proj", 3))
    ref = torch.nn.Linear(32, w.shape[0], bias=False).weight
    assert torch.equal(w, ref) and float(w.abs().max()) > 0 and float(w.abs().max()) <= 1 / math.sqrt(32)
    assert torch.equal(lcd_student_network(teacher, 32, seed=3).time_embedding.cond_proj.weight, w)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(t_state[k], s_state[k]) for k in t_state)


def test_sampling_ema_is_diffusers_ema_model():
    """The sampling EMA's rate d_k = min(d, (1+k)/(10+k)) (d_0 = 0) equals diffusers'
    ``EMAModel(decay=0.9999)`` step by step on the same parameter trajectory (to 1e-7), and its
    weights go in and out of a network without changing it."""
    from diffusers.training_utils import EMAModel

    from fewstep.distill.ema import SamplingEMA

    net = torch.nn.Linear(3, 2)
    ours = SamplingEMA(net, 0.9999)
    peer = EMAModel(net.parameters(), decay=0.9999)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ours.update(net)
        peer.step(net.parameters())
    for (name, _), ref in zip(net.named_parameters(), peer.shadow_params):
        assert torch.allclose(ours.shadow[name], ref, rtol=0, atol=1e-6)
    before = net.weight.detach().clone()
    with ours.applied(net):
        assert torch.equal(net.weight, ours.shadow["weight"])
    assert torch.equal(net.weight, before)


def test_nested_conditioning_through_guidance_and_the_teacher_step(ddpm_schedule):
    """SDXL-style conditioning ``{"encoder_hidden_states", "added_cond_kwargs": {"text_embeds",
    "time_ids"}}`` plus an image-shaped ControlNet input: classifier-free guidance stacks every leaf with its unconditional counterpart
    (``None``: the conditional value in both branches), and the teacher's per-sample interval
    step regroups nested per-sample leaves with their samples (equal to running each sample alone,
    1e-6)."""
    from fewstep.distill import IntervalSolver
    from fewstep.models import ClassifierFreeGuidance

    seen = []

    class Net:
        schedule = ddpm_schedule

        def __call__(self, x, t, encoder_hidden_states, added_cond_kwargs, controlnet_cond):
            seen.append(added_cond_kwargs["time_ids"].clone())
            shift = encoder_hidden_states.mean(1) + added_cond_kwargs["text_embeds"] + added_cond_kwargs["time_ids"][:, :4] / 100
            return 0.9 * x + shift + controlnet_cond.flatten(1)[:, :4]

    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(3, 2, 4, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(3, 4, generator=g), "time_ids": torch.randn(3, 6, generator=g)},
            "controlnet_cond": torch.randn(3, 1, 2, 2, generator=g)}  # an image-shaped ControlNet input per sample
    uncond = {"encoder_hidden_states": torch.zeros(1, 2, 4), "added_cond_kwargs": {"text_embeds": torch.zeros(1, 4), "time_ids": None},
              "controlnet_cond": None}  # the control image in both branches, as diffusers' ControlNet pipelines
    x = torch.randn(3, 4, generator=g)
    t = torch.tensor([900.0, 500.0, 40.0], dtype=torch.float64)
    out = ClassifierFreeGuidance(Net(), 3.0, uncond)(x, t, **cond)
    assert torch.equal(seen[-1], torch.cat([cond["added_cond_kwargs"]["time_ids"]] * 2))
    net = Net()
    c, u_cond = net(x, t, **cond), net(x, t, cond["encoder_hidden_states"] * 0,
                                       {"text_embeds": cond["added_cond_kwargs"]["text_embeds"] * 0, "time_ids": cond["added_cond_kwargs"]["time_ids"]},
                                       cond["controlnet_cond"])
    assert torch.allclose(out, u_cond + 3.0 * (c - u_cond), rtol=0, atol=1e-6)
    solver = IntervalSolver("dpmpp_2s", ddpm_schedule)
    guided = ClassifierFreeGuidance(Net(), 3.0, uncond)
    hi = torch.tensor([900.0, 300.0, 900.0], dtype=torch.float64)
    lo = torch.tensor([600.0, 100.0, 600.0], dtype=torch.float64)
    both = solver(guided, x, hi, lo, cond)
    for b in range(3):
        one = solver(guided, x[b : b + 1], hi[b : b + 1], lo[b : b + 1],
                     {"encoder_hidden_states": cond["encoder_hidden_states"][b : b + 1],
                      "added_cond_kwargs": {k: v[b : b + 1] for k, v in cond["added_cond_kwargs"].items()},
                      "controlnet_cond": cond["controlnet_cond"][b : b + 1]})
        assert torch.allclose(both[b], one[0], rtol=0, atol=1e-6)
