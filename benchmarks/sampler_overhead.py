"""Per-step cost of the sampler itself, against diffusers' scheduler.step for the same algorithm.

The network is replaced by a near-free stand-in (a precomputed output tensor), so the time per
step is the scheduler's own arithmetic and bookkeeping.  Three drivers are timed in the same
process on the same tensors:

* diffusers: ``scheduler.step`` of the matching diffusers scheduler;
* fewstep push: ``FewstepScheduler.step`` (the diffusers-compatible loop);
* fewstep pull: ``fewstep.sample`` (the loop calls the denoiser itself).

Usage:  python benchmarks/sampler_overhead.py [--device cpu|cuda] [--steps 50] [--repeats 5]
Prints a table of microseconds per step and the ratio fewstep / diffusers (lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler

import fewstep
from fewstep import FewstepScheduler
from fewstep.schedules import from_diffusers

CASES = [
    # name, diffusers scheduler factory, fewstep sampler, fewstep options
    ("ddim", lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=True), "ddim", {}),
    ("dpmpp_2m", lambda: DPMSolverMultistepScheduler(solver_order=2), "dpmpp_2m", {}),
    ("dpmpp_3m", lambda: DPMSolverMultistepScheduler(solver_order=3), "dpmpp_3m", {}),
    ("dpmpp_2m_sde", lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "dpmpp_2m_sde", {}),
    ("deis_3", lambda: DEISMultistepScheduler(solver_order=3), "deis_3", {"basis": "log_rho"}),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_diffusers(factory, shape, steps, device, gen):
    sch = factory()
    out = torch.randn(shape, device=device) * 0.1
    x0 = torch.randn(shape, device=device)
    sch.set_timesteps(steps, device=device)
    x = x0.clone()
    _sync(device)
    t0 = time.perf_counter()
    for t in sch.timesteps:
        x = sch.step(out, t, x, generator=gen).prev_sample if "generator" in sch.step.__code__.co_varnames else sch.step(out, t, x).prev_sample
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_fewstep_push(sampler, opts, shape, steps, device, gen):
    sch = FewstepScheduler(sampler=sampler, sampler_options=opts, spacing="linspace")
    out = torch.randn(shape, device=device) * 0.1
    x = torch.randn(shape, device=device)
    sch.set_timesteps(steps, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for t in sch.timesteps:
        x = sch.step(out, t, x, generator=gen).prev_sample
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_fewstep_pull(sampler, opts, shape, steps, device, gen):
    sched = from_diffusers(DDIMScheduler().config)
    x0_const = torch.randn(shape, device=device) * 0.1

    def den(x, t):
        return x0_const

    noise = torch.randn(shape, device=device)
    _sync(device)
    t0 = time.perf_counter()
    fewstep.sample(den, noise, sampler, steps, schedule=sched, spacing="linspace", generator=gen, check_finite=False, **opts)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", default="1x4x64x64,4x3x32x32", help="comma-separated BxCxHxW")
    args = p.parse_args()
    device = torch.device(args.device)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}, steps={args.steps}, median of {args.repeats}")
    print(f"{'algorithm':14s} {'shape':12s} {'diffusers us':>13s} {'push us':>9s} {'pull us':>9s} {'push/diff':>10s} {'pull/diff':>10s}")
    for shape in shapes:
        for name, factory, sampler, opts in CASES:
            gen = torch.Generator(device=device).manual_seed(0)
            for _ in range(2):  # warm-up
                time_diffusers(factory, shape, args.steps, device, gen)
                time_fewstep_push(sampler, opts, shape, args.steps, device, gen)
                time_fewstep_pull(sampler, opts, shape, args.steps, device, gen)
            d, push, pull = [], [], []
            for _ in range(args.repeats):  # interleaved, so drift hits all three alike
                d.append(time_diffusers(factory, shape, args.steps, device, gen))
                push.append(time_fewstep_push(sampler, opts, shape, args.steps, device, gen))
                pull.append(time_fewstep_pull(sampler, opts, shape, args.steps, device, gen))
            md, mp, ml = (statistics.median(v) * 1e6 for v in (d, push, pull))
            print(f"{name:14s} {'x'.join(map(str, shape)):12s} {md:13.1f} {mp:9.1f} {ml:9.1f} {mp / md:10.2f} {ml / md:10.2f}")


if __name__ == "__main__":
    main()
