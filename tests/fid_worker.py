"""A small `fid_per_nfe` run for the tests, as its own process (so a test can SIGKILL it, or run it
under `torchrun` with several processes).

    python tests/fid_worker.py RUN_DIR OUT_JSON [--batch-size 16] [--delay 0.0] [--model unet|mixture]

Writes the table (and, under torch.distributed, a check of RunningStats.all_reduce) to OUT_JSON
from rank 0.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

GRID = {"samplers": ["ddim", "dpmpp_2m_sde"], "nfes": [2, 4]}
NUM_SAMPLES = 64


class Slow:
    """Wraps a denoiser and sleeps at every call, so a test can kill the run part-way."""

    def __init__(self, inner, delay):
        self.inner, self.delay, self.schedule = inner, delay, inner.schedule

    def __call__(self, x, t, **kw):
        time.sleep(self.delay)
        return self.inner(x, t, **kw)


def make_denoiser(kind: str):
    if kind == "unet":
        from fewstep.models.embedded import digits_denoiser

        return digits_denoiser()
    from fewstep.eval.exact import default_schedule
    from fewstep.models import GaussianMixture

    return GaussianMixture.digits().denoiser(default_schedule())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--model", default="unet")
    args = p.parse_args()
    torch.set_num_threads(1)

    from fewstep.eval.fid import fid_per_nfe, maybe_init_distributed
    from fewstep.eval.reference import reference_stats
    from fewstep.eval.stats import RunningStats

    rank, world = maybe_init_distributed()
    den = make_denoiser(args.model)
    if args.delay:
        den = Slow(den, args.delay)
    ref = reference_stats("digits:test", "digits", cache_dir=False)
    table = fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=NUM_SAMPLES, batch_size=args.batch_size,
                        run_dir=args.run_dir, model_id=f"test-{args.model}", progress=False, kid_subsets=5, **GRID)
    result = {"rows": table.as_dicts(), "generated": table.generated, "world": world}
    if world > 1:
        # Statistics of each rank's share of the reference features, merged across processes.
        share = ref.features[rank::world]
        merged = RunningStats.from_features(share).all_reduce()
        result["allreduce_n"] = merged.n
        result["allreduce_cov_err"] = float(np.abs(merged.cov - np.cov(ref.features.astype(np.float64), rowvar=False)).max())
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


def mixture_denoiser():
    """The exact digits-mixture denoiser with a ``sample_shape`` (for ``--model fid_worker:mixture_denoiser``)."""
    den = make_denoiser("mixture")
    den.sample_shape = (1, 8, 8)
    return den


if __name__ == "__main__":
    main()
