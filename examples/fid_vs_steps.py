"""FID per number of steps for a diffusers checkpoint: which sampler, how many steps?

    python examples/fid_vs_steps.py PIPELINE_FOLDER --reference REAL_IMAGES_FOLDER \\
        [--extractor inception] [--inception-path inception-2015-12-05.pt] \\
        [--samplers ddim,dpmpp_2m,dpmpp_3m,unipc_3] [--nfe 5,8,10,15,20,50] [--num-samples 10000] \\
        [--device cuda] [--out fid-study]

    # several GPUs (or CPU processes): the grid is sharded, the table is the same
    torchrun --nproc_per_node 4 examples/fid_vs_steps.py PIPELINE_FOLDER --reference REAL_IMAGES_FOLDER ...

What a user with a GPU and the Inception weights runs: PIPELINE_FOLDER is a saved unconditional
pipeline (``model_index.json`` with ``unet`` and ``scheduler``; DDPM/DDIM-style), REAL_IMAGES_FOLDER
a folder of real images at the model's resolution (or an ``.npz`` of statistics written by fewstep).
Features default to Inception in clean-fid's ``clean`` mode (``--extractor inception-tf`` for the
legacy TensorFlow numbers papers report); the weights are read from a local file and never
downloaded.  Samples are seeded per index, their features are kept in ``OUT/run`` so a killed job
resumes, and the table goes to ``OUT/fid_per_nfe.csv`` and the plot to ``OUT/fid_vs_nfe.png``.
Nothing here is specific to the embedded digits model: ``--extractor digits --reference
digits:test`` with the embedded pipeline saved to a folder is a CPU-sized run of the same thing.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", type=Path, help="saved diffusers pipeline folder (model_index.json inside)")
    p.add_argument("--reference", required=True, help="folder of real images, a fewstep .npz, or digits[:train|:test]")
    p.add_argument("--extractor", default="inception", help="inception | inception-tf | digits | module:callable")
    p.add_argument("--inception-path", default=None, help="local inception-2015-12-05.pt (default: $FEWSTEP_INCEPTION_PATH, /tmp)")
    p.add_argument("--samplers", default="ddim,dpmpp_2m,dpmpp_3m,unipc_3")
    p.add_argument("--nfe", default="5,8,10,15,20,50")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("fid-study"))
    args = p.parse_args(argv)

    import os

    import torch

    import fewstep
    from fewstep.eval.features import InceptionWeightsMissing, get_extractor
    from fewstep.eval.fid import fid_per_nfe, maybe_init_distributed
    from fewstep.eval.model_spec import resolve_model
    from fewstep.eval.reference import reference_stats
    from fewstep.eval.report import markdown_table, plot_fid

    rank, world = maybe_init_distributed()
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        extractor = get_extractor(args.extractor, inception_path=args.inception_path, device=device)
        model = resolve_model(args.pipeline, device=device)
    except (InceptionWeightsMissing, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    nfes = [int(n) for n in args.nfe.split(",")]
    for s in samplers:
        fewstep.spec(s)
    ref = reference_stats(args.reference, extractor, progress=rank == 0)
    table = fid_per_nfe(model.denoiser, shape=model.shape, samplers=samplers, nfes=nfes, reference=ref, extractor=extractor,
                        num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed, run_dir=args.out / "run",
                        model_id=model.model_id, device=device, progress=rank == 0)
    if rank == 0:
        rows = table.as_dicts()
        with open(args.out / "fid_per_nfe.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot_fid(table.rows, args.out / "fid_vs_nfe.png", None)
        print(f"FID ({extractor.name}, {args.num_samples} samples, reference {ref.source}; +- the half-width of the 95 % "
              "bootstrap interval, bold where significantly lowest):\n")
        print(markdown_table(table.rows, "fid", comparisons=table.comparisons.get("fid")))
        print(f"\nwrote {args.out / 'fid_per_nfe.csv'} and {args.out / 'fid_vs_nfe.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
