"""Consistency objectives on tiny problems, and the pieces they are built from.

Training tests run on one CPU thread with fixed seeds; each states the margin it checks.  The
exact digits mixture (64-d) is the teacher of CD / MCD and the data of iCT: its probability-flow
ODE is solved exactly, so "error" is the RMSE of the student's samples to the exact ODE map from
the same noise."""

from __future__ import annotations


import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.distill import CD, ICT, LCD, MCD, BoundaryCondition, Distiller, DistillConfig, IntervalSolver, MixtureData, MLPNet, TensorData
from fewstep.distill import ConsistencyStudent
from fewstep.distill.objective import Batch, Models, consistency_distance
from fewstep.distill.student import guidance_embedding
from fewstep.samplers.core import run_program
from fewstep.schedules import EDM, default_spacing, time_grid




@pytest.fixture(scope="module")
def exact_probe(digits_mixture, ddpm_schedule):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 64, generator=g, dtype=torch.float64)
    ref = digits_mixture.ode_solve(noise, ddpm_schedule, ddpm_schedule.t_max, ddpm_schedule.t_zero, rtol=1e-6, atol=1e-6)
    return noise.float(), ref


def rmse(a, b) -> float:
    return float(torch.sqrt(torch.mean((a.detach().double() - b.double()) ** 2)))


def error(den, probe, schedule, nfe, **kw) -> float:
    noise, ref = probe
    with torch.no_grad():
        return rmse(fewstep.sample(den, noise, "ddim", nfe, schedule=schedule, **kw), ref)


def mixture_run(tmp_path, mixture, schedule, objective, steps, teacher=True, lr=3e-3):
    torch.manual_seed(0)
    net = MLPNet(dim=64, hidden=256, depth=3)
    cfg = DistillConfig(output_dir=tmp_path, steps=steps, batch_size=64, lr=lr, checkpoint_every=10_000, progress=False, log_every=25)
    return Distiller(objective, MixtureData(mixture), mixture.denoiser(schedule) if teacher else None, net,
                     prediction_type="sample", schedule=schedule, config=cfg)


def first_last(losses, k=50):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


# -- the pieces -------------------------------------------------------------------------------------


def test_boundary_condition_is_lcm_schedulers(ddpm_schedule):
    """kappa = 10, sigma_d = 0.5, boundary at timestep 0 on a VP-discrete schedule is diffusers'
    LCMScheduler's c_skip / c_out (to 1e-12), and c_skip = 1, c_out = 0 at the boundary."""
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    bc = BoundaryCondition(0.0, 10.0, 0.5)
    t = torch.tensor([0.0, 1.0, 19.0, 259.0, 999.0], dtype=torch.float64)
    c_skip, c_out = bc.coefficients(ddpm_schedule, t)
    for i, ti in enumerate(t.tolist()):
        ref_skip, ref_out = sch.get_scalings_for_boundary_condition_discrete(int(ti))
        assert abs(float(c_skip[i]) - float(ref_skip)) < 1e-12 and abs(float(c_out[i]) - float(ref_out)) < 1e-12
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


def test_guidance_embedding_is_the_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 3.5, 8.0, 16.0])
    ours = guidance_embedding(w, 256, 4)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1.0, embedding_dim=256)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler,nfe", [("ddim", 1), ("dpmpp_2s", 2), ("dpmpp_2m", 2), ("heun", 2)])
def test_interval_solver_is_the_registry_sampler_per_sample(digits_mixture, ddpm_schedule, sampler, nfe):
    """The batched per-sample teacher step equals the registry's pull driver run sample by sample
    on the same program (relative 1e-6; and fewstep.sample on the two-point grid for one-step
    samplers), for intervals that differ per sample, including one that ends on clean data and
    one of zero length (identity)."""
    den = digits_mixture.denoiser(ddpm_schedule)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    hi = torch.tensor([999.0, 500.0, 120.0, 40.0, 300.0], dtype=torch.float64)
    lo = torch.tensor([700.0, 450.0, 60.0, -1.0, 300.0], dtype=torch.float64)
    solver = IntervalSolver(sampler, ddpm_schedule, nfe=nfe)
    out = solver(den, x, hi, lo)
    for b in range(5):
        if hi[b] == lo[b]:
            assert torch.equal(out[b], x[b])
            continue
        prog = solver.program(float(hi[b]), float(lo[b]))
        assert float(prog.grid[0]) == float(hi[b]) and float(prog.grid[-1]) == float(lo[b])
        ref, times = run_program(prog, den, x[b : b + 1])  # the pull-style driver on the same program
        assert len(times) == nfe and rmse(out[b], ref[0]) < 1e-6 * float(ref.norm())
        if sampler in ("ddim", "dpmpp_2s") and lo[b] > -1:  # and, on one step, fewstep.sample itself
            same = fewstep.sample(den, x[b : b + 1], sampler, nfe, schedule=ddpm_schedule, spacing=prog.grid)
            assert rmse(out[b], same[0]) < 1e-6 * float(same.norm())
    with pytest.raises(ValueError, match="deterministic"):
        IntervalSolver("dpmpp_2m_sde", ddpm_schedule)


def test_segment_map_is_identity_on_edges_and_ddim_inside(digits_mixture, ddpm_schedule):
    """MCD's consistency map: identity where the sample sits on its edge; elsewhere the registry
    DDIM step to the edge with the model's data prediction."""
    obj = MCD(num_intervals=8, segments=2)
    obj.bind(ddpm_schedule, (64,), 10)
    den = digits_mixture.denoiser(ddpm_schedule)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    grid = obj.grid
    t = grid[torch.tensor([4, 6, 3])]
    edge = grid[torch.tensor([4, 4, 0])]
    out = obj.consistency_map(den, x, t, edge, {}, torch.tensor([False, False, True]))
    assert torch.equal(out[0], x[0])
    ref = fewstep.sample(den, x[1:2].double(), "ddim", 1, schedule=ddpm_schedule, spacing=[float(t[1]), float(edge[1])])
    assert rmse(out[1], ref[0]) < 1e-5
    # the last one ends on clean data: DDIM to sigma = 0 is the data prediction itself
    assert rmse(out[2], den(x[2:3], t[2:3])[0]) < 1e-6


def _karras(n_points, s_min, s_max, rho):
    """Karras et al. 2022 eq. 5, increasing: sigma_i = (s_min^(1/rho) + i/(n-1) (s_max^(1/rho) - s_min^(1/rho)))^rho."""
    i = np.arange(n_points) / (n_points - 1)
    return (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho


def test_ict_follows_song_and_dhariwal_2023():
    """iCT's pieces against the formulas of "Improved Techniques for Training Consistency Models",
    computed here independently: the curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1 with
    K' = floor(K / (log2 floor(s1/s0) + 1)) (sec. 3.4), the Karras grid (rho = 7), the lognormal
    interval probabilities p_n ~ erf((ln s_{n+1} - P_mean)/(sqrt2 P_std)) - erf((ln s_n - P_mean)/(sqrt2 P_std))
    (sec. 3.5), the weights 1/(s_{n+1} - s_n) (sec. 3.4) and the pseudo-Huber distance with
    c = 0.00054 sqrt(d) (sec. 3.3), on EDM (sigma = t) with the paper's K = 400k and CIFAR's d."""
    sch = EDM(0.002, 80.0)
    obj = ICT()
    obj.bind(sch, (3, 32, 32), 400_000)
    k_stage = math.floor(400_000 / (math.log2(1280 // 10) + 1))
    assert k_stage == 50_000
    for k in (0, 49_999, 50_000, 149_999, 150_000, 349_999, 350_000, 399_999):
        assert obj.num_points(k) == min(10 * 2 ** (k // k_stage), 1280) + 1, k
    erf = np.vectorize(math.erf)
    for k in (0, 120_000):
        n = obj.num_points(k)
        sig = _karras(n, 0.002, 80.0, 7.0)
        grid = obj.grid_at(k)
        np.testing.assert_allclose(grid.numpy(), sig, rtol=1e-12)
        z = (np.log(sig) + 1.1) / (math.sqrt(2.0) * 2.0)
        p = erf(z[1:]) - erf(z[:-1])
        np.testing.assert_allclose(obj.interval_probabilities(k).numpy(), p / p.sum(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(obj.weights(grid, torch.arange(n - 1)).numpy(), 1.0 / np.diff(sig), rtol=1e-9)
    # the intervals drawn follow those probabilities (4000 draws, 5 standard errors)
    gens = fewstep.distill.sample_generators(3, 0, range(4000))
    drawn = obj.draw_intervals(Batch(torch.zeros(4000, 1), {}, gens, 0), obj.grid_at(0))
    freq = np.bincount(drawn.numpy(), minlength=10) / 4000
    p = obj.interval_probabilities(0).numpy()
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 4000) + 1e-3), (freq, p)
    # pseudo-Huber with c = 0.00054 sqrt(3 * 32 * 32) = 0.0299
    c = 0.00054 * math.sqrt(3 * 32 * 32)
    assert obj.loss_c == pytest.approx(c, rel=1e-12)
    a, b = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64) * 0.01
    expect = [math.sqrt(float(((a[i] - b[i]) ** 2).sum()) + c * c) - c for i in range(4)]
    np.testing.assert_allclose(consistency_distance(a, b, "pseudo_huber", obj.loss_c).numpy(), expect, rtol=1e-6)


def test_ict_noise_levels_on_a_vp_schedule_are_sigma_over_alpha(ddpm_schedule):
    """On a VP schedule the recipe's sigma is the equivalent VE noise level sigma(t) / alpha(t)."""
    obj = ICT(s0=10, s1=40)
    obj.bind(ddpm_schedule, (64,), 300)
    grid = obj.grid_at(0)
    rho = np.array([ddpm_schedule.sigma(t) / ddpm_schedule.alpha(t) for t in grid.tolist()])
    np.testing.assert_allclose(obj.weights(grid, torch.arange(len(grid) - 1)).numpy(), 1.0 / np.diff(rho), rtol=1e-9)
    erf = np.vectorize(math.erf)
    z = (np.log(rho) + 1.1) / (math.sqrt(2.0) * 2.0)
    p = erf(z[1:]) - erf(z[:-1])
    np.testing.assert_allclose(obj.interval_probabilities(0).numpy(), p / p.sum(), rtol=1e-9, atol=1e-15)


class _TinyNet(torch.nn.Module):
    """A fixed smooth data-prediction network ``tanh(x W + t / 1000)``."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(5)) / 2)

    def forward(self, x, timestep):
        t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1)
        return torch.tanh(x @ self.w.to(x.dtype) + t / 1000.0)


def test_cd_loss_is_song_et_al_2023_eq_7_by_hand(ddpm_schedule):
    """CD's loss on a toy, against eq. 7 of "Consistency Models" written out here:
    L = mean_b lambda(t_n) d(f(x + ..., t_{n+1}), f(x_hat_n, t_n)) with x_{n+1} = alpha x0 + sigma z,
    x_hat_n the teacher's DDIM step (Song et al. 2021, eq. 12, eta = 0) with the exact denoiser
    of N(0, c^2 I) data, f = c_skip x + c_out F with u = kappa (t - t_b), lambda = 1, d = mean
    squared error.  The random draws are the sample's own: its interval first, then its noise."""
    sch, c = ddpm_schedule, 0.5

    def teacher(x, t):  # E[x0 | x_t] for x0 ~ N(0, c^2 I)
        tt = t.to("cpu", torch.float64).reshape(-1, 1)
        a, s = sch.alpha(tt), sch.sigma(tt)
        return (a * c * c / (a * a * c * c + s * s)).to(x.dtype) * x

    obj = CD(num_intervals=5, teacher_sampler="ddim")
    obj.bind(sch, (4,), 10)
    tau = time_grid(sch, 5, default_spacing(sch), end="zero").flip(0)
    assert torch.equal(obj.grid, tau) and float(tau[0]) == sch.t_zero
    net = _TinyNet()
    student = ConsistencyStudent(net, sch, "sample", obj.boundary())
    x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(9)) * c
    loss, _ = obj.loss(Models(student, student, teacher), Batch(x0, {}, fewstep.distill.sample_generators(1, 0, range(16)), 0))

    def f(x, t):
        u = 10.0 * (t - float(tau[0]))
        c_skip, c_out = 0.25 / (u * u + 0.25), u / math.sqrt(u * u + 0.25)
        return c_skip * x + c_out * net(x, torch.tensor(t)).double()

    terms, at_boundary = [], 0
    for b, g in enumerate(fewstep.distill.sample_generators(1, 0, range(16))):
        n = int(torch.randint(5, (1,), generator=g))
        z = torch.randn((4,), generator=g).double()
        t_hi, t_lo = float(tau[n + 1]), float(tau[n])
        (a_hi, s_hi), (a_lo, s_lo) = sch.alpha_sigma(t_hi), sch.alpha_sigma(t_lo)
        x_hi = (a_hi * x0[b].double() + s_hi * z)[None]
        d = teacher(x_hi, torch.tensor([t_hi]))
        x_lo = a_lo * d + s_lo * (x_hi - a_hi * d) / s_hi
        at_boundary += n == 0
        terms.append(float(((f(x_hi, t_hi) - f(x_lo, t_lo)) ** 2).mean().detach()))
    assert at_boundary > 0  # the pair that ends on the boundary, where f(x, t_b) = x, is covered
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_student_coefficients_per_time_are_cached_and_bounded(ddpm_schedule):
    """A 0-d time takes the cached scalar coefficients, a (B,) time the vectorised ones: the same
    numbers either way; the cache never holds more than 1024 times."""
    from fewstep.distill import ConsistencyStudent

    st = ConsistencyStudent(_TinyNet(), ddpm_schedule, "sample", BoundaryCondition(-1.0, 10.0, 0.5))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for t in (0.0, 2.5, 600.0):
        per_sample = st(x, torch.full((3,), t, dtype=torch.float64))
        assert torch.equal(st(x, torch.tensor(t, dtype=torch.float64)), per_sample)
        assert torch.equal(st(x, t), per_sample)
    assert set(st._coefficient_cache) == {0.0, 2.5, 600.0}
    for t in np.linspace(0.0, 999.0, 3000):
        st._scalar_coefficients(float(t))
    assert 0 < len(st._coefficient_cache) <= 1024


# -- training on tiny problems -------------------------------------------------------------------------


def test_cd_student_beats_teacher_ddim_at_same_nfe(tmp_path, one_thread, digits_mixture, ddpm_schedule, exact_probe):
    """Consistency property on the exact mixture: after 600 CD steps (MLP student from scratch,
    registry DDIM teacher step, 18 intervals) the loss has fallen at least 3x, and the student's
    1- and 2-step errors to the exact ODE map fell below the teacher's DDIM error at the same NFE
    (1 step: by at least 25%; measured 0.29 vs 0.57)."""
    d = mixture_run(tmp_path, digits_mixture, ddpm_schedule, CD(num_intervals=18, teacher_sampler="ddim"), 600)
    before = [error(d.student, exact_probe, ddpm_schedule, k) for k in (1, 2)]
    run = d.train()
    a, b = first_last(run.losses)
    assert b < a / 3, (a, b)
    teacher = digits_mixture.denoiser(ddpm_schedule)
    st = d.student.eval()
    for k, e0 in zip((1, 2), before):
        ours, ddim = error(st, exact_probe, ddpm_schedule, k), error(teacher, exact_probe, ddpm_schedule, k)
        assert ours < ddim and ours < e0, (k, ours, ddim, e0)
        if k == 1:
            assert ours < 0.75 * ddim, (ours, ddim)
    assert run.student_dir is not None and (run.student_dir / "fewstep_student.json").is_file()


def test_mcd_one_student_serves_1_2_4_8_steps(tmp_path, one_thread, digits_mixture, ddpm_schedule, exact_probe):
    """MCD with 4 segments of 4 intervals, 300 steps: the loss falls at least 2x; through the
    registry's segment-wise sampler ``mcd`` (with the recorded edges) the error to the exact ODE map
    at its own 4 steps falls at least 2x, and at 1, 2 and 8 steps it falls too."""
    obj = MCD(num_intervals=16, segments=4, teacher_sampler="ddim")
    d = mixture_run(tmp_path, digits_mixture, ddpm_schedule, obj, 300)
    opts = obj.sampler_options()
    assert obj.sampler == "mcd" and len(opts["edges"]) == 5 and opts["edges"][-1] == ddpm_schedule.t_zero
    noise, ref = exact_probe

    def errors():
        with torch.no_grad():
            return {k: rmse(fewstep.sample(d.student.eval(), noise, "mcd", k, schedule=ddpm_schedule, **opts), ref) for k in (1, 2, 4, 8)}

    before = errors()
    run = d.train()
    a, b = first_last(run.losses)
    after = errors()
    assert b < a / 2 and after[4] < before[4] / 2, (a, b, before, after)
    assert all(after[k] < before[k] for k in (1, 2, 8)), (before, after)


def test_ict_trains_without_teacher(tmp_path, one_thread, digits_mixture, ddpm_schedule, exact_probe):
    """iCT (no teacher; curriculum 11 -> 41 points, lognormal intervals, pseudo-Huber, 1/dsigma
    weights), 300 steps: the loss on a fixed batch at a fixed discretisation falls at least 20%, and
    the 1-step error to the exact ODE map falls at least 30%."""
    obj = ICT(s0=10, s1=40)
    d = mixture_run(tmp_path, digits_mixture, ddpm_schedule, obj, 300, teacher=False, lr=2e-4)
    assert [obj.num_points(k) for k in (0, 99, 100, 200, 299)] == [11, 11, 21, 41, 41]
    assert obj.loss_c == pytest.approx(0.00054 * 8)
    gens = fewstep.distill.sample_generators(7, 0, range(256))
    x0, _ = MixtureData(digits_mixture).sample(gens, "cpu")
    fixed = Batch(x0, {}, gens, 0)

    def fixed_loss():
        with torch.no_grad():
            return float(obj.loss(Models(d.student, d.student), fixed)[0])

    before_loss, before = fixed_loss(), error(d.student, exact_probe, ddpm_schedule, 1)
    d.train()
    d.student.eval()
    after_loss, after = fixed_loss(), error(d.student, exact_probe, ddpm_schedule, 1)
    assert after_loss < 0.8 * before_loss and after < 0.7 * before, (before_loss, after_loss, before, after)


def tiny_cond_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4,
    )


def test_lcd_on_a_small_unet2dcondition(tmp_path, one_thread):
    """LCD on a small UNet2DConditionModel (SD's scaled-linear schedule, 10-step trailing DDIM grid,
    guidance embedding, w in [2, 6]), 60 steps: the loss falls at least 25% and the student's
    one-step output at w = 4 moves at least 20% closer to the teacher's guided 10-step DDIM map."""
    from diffusers import DDPMScheduler

    from fewstep.models import ClassifierFreeGuidance, DiffusersDenoiser, digits_data

    teacher = DiffusersDenoiser(tiny_cond_unet().eval(), DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x, y = digits_data("train", return_labels=True)
    latents = x.reshape(-1, 1, 8, 8).repeat(1, 4, 1, 1).float() * 0.5
    emb = torch.randn(10, 2, 16, generator=torch.Generator().manual_seed(1))
    uncond = {"encoder_hidden_states": torch.zeros(1, 2, 16)}
    obj = LCD(uncond=uncond, num_ddim_steps=10, guidance_range=(2.0, 6.0))
    cfg = DistillConfig(output_dir=tmp_path, steps=60, batch_size=16, lr=1e-3, progress=False, log_every=10, checkpoint_every=1000)
    d = Distiller(obj, TensorData(latents, {"encoder_hidden_states": emb[y]}), teacher, guidance_embedding_dim=32, config=cfg)
    assert d.student.guidance_embedding_dim == 32 and d.student.boundary == BoundaryCondition(0.0, 10.0, 0.5)
    noise = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = {"encoder_hidden_states": emb[torch.arange(32) % 10]}
    with torch.no_grad():
        ref = fewstep.sample(ClassifierFreeGuidance(teacher, 4.0, uncond), noise, "ddim", 10, spacing="trailing", end="min", cond=cond)

    def one_step():
        with torch.no_grad():
            return rmse(d.student.eval()(noise, teacher.schedule.t_max, guidance_scale=4.0, **cond), ref)

    before = one_step()
    run = d.train()
    a, b = first_last(run.losses, 10)
    after = one_step()
    assert b < 0.75 * a and after < 0.8 * before, (a, b, before, after)
    meta = (run.student_dir / "fewstep_student.json").read_text()
    assert '"lcm"' in meta and "diffusers: D_u + w (D_c - D_u)" in meta


def test_guided_teacher_takes_one_scale_per_sample(digits_mixture, ddpm_schedule):
    """LCD's teacher: classifier-free guidance with a (B,) tensor of scales equals guidance with
    each scale on its own sample (to 1e-12 in float64: batched matrix products round differently),
    in diffusers' convention D_u + w (D_c - D_u)."""
    from fewstep.distill import GuidedTeacher
    from fewstep.models import ClassifierFreeGuidance

    class Cond:
        schedule = ddpm_schedule

        def __call__(self, x, t, shift):
            return digits_mixture.denoiser(ddpm_schedule)(x, t) + shift

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t = torch.tensor([900.0, 400.0, 30.0], dtype=torch.float64)
    shift = torch.randn(3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    uncond = {"shift": torch.zeros(1, 64, dtype=torch.float64)}
    w = torch.tensor([1.0, 3.5, 8.0], dtype=torch.float64)
    out = GuidedTeacher(Cond(), uncond)(x, t, guidance_scale=w, shift=shift)
    for b in range(3):
        ref = ClassifierFreeGuidance(Cond(), float(w[b]), uncond)(x[b : b + 1], t[b : b + 1], shift=shift[b : b + 1])
        assert torch.allclose(out[b], ref[0], rtol=0, atol=1e-12)
    assert torch.allclose(out[0], Cond()(x[:1], t[:1], shift=shift[:1])[0], rtol=0, atol=1e-12)  # w = 1: conditional
