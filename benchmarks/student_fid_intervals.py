"""FID with bootstrap intervals, and paired differences, of digits students that `fewstep distill`
saved (one run folder per student).

    python benchmarks/student_fid_intervals.py NAME=RUN_FOLDER [NAME=RUN_FOLDER ...] [--nfe 1,2,4]
                                              [--samples 1000] [--seed 0] [--replicates 200]

Every student samples from the same noise as `fewstep distill`'s quality probe (``--samples``
standard normals from ``torch.Generator().manual_seed(seed + 12345)``) with the sampler its folder
names, through :func:`fewstep.distill.validate.sample_consistency`, so the FID printed equals that
run's ``quality.json``.  FID is on the digit features against the test split.  The interval is
issue 14's bootstrap (:mod:`fewstep.eval.uncertainty`: multinomial resamples of the sample indices,
normal 95 % interval), and because every student starts sample ``i`` from the same noise the same
resamples are applied to all of them: the paired difference of each student to the best one per
NFE, with its interval, says whether the ranking is more than the noise of this sample count.
It does not cover the training seed: runs with other ``--seed`` values are separate rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fewstep of this checkout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER (the --out of fewstep distill)")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the --seed of the runs (the probe noise is seed + 12345)")
    p.add_argument("--replicates", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the float32-modules note of every load
    from fewstep.distill.export import load_student
    from fewstep.distill.validate import sample_consistency
    from fewstep.eval.features import digits_features
    from fewstep.eval.frechet import frechet_distance, gaussian_stats
    from fewstep.eval.uncertainty import bootstrap_counts, compare, fd_replicates, interval
    from fewstep.models.embedded import digits_images

    extractor = digits_features()
    ref = extractor(digits_images("test")).double().numpy()
    mu, sigma = gaussian_stats(ref)
    noise = torch.randn((args.samples, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed + 12345))
    counts = bootstrap_counts(args.samples, args.replicates, seed=args.seed)
    runs = dict(r.split("=", 1) for r in args.runs)
    for k in args.nfe:
        est, reps = {}, {}
        for name, folder in runs.items():
            st = load_student(Path(folder) / "student")
            x = sample_consistency(st.denoiser, noise, st.sampler, k, st.denoiser.schedule, st.sampler_options)
            f = extractor(x.float()).double().numpy()
            m, s = gaussian_stats(f)
            est[name] = float(frechet_distance(m, s, mu, sigma))
            reps[name] = fd_replicates(f, counts, mu=mu, sigma=sigma)[0]
        cmp = compare(est, reps)
        print(f"\nNFE {k}: FID (digit features, {args.samples} samples, 95% bootstrap interval); paired difference to the best")
        for name in runs:
            iv = interval(est[name], reps[name])
            d = cmp.differences[name] if cmp is not None else None
            diff = "best" if name == cmp.best else f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]{' *' if d.significant else ''}"
            print(f"  {name:28s} {iv.estimate:7.3f} [{iv.lo:.3f}, {iv.hi:.3f}]   {diff}")
        print(f"  best: {cmp.best} ({'significantly' if cmp.significant else 'not significantly'} lower than every other)")
    print(f"\ntorch {torch.__version__}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
