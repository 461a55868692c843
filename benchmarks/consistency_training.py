"""Consistency training on the exact digits mixture: iCT with and without immiscible noise
assignment, and sLCT with each of its ingredients switched off, over several seeds.

    python benchmarks/consistency_training.py [--steps 600] [--seeds 0-7] [--every 25] [--json out.json]

The data are exact samples of :meth:`fewstep.models.GaussianMixture.digits` (64-d), the student an
:class:`fewstep.distill.MLPNet` trained from scratch (no teacher), batch 64, AdamW, no sampling EMA,
one CPU thread.  Every ``--every`` steps the student is scored from 1024 fixed noises:

* ``rmse1``: RMSE of its 1-step ``cm_multistep`` samples to the exact probability-flow ODE map of
  the same noise (the mixture's ODE solved to 1e-6);
* ``fd1``: Fréchet distance of those samples to the mixture's exact mean and covariance (an FID on
  raw coordinates, against the true distribution rather than a finite reference set).

It prints per variant the final numbers (mean and standard deviation over seeds) and the training
steps until ``rmse1`` first falls below each threshold (mean over the seeds that reach it, and how
many do), so a difference is read against the seed spread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fewstep of this checkout

VARIANTS = {
    "ict": ("ict", {}),
    "ict+immiscible": ("ict", {"noise_assignment": "exact"}),
    "slct": ("slct", {}),
    "slct -cauchy": ("slct", {"without": ["cauchy"]}),
    "slct -diffusion": ("slct", {"without": ["diffusion"]}),
    "slct -ot": ("slct", {"without": ["ot"]}),
    "slct -adaptive_c": ("slct", {"without": ["adaptive_c"]}),
    # the robust loss's scale c_0 (default 0.00054 sqrt(64) = 0.0043), 10x and 100x
    "slct c0=0.043": ("slct", {"loss_c": 0.0432}),
    "slct c0=0.43": ("slct", {"loss_c": 0.432}),
}


def seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=seeds, default=list(range(8)))
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--thresholds", type=lambda s: [float(v) for v in s.split(",")], default=[0.7, 0.6, 0.55])
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import fewstep
    from fewstep.distill import ICT, SLCT, Distiller, DistillConfig, MixtureData, MLPNet
    from fewstep.eval.exact import default_schedule
    from fewstep.eval.frechet import frechet_distance, gaussian_stats
    from fewstep.models import GaussianMixture

    gm, sch = GaussianMixture.digits(), default_schedule()
    noise = torch.randn(1024, 64, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    ref = gm.ode_solve(noise, sch, sch.t_max, sch.t_zero, rtol=1e-6, atol=1e-6)
    mu, cov = gm.mean.numpy(), gm.covariance.numpy()

    results: dict[str, list[dict]] = {}
    t_all = time.time()
    for name in args.variants:
        kind, opts = VARIANTS[name]
        results[name] = []
        for seed in args.seeds:
            extra = {k: v for k, v in opts.items() if k != "without"}
            obj = SLCT.without(opts.get("without", ()), **extra) if kind == "slct" else ICT(**opts)
            curve = []

            def score(student, step, obj=obj, curve=curve):
                with torch.no_grad():
                    x = fewstep.sample(student, noise.float(), obj.sampler, 1, schedule=sch, **obj.sampler_options()).double()
                m, s = gaussian_stats(x.numpy())
                row = {"step": step, "rmse1": float(((x - ref) ** 2).mean().sqrt()), "fd1": float(frechet_distance(m, s, mu, cov))}
                curve.append(row)
                return row

            torch.manual_seed(seed)
            with tempfile.TemporaryDirectory() as out:
                cfg = DistillConfig(output_dir=out, steps=args.steps, batch_size=64, lr=args.lr, checkpoint_every=10**9, progress=False,
                                    log_every=args.every, validate_every=args.every, sampling_ema=None, seed=seed, cpu=True)
                d = Distiller(obj, MixtureData(gm), None, MLPNet(dim=64, hidden=256, depth=3), prediction_type="sample",
                              schedule=sch, validator=score, config=cfg)
                t0 = time.time()
                d.train()
            curve.sort(key=lambda r: r["step"])
            results[name].append({"seed": seed, "seconds": time.time() - t0, "curve": curve})
            print(f"{name:18s} seed {seed}: rmse1 {curve[-1]['rmse1']:.4f}  fd1 {curve[-1]['fd1']:.3f}  ({time.time() - t0:.0f} s)", flush=True)

    def reach(curve, thr):
        return next((r["step"] for r in curve if r["rmse1"] <= thr), None)

    print(f"\n{args.steps} steps, seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)}), mean ± sd over seeds")
    head = f"| variant | rmse1 (1 step) | FD1 (1 step) | " + " | ".join(f"steps to rmse1 <= {t}" for t in args.thresholds) + " |"
    print(head)
    print("|" + "---|" * (3 + len(args.thresholds)))
    for name, runs in results.items():
        r1 = [r["curve"][-1]["rmse1"] for r in runs]
        f1 = [r["curve"][-1]["fd1"] for r in runs]
        cells = []
        for t in args.thresholds:
            hit = [s for s in (reach(r["curve"], t) for r in runs) if s is not None]
            cells.append(f"{statistics.mean(hit):.0f} ± {statistics.pstdev(hit):.0f} ({len(hit)}/{len(runs)})" if hit else f"- (0/{len(runs)})")
        print(f"| {name} | {np.mean(r1):.3f} ± {np.std(r1):.3f} | {np.mean(f1):.2f} ± {np.std(f1):.2f} | " + " | ".join(cells) + " |")
    print(f"\ntotal {time.time() - t_all:.0f} s; torch {torch.__version__}, python {platform.python_version()}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
