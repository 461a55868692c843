"""Swap a fewstep sampler into the embedded digits model's DDPMPipeline and save the images.

    python examples/embedded_digits_pipeline.py [--sampler dpmpp_3m] [--nfe 8] [--num-images 32] [--out digits.png]

The embedded model ships with fewstep (a diffusers UNet2DModel trained on scikit-learn's 8x8
digits, ``fewstep.models.embedded``), so this runs anywhere, on a CPU, in seconds.  It saves one
image grid: the top row from the pipeline's own DDPM scheduler, the bottom row from the same
pipeline with ``FewstepScheduler`` (the one-line swap), both at ``--nfe`` network evaluations and
from the same generator, to show what the sampler buys at a small budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sampler", default="dpmpp_3m", help="any diffusion sampler from `fewstep samplers`")
    p.add_argument("--nfe", type=int, default=8)
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("digits.png"))
    args = p.parse_args(argv)

    from PIL import Image

    from fewstep import FewstepScheduler
    from fewstep.models.embedded import digits_pipeline

    pipe = digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = {}
    ddpm = pipe(batch_size=args.num_images, num_inference_steps=args.nfe, generator=torch.Generator().manual_seed(args.seed),
                output_type="np").images
    rows["ddpm"] = ddpm
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler=args.sampler)
    ours = pipe(batch_size=args.num_images, num_inference_steps=args.nfe, generator=torch.Generator().manual_seed(args.seed),
                output_type="np").images
    rows[args.sampler] = ours

    # One row per scheduler, each image scaled up 4x (nearest) with a one-pixel gap.
    strips = []
    for images in rows.values():
        tiles = [np.pad(np.kron(im[:, :, 0], np.ones((4, 4))), ((1, 1), (1, 1)), constant_values=1.0) for im in images]
        strips.append(np.concatenate(tiles, axis=1))
    grid = (np.concatenate(strips, axis=0) * 255).round().astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"saved {args.out}: top row DDPM's scheduler, bottom row {args.sampler}, both at {args.nfe} network evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
