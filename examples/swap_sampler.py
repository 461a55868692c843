"""Swap a fewstep sampler into a diffusers pipeline saved in a local folder.

    python examples/swap_sampler.py PATH/TO/PIPELINE --nfe 10 [--sampler dpmpp_3m] [--prompt "a cat"]

PATH is a folder written by ``pipeline.save_pretrained`` (or a downloaded model snapshot): a
``model_index.json`` with ``unet`` and ``scheduler`` subfolders.  Works for unconditional pipelines
(DDPM/DDIM) and text-to-image ones (Stable Diffusion); the NFE budget is the one knob.  Images go to
``--out`` (default ``samples/``).  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", type=Path, help="local pipeline folder (model_index.json inside)")
    p.add_argument("--nfe", type=int, default=10, help="network evaluations per image (default: %(default)s)")
    p.add_argument("--sampler", default="dpmpp_3m", help="any name from `fewstep samplers` (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="text prompt, for text-to-image pipelines")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("samples"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    if not (args.pipeline / "model_index.json").is_file():
        print(f"error: {args.pipeline} is not a saved pipeline (no model_index.json); "
              "save one with pipeline.save_pretrained(folder)", file=sys.stderr)
        return 2

    from diffusers import DiffusionPipeline

    from fewstep import FewstepScheduler

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    pipe = pipe.to(args.device)
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler=args.sampler)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(num_inference_steps=args.nfe, generator=generator)
    if "prompt" in params:
        if args.prompt is None:
            print("error: this pipeline needs --prompt", file=sys.stderr)
            return 2
        kwargs.update(prompt=args.prompt, guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images)
    else:
        kwargs.update(batch_size=args.num_images)
    images = pipe(**kwargs).images
    args.out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(args.out / f"{args.sampler}_nfe{args.nfe}_{i}.png")
    print(f"saved {len(images)} images from {args.sampler} at {args.nfe} NFE to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
