"""Latent consistency distillation (LCD) of a small text-conditioned ``UNet2DConditionModel``.

    python examples/lcd_unet2dcondition.py [--teacher UNET_DIR] [--steps 300] [--lora] [--out lcd-run]

The teacher is a ``UNet2DConditionModel`` (a local folder from ``unet.save_pretrained``, or a
small randomly initialised one) under Stable Diffusion's scaled-linear schedule.  The training set
is synthetic: latents (N, 4, 16, 16) with "prompt" states (N, 8, 32) of ten classes, and the
empty-prompt state is zeros; replace them with VAE latents and text-encoder states for real use
(``TensorData(latents, {"encoder_hidden_states": states})``).  The student gets LCM's
guidance embedding (``time_cond_proj_dim``) and is sampled with the registry's ``lcm`` sampler at
1, 2 and 4 steps; ``--lora`` trains LoRA adapters instead (the teacher is the same UNet with the
adapters off, LCM-LoRA; the student folder holds the adapter in diffusers' LoRA format).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def small_unet() -> "torch.nn.Module":
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16, attention_head_dim=8,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=None, help="UNet2DConditionModel folder (default: a small random one)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (LCM-LoRA) instead of the full UNet")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--out", type=Path, default=Path("lcd-run"))
    args = p.parse_args(argv)

    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fewstep.distill import LCD, Distiller, DistillConfig, TensorData, load_student
    from fewstep.models import DiffusersDenoiser

    unet = UNet2DConditionModel.from_pretrained(args.teacher, local_files_only=True, use_safetensors=True) if args.teacher else small_unet()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    teacher = DiffusersDenoiser(unet.eval(), scheduler)
    g = torch.Generator().manual_seed(0)
    n, size, dim = 512, unet.config.sample_size, unet.config.cross_attention_dim
    labels = torch.randint(0, 10, (n,), generator=g)
    prompts = torch.randn(10, 8, dim, generator=g)
    centres = torch.randn(10, 4, size, size, generator=g)
    latents = 0.7 * centres[labels] + 0.3 * torch.randn(n, 4, size, size, generator=g)
    data = TensorData(latents, {"encoder_hidden_states": prompts[labels]})
    uncond = {"encoder_hidden_states": torch.zeros(1, 8, dim)}
    lora = base = None
    if args.lora:
        import copy

        base = copy.deepcopy(unet)  # the LoRA student's base: the teacher before adapters are added to it
        from peft import LoraConfig

        lora = LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    objective = LCD(uncond=uncond, num_ddim_steps=50, guidance_embedding=not args.lora, **({"target_ema": 0.0} if args.lora else {}))
    config = DistillConfig(output_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           precision=args.precision, checkpoint_every=max(args.steps // 2, 1), log_every=min(50, args.steps))
    run = Distiller(objective, data, teacher, lora=lora, guidance_embedding_dim=None if args.lora else 64,
                    scheduler_config=dict(scheduler.config), config=config).train()
    student = load_student(run.student_dir, base=base)  # a LoRA student folder holds only the adapter
    noise = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(1))
    cond = {"encoder_hidden_states": prompts[:4]}
    if not args.lora:
        cond["guidance_scale"] = 8.0
    for nfe in (1, 2, 4):
        x = student.sample(noise, nfe, cond=cond, generator=[torch.Generator().manual_seed(i) for i in range(4)])
        print(f"lcm, {nfe} step(s): latents mean {x.mean():+.3f}, std {x.std():.3f}")
    print(f"student ({student.sampler}, guidance embedding: {student.meta['guidance_embedding_dim']}) saved to {run.student_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
