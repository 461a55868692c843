"""BOOT (fewstep.distill.boot): the Signal-ODE's DDIM step is the registry's DDIM step in the signal
parameterisation, the top interval is anchored on the noise itself, and a student trained from
noise only gets its one-step samples closer to the teacher's many-step samples."""

import copy
import json

import pytest
import torch

import fewstep
from fewstep.distill import BOOT, Distiller, DistillConfig, NoiseData, load_student
from fewstep.distill.boot import signal
from fewstep.distill.objective import Models
from fewstep.distill.teacher import IntervalSolver
from fewstep.eval.features import digits_features
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.models.embedded import digits_denoiser


def test_ddim_step_is_the_signal_ode_step():
    """``y_s = f + exp(lambda_s - lambda_t) (y_t - f)``, lambda = -log(alpha / sigma) (BOOT eq. 6
    discretised with the teacher's prediction held fixed) equals the registry's DDIM step on x."""
    den = digits_denoiser(dtype=torch.float64)
    sch = den.schedule
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    y_t = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
    t = torch.tensor([900.0, 500.0, 200.0, 60.0], dtype=torch.float64)
    s = torch.tensor([700.0, 420.0, 50.0, -1.0], dtype=torch.float64)
    a_t, s_t = sch.alpha(t).reshape(-1, 1, 1, 1), sch.sigma(t).reshape(-1, 1, 1, 1)
    x_t = a_t * y_t + s_t * eps
    with torch.no_grad():
        f = den(x_t, t)
        y_s = signal(sch, IntervalSolver("ddim", sch)(den, x_t, t, s), eps, s)
    ratio = (sch.sigma(s) * sch.alpha(t) / (sch.alpha(s) * sch.sigma(t))).reshape(-1, 1, 1, 1)  # exp(lambda_s - lambda_t)
    assert torch.allclose(y_s, f + ratio * (y_t - f), atol=1e-9, rtol=1e-9)


def test_top_interval_starts_from_the_noise():
    """On the top interval the target is the teacher's first step from x_T = eps whatever the
    student says; below it, the target moves with the student."""
    den = digits_denoiser()
    obj = BOOT(4)
    obj.bind(den.schedule, (1, 8, 8), 1)
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n = torch.tensor([3, 3, 1])
    one = obj.make_student(copy.deepcopy(den.model), den.schedule, "v_prediction")
    two = obj.make_student(copy.deepcopy(den.model), den.schedule, "v_prediction")
    with torch.no_grad():
        for p in two.parameters():
            p.mul_(0.5)
        a = obj.target(Models(one, one, den), eps, n, {})
        b = obj.target(Models(two, two, den), eps, n, {})
        first = signal(den.schedule, IntervalSolver("ddim", den.schedule)(den, eps[:2], obj.grid[n[:2] + 1], obj.grid[n[:2]]), eps[:2], obj.grid[n[:2]])
    assert torch.equal(a[:2], b[:2]) and torch.allclose(a[:2], first)
    assert not torch.allclose(a[2], b[2])


def test_boot_trains_from_noise_and_approaches_the_teacher(tmp_path):
    """No data anywhere (the source draws noise); the Fréchet distance (digit features) of the
    student's one-step samples to the teacher's 50-NFE samples from the same noise falls by more
    than 40% over 150 steps (measured: 18.1 to 13.8 after 100 steps, 6.8 after 150, 3.7 after 200)."""
    torch.set_num_threads(1)
    den = digits_denoiser()
    feats = digits_features()
    noise = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = feats(fewstep.sample(den, noise, "dpmpp_3m", 50)).double()
    distiller = Distiller(BOOT(), NoiseData((1, 8, 8)), den, copy.deepcopy(den.model), prediction_type="v_prediction",
                          config=DistillConfig(output_dir=tmp_path / "run", steps=150, batch_size=64, lr=5e-4, checkpoint_every=10**6,
                                               progress=False, cpu=True, sampling_ema=None))
    with torch.no_grad():
        before = frechet_distance_from_features(feats(distiller.student.generate(noise)).double(), ref)
    result = distiller.train()
    student = load_student(result.student_dir)
    with torch.no_grad():
        after = frechet_distance_from_features(feats(student.sample(noise, 1)).double(), ref)
    assert after < 0.6 * before, (before, after)
    meta = json.loads((result.student_dir / "fewstep_student.json").read_text())
    assert meta["student_kind"] == "boot" and meta["objective"] == "boot"
    assert not (result.student_dir / "scheduler").exists()  # no diffusers loop can drive a noise-to-sample generator
    with pytest.raises(ValueError, match="one evaluation"):
        student.sample(noise[:2], 2)
