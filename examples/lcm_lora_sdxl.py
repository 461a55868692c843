"""LCM-LoRA for an SDXL checkpoint folder: LoRA adapters distilled with LCD, saved in diffusers'
LoRA format.

    python examples/lcm_lora_sdxl.py SDXL_FOLDER --data PAIRS --out lcm-lora-sdxl
    # 8 GPUs: the frozen base in bf16, the adapters in fp32 (diffusers' LoRA scripts' split)
    accelerate launch --config_file examples/accelerate/ddp_8gpu.yaml examples/lcm_lora_sdxl.py SDXL_FOLDER \\
        --data PAIRS --batch-size 96 --steps 4000 --lr 1e-4 --precision bf16 --gradient-checkpointing --resume latest
    # later: diffusers alone
    pipe = StableDiffusionXLPipeline.from_pretrained(SDXL_FOLDER)
    pipe.load_lora_weights("lcm-lora-sdxl/student"); pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).images[0]

SDXL_FOLDER is a local SDXL pipeline folder (``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``).  The text conditioning
is SDXL's: both encoders' penultimate states, the second encoder's pooled embedding and the
micro-conditioning ``time_ids`` from each image's original size and crop; the unconditional input
is zeros (``force_zeros_for_empty_prompt``).  Checkpoints hold the adapters, the optimizer and
the data position only, not the base weights.  PAIRS: as in ``examples/lcm_sd15.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", type=Path, help="local SDXL pipeline folder")
    p.add_argument("--data", type=Path, required=True, help="image-caption folder, .tar shards, or latent shards")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=96, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--num-ddim-steps", type=int, default=50)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", default=None)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("lcm-lora-sdxl"))
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from fewstep.distill import LCD, Distiller, DistillConfig
    from fewstep.distill.cli import LCM_LORA_TARGETS
    from fewstep.distill.encode import PipelineEncoder
    from fewstep.distill.stream import ImageTextData, ImageTextFolder, LatentShards, TarShards
    from fewstep.models import DiffusersDenoiser

    if (args.data / "index.json").is_file():
        data = LatentShards(args.data)
    else:
        source = TarShards(args.data) if any(args.data.glob("*.tar")) else ImageTextFolder(args.data)
        data = ImageTextData(source, PipelineEncoder.from_folder(args.pipeline))
    scheduler = DDPMScheduler.from_pretrained(args.pipeline, subfolder="scheduler", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet", use_safetensors=True, local_files_only=True)
    teacher = DiffusersDenoiser(unet.eval(), scheduler)
    present = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=[t for t in LCM_LORA_TARGETS if t.rsplit(".", 1)[-1] in present])
    # LCM-LoRA: no guidance embedding, the student is its own (stop-gradient) target, w in [4, 16] (the script's w' in [3, 15])
    objective = LCD(num_ddim_steps=args.num_ddim_steps, guidance_embedding=False, target_ema=0.0, loss="l2")
    config = DistillConfig(output_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                           gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
                           resume=args.resume, num_workers=args.num_workers, cpu=args.cpu, log_every=min(50, args.steps))
    run = Distiller(objective, data, teacher, lora=lora, scheduler_config=dict(scheduler.config), config=config).train()
    print(f"LoRA saved to {run.student_dir} (pipe.load_lora_weights(folder); pipe.fuse_lora(); LCMScheduler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
