"""A small distillation run for the process-level tests (SIGKILL resume, two processes).

    python tests/distill_job.py OUT --steps 40 [--checkpoint-every 10] [--resume latest]
                                [--batch-size 16] [--nan-at STEP:INDEX] [--grad-accum 1]
                                [--immiscible] [--objective cd|rcm]

CD (or rCM: student, log-variance head and fake score, each with its own optimizer) on an exact
8-dimensional Gaussian mixture with a small MLP student, one CPU thread, every
setting fixed, so two runs that see the same global batch produce the same weights.  Launched
directly, under ``accelerate launch --num_processes 2 --cpu``, or killed mid-way by the tests.
"""

from __future__ import annotations

import argparse
import sys

import torch


class NaNAt:
    """Wraps a data source and poisons one global sample of one step with NaN (non-finite guard)."""

    def __init__(self, inner, step: int, index: int):
        self.inner, self.shape, self.step, self.index = inner, inner.shape, step, index
        self.seen = 0

    def sample(self, gens, device):
        x, cond = self.inner.sample(gens, device)
        from fewstep.distill import sample_generators

        # the sample whose generator matches (seed 0, self.step, self.index) gets NaN
        probe = sample_generators(0, self.step, [self.index])[0].initial_seed()
        for i, g in enumerate(gens):
            if g.initial_seed() == probe:
                x = x.clone()
                x[i] = float("nan")
        return x, cond


def small_mixture():
    from fewstep.models import GaussianMixture

    g = torch.Generator().manual_seed(3)
    k, d = 3, 8
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / 3
    cov = a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, cov)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--nan-at", default=None)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--immiscible", action="store_true", help="assign each micro-batch's noises to its data")
    p.add_argument("--objective", default="cd", choices=["cd", "rcm"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from fewstep.distill import CD, DistillConfig, Distiller, MixtureData, MLPNet
    from fewstep.eval.exact import default_schedule

    gm = small_mixture()
    schedule = default_schedule()
    data = MixtureData(gm)
    if args.nan_at:
        step, index = (int(v) for v in args.nan_at.split(":"))
        data = NaNAt(data, step, index)
    torch.manual_seed(0)
    net = MLPNet(dim=8, hidden=32, depth=2, time_embed_dim=16, timestep_scale=1e-3 if args.objective == "rcm" else 1.0)
    cfg = DistillConfig(output_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=1e-3, grad_accum=args.grad_accum,
                        checkpoint_every=args.checkpoint_every, keep_checkpoints=2, resume=args.resume,
                        progress=False, log_every=5, cpu=True)
    if args.objective == "rcm":  # three trainable networks (student, log-variance head, fake score), three optimizers
        from fewstep.distill import RCM

        fake = MLPNet(dim=8, hidden=32, depth=2, time_embed_dim=16, timestep_scale=1e-3)
        obj = RCM(tangent_warmup=4, student_update_freq=3, fake_score=fake, fake_prediction_type="v_prediction", fake_lr=5e-4)
        run = Distiller(obj, data, gm.denoiser(schedule), net, prediction_type="v_prediction", config=cfg).train()
    else:
        objective = CD(num_intervals=8, teacher_sampler="dpmpp_2s", noise_assignment=True if args.immiscible else None)
        run = Distiller(objective, data, gm.denoiser(schedule), net, prediction_type="sample", config=cfg).train()
    print(f"done step={run.step} skipped={run.skipped_steps} processes={run.processes} resumed={run.resumed_from}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
