"""MMD finetuning through the sampler (fewstep.distill.mmd): the MMD equals KID's estimator, the
gradient through the sampler equals a finite difference, checkpointing keeps peak memory flat in
NFE, and fine-tuning the embedded digits model lowers its FID at the tuned budget."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.distill import MMD, Distiller, DistillConfig, TensorData, load_student
from fewstep.distill.mmd import CheckpointedDenoiser, differentiable_extractor, mmd2_torch
from fewstep.eval.features import digits_features
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.eval.kid import mmd2_unbiased
from fewstep.eval.uncertainty import DEFAULT_REPLICATES, bootstrap_counts, fd_replicates, interval, paired_difference
from fewstep.models import DiffusersDenoiser
from fewstep.models.embedded import digits_denoiser, digits_images, digits_scheduler_config


def test_mmd_is_kids_unbiased_estimator():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 16, generator=g), torch.randn(30, 16, generator=g) + 0.3
    assert float(mmd2_torch(a, b)) == pytest.approx(mmd2_unbiased(a.numpy(), b.numpy()), rel=1e-12, abs=1e-14)


def _tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_gradient_through_sampler_equals_finite_difference(sampler):
    """d/dh L(theta + h v) at h = 0 by autograd through the few-step sampler (with and without
    checkpointing) against the central difference, float64, on a random tiny UNet.  The features
    are a smooth map (a fixed random projection and tanh): the digit CNN's ReLUs, max-pools and
    pixel clamp have kinks a finite difference may straddle."""
    net = _tiny_unet()
    den = DiffusersDenoiser(net, digits_scheduler_config())
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(64, 16, generator=g, dtype=torch.float64) / 8
    feats = differentiable_extractor(lambda images: torch.tanh(images.flatten(1) @ proj))
    noise = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    real = digits_images("train")[:6].double()
    params = [p for p in net.parameters()]
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def loss(checkpointing: bool) -> torch.Tensor:
        d = CheckpointedDenoiser(den, den.schedule, reentrant=checkpointing is True) if checkpointing else den
        x = fewstep.sample(d, noise, sampler, 3, grad=True)
        return mmd2_torch(feats(x), feats(real).detach())

    grads = {}
    for ck in (False, True, "non-reentrant"):
        net.zero_grad()
        loss(ck).backward()
        grads[ck] = sum(float((p.grad * w).sum()) for p, w in zip(params, v))
    h = 1e-7  # the central difference converges quadratically: 1e-4, 1e-5, 1e-6 gave relative errors 3e-2, 4e-4, 4e-6
    with torch.no_grad():
        vals = []
        for sign in (1, -1):
            for p, w in zip(params, v):
                p.add_(sign * h * w)
            vals.append(float(loss(False)))
            for p, w in zip(params, v):
                p.sub_(sign * h * w)
    fd = (vals[0] - vals[1]) / (2 * h)
    assert abs(grads[False]) > 1e-6  # a gradient that means something
    assert grads[False] == pytest.approx(fd, rel=1e-6)
    assert grads[True] == pytest.approx(grads[False], rel=1e-10)
    assert grads["non-reentrant"] == pytest.approx(grads[False], rel=1e-10)


_MEMORY = textwrap.dedent("""
    import resource, sys, torch
    from fewstep.models.embedded import digits_denoiser, digits_images
    from fewstep.distill.mmd import MMD, mmd2_torch
    torch.set_num_threads(1)
    nfe, ck = int(sys.argv[1]), sys.argv[2] == "1"
    den = digits_denoiser()
    obj = MMD(nfe, checkpointing=ck)
    obj.bind(den.schedule, (1, 8, 8), 1)
    real, noise = digits_images("train")[:128], torch.randn(128, 1, 8, 8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mmd2_torch(obj.features(obj.samples(den, noise)), obj.features(real)).backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def test_checkpointing_keeps_peak_memory_flat_in_nfe():
    """Peak resident memory of one forward + backward (fresh process each, batch 128): without
    checkpointing it grows by one network's activations per evaluation; with it, by far less."""
    env = {**os.environ, "PYTHONPATH": str(Path(fewstep.__file__).resolve().parents[1])}

    def peak_mib(nfe: int, ck: bool) -> float:
        out = subprocess.run([sys.executable, "-c", _MEMORY, str(nfe), "1" if ck else "0"], env=env,
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    with_2, with_8, without_8 = peak_mib(2, True), peak_mib(8, True), peak_mib(8, False)
    grows_without = without_8 - with_2  # >= 6 evaluations' activations (measured 370-480 MiB at batch 128)
    grows_with = with_8 - with_2  # allocator slack, not activations
    assert grows_without > 150
    assert grows_with < 0.3 * grows_without


def test_finetuning_lowers_fid_at_the_tuned_nfe(tmp_path):
    torch.set_num_threads(1)
    den = digits_denoiser()
    feats = digits_features()
    ref = feats(digits_images("test")).double().numpy()
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    clip = {"clip_denoised": 1.0}  # the digits model's scheduler config clips (clip_sample=True)
    with torch.no_grad():
        f_before = feats(fewstep.sample(den, noise, "ddim", 2, **clip)).double().numpy()
    cfg = DistillConfig(output_dir=tmp_path / "run", steps=60, batch_size=64, lr=1e-4, grad_clip=0.5, checkpoint_every=10**6,
                        progress=False, cpu=True, sampling_ema=None)
    result = Distiller(MMD(2, sampler_options=clip), TensorData(digits_images("train")), den, scheduler_config=digits_scheduler_config(), config=cfg).train()
    tuned = load_student(result.student_dir)
    with torch.no_grad():
        f_after = feats(tuned.sample(noise, 2)).double().numpy()
    # FID with fewstep.eval.uncertainty's bootstrap intervals (issue 14), paired: the same noise
    # for both, so one set of resamples serves both and the difference has its own interval
    counts = bootstrap_counts(len(noise), DEFAULT_REPLICATES)
    est = {k: frechet_distance_from_features(f, ref) for k, f in (("before", f_before), ("after", f_after))}
    reps = {k: fd_replicates(f, counts, mu=mu, sigma=sigma)[0] for k, f in (("before", f_before), ("after", f_after))}
    before, after = interval(est["before"], reps["before"]), interval(est["after"], reps["after"])
    gain = paired_difference(est["after"], est["before"], reps["after"], reps["before"])
    assert after.hi < before.lo, (before, after)  # the intervals do not overlap (measured 3.0 -> 1.2 or lower)
    assert gain.hi < 0, gain
    # saved in diffusers format with the sampler and budget it was tuned for
    meta = json.loads((result.student_dir / "fewstep_student.json").read_text())
    assert meta["student_kind"] == "diffusion" and meta["sampler"] == "ddim" and meta["tuned_for"]["nfe"] == 2
    assert meta["sampler_options"] == clip
    sched = json.loads((result.student_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["sampler"] == "ddim" and sched["_class_name"] == "FewstepScheduler" and sched["sampler_options"] == clip
    # the push door (diffusers' loop with the saved scheduler and UNet) gives the pull door's samples
    from diffusers import UNet2DModel

    from fewstep import FewstepScheduler

    unet = UNet2DModel.from_pretrained(result.student_dir / "unet")
    scheduler = FewstepScheduler.from_pretrained(result.student_dir / "scheduler")
    scheduler.set_timesteps(2)
    x = noise[:8].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert torch.allclose(x, tuned.sample(noise[:8], 2), atol=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="stochastic"):
        MMD(2, sampler="ddim", sampler_options={"eta": 1.0})
    with pytest.raises(ValueError, match="consistency"):
        MMD(2, sampler="lcm")
    with pytest.raises(ValueError, match="positive integer"):
        MMD(0)
    with pytest.raises(ValueError, match="not a differentiable"):
        MMD(2, features="inception")
    obj = MMD(2)
    with pytest.raises(ValueError, match="8x8"):
        obj.bind(digits_denoiser().schedule, (3, 32, 32), 10)
