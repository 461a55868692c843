"""Latent consistency distillation (LCD, full UNet) of a Stable Diffusion 1.5 checkpoint folder.

    # one GPU (or the CPU, for a tiny pipeline)
    python examples/lcm_sd15.py SD15_FOLDER --data PAIRS --out lcm-sd15
    # 8 GPUs, bf16 autocast, fp32 master weights; global batch 8 x 12 (LCM's recipe: batch 72-96)
    accelerate launch --config_file examples/accelerate/ddp_8gpu.yaml examples/lcm_sd15.py SD15_FOLDER \\
        --data PAIRS --batch-size 96 --steps 30000 --lr 1e-6 --precision bf16 --gradient-checkpointing --resume latest --out lcm-sd15
    # later: diffusers alone
    unet = UNet2DConditionModel.from_pretrained("lcm-sd15/student/unet")
    pipe = StableDiffusionPipeline.from_pretrained(SD15_FOLDER, unet=unet, scheduler=LCMScheduler.from_pretrained(SD15_FOLDER, subfolder="scheduler"))
    image = pipe(prompt, num_inference_steps=4, guidance_scale=8.0).images[0]

SD15_FOLDER is a local pipeline folder (``pipeline.save_pretrained``: ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; safetensors weights).  PAIRS is a folder of
image-caption files (``name.jpg`` + ``name.txt``), a folder of webdataset ``.tar`` shards, or a
folder of latent shards written once by ``--precompute FOLDER`` (then the VAE and text encoders
are not run during training).  Images are decoded, resized and centre-cropped in DataLoader
workers, sharded over the processes by position (no two ranks read one example in an epoch), and
the position is saved with each checkpoint, so ``--resume latest`` continues the stream exactly.
Nothing is downloaded and nothing is loaded whole into memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", type=Path, help="local Stable Diffusion 1.5 pipeline folder")
    p.add_argument("--data", type=Path, required=True, help="image-caption folder, .tar shards, or latent shards")
    p.add_argument("--precompute", type=Path, default=None, help="encode --data into latent shards here and exit")
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--batch-size", type=int, default=96, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--num-ddim-steps", type=int, default=50)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--validation-prompts", nargs="*", default=["a photo of an astronaut riding a horse"])
    p.add_argument("--validate-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("lcm-sd15"))
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fewstep.distill import LCD, Distiller, DistillConfig
    from fewstep.distill.encode import PipelineEncoder
    from fewstep.distill.stream import ImageTextData, ImageTextFolder, LatentShards, TarShards, precompute
    from fewstep.distill.validate import ValidationImages
    from fewstep.models import DiffusersDenoiser

    encoder = PipelineEncoder.from_folder(args.pipeline)  # VAE (fp32) and CLIP text encoder, local safetensors only
    if (args.data / "index.json").is_file():
        data = LatentShards(args.data)
    else:
        source = TarShards(args.data) if any(args.data.glob("*.tar")) else ImageTextFolder(args.data)
        data = ImageTextData(source, encoder)
        if args.precompute is not None:
            precompute(data, args.precompute, device="cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
            print(f"latent shards written to {args.precompute}; train with --data {args.precompute}")
            return 0
    scheduler = DDPMScheduler.from_pretrained(args.pipeline, subfolder="scheduler", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet", use_safetensors=True, local_files_only=True)
    teacher = DiffusersDenoiser(unet.eval(), scheduler)
    objective = LCD(num_ddim_steps=args.num_ddim_steps)  # w in [6, 16] (LCM's w' in [5, 15]); the empty prompt from the encoder
    config = DistillConfig(output_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                           gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
                           validate_every=args.validate_every, resume=args.resume, num_workers=args.num_workers, cpu=args.cpu,
                           log_every=min(50, args.steps))
    validator = ValidationImages(encoder, args.validation_prompts, args.out / "validation", "lcm", {"original_inference_steps": args.num_ddim_steps},
                                 guidance_scale=8.0) if args.validation_prompts else None
    run = Distiller(objective, data, teacher, guidance_embedding_dim=256, scheduler_config=dict(scheduler.config),
                    validator=validator, config=config).train()
    print(f"student saved to {run.student_dir} (unet/ loads with UNet2DConditionModel.from_pretrained; sample with LCMScheduler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
