"""FID with a bootstrap interval for saved students of `fewstep distill` on the embedded digits
teacher, at 1, 2 and 4 steps, next to the teacher itself (issue 18: the BOOT and MMD rows).

    python benchmarks/distill_methods.py RUN_FOLDER [RUN_FOLDER ...] [--samples 1000]

Each RUN_FOLDER is a `fewstep distill --out` folder (its `student/`).  Every model is sampled from
the same noise (seed 2024), features are the digit features, the reference is the digits test
split; the interval is fewstep.eval.uncertainty's 95 % bootstrap interval (200 resamples of the
generated samples, the reference fixed; the same resamples for every model, since all start from
the same noise), which measures the sampling noise of one run, not the spread over training seeds
(run several seeds for that).  A BOOT student has one step only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import fewstep
from fewstep.distill import load_student
from fewstep.eval.features import digits_features
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.eval.uncertainty import DEFAULT_REPLICATES, bootstrap_counts, fd_replicates, interval
from fewstep.models.embedded import digits_denoiser, digits_images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--teacher", action="store_true", help="also score the teacher (ddim with and without clipping, dpmpp_2m)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    extract = digits_features()
    ref = extract(digits_images("test")).double().numpy()
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    noise = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(2024))
    counts = bootstrap_counts(args.samples, DEFAULT_REPLICATES)

    def score(name: str, nfe: int, sample) -> None:
        with torch.no_grad():
            f = extract(sample()).double().numpy()
        iv = interval(frechet_distance_from_features(f, ref), fd_replicates(f, counts, mu=mu, sigma=sigma)[0])
        print(f"| {name} | {nfe} | {iv.estimate:.3f} [{iv.lo:.3f}, {iv.hi:.3f}] |", flush=True)

    if args.teacher:
        den = digits_denoiser()
        for k in (1, 2, 4):
            score("teacher, ddim", k, lambda: fewstep.sample(den, noise, "ddim", k))
            score("teacher, ddim, clip_denoised=1", k, lambda: fewstep.sample(den, noise, "ddim", k, clip_denoised=1.0))
        score("teacher, dpmpp_2m", 10, lambda: fewstep.sample(den, noise, "dpmpp_2m", 10))
    for run in args.runs:
        student = load_student(run / "student")
        name = f"{student.meta['objective']} ({run.name})"
        nfes = (1,) if student.meta.get("student_kind") == "boot" else (1, 2, 4)
        for k in nfes:
            score(name, k, lambda: student.sample(noise, k))
    print(json.dumps({"torch": torch.__version__, "python": platform.python_version(), "argv": sys.argv[1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
