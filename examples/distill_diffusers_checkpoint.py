"""Distil a consistency student from a diffusers checkpoint folder, on one or many GPUs.

    # one GPU, or the CPU
    python examples/distill_diffusers_checkpoint.py PIPELINE_DIR --data IMAGES_DIR --out student-run
    # 8 GPUs on one machine (DDP), bf16 autocast with fp32 master weights
    accelerate launch --multi_gpu --num_processes 8 examples/distill_diffusers_checkpoint.py \\
        PIPELINE_DIR --data IMAGES_DIR --objective cd --steps 20000 --batch-size 512 --precision bf16 \\
        --resume latest --out student-run
    # continuous-time consistency: sCM, or rCM (sCM + a fake score trained alternately, DMD term)
    accelerate launch --multi_gpu --num_processes 8 examples/distill_diffusers_checkpoint.py \\
        PIPELINE_DIR --data IMAGES_DIR --objective rcm --steps 20000 --batch-size 512 --precision bf16 \\
        --tangent-warmup 10000 --resume latest --out rcm-run

PIPELINE_DIR is a folder written by ``pipeline.save_pretrained`` (``model_index.json``, ``unet/``,
``scheduler/``) of an unconditional pixel-space model (``DDPMPipeline``, ``DDIMPipeline``).
IMAGES_DIR holds the training images (PNG/JPEG), resized to the UNet's sample size.  The run
checkpoints atomically every ``--checkpoint-every`` steps (``--resume latest`` continues after a
crash or preemption) and writes the student to ``OUT/student`` in diffusers format with the JSON
naming its sampler; ``fewstep.distill.load_student(OUT/student).sample(noise, nfe=2)`` samples it.
sCM / rCM students start from the teacher's weights (an epsilon, v or flow network; any schedule,
mapped to TrigFlow) and are sampled with the registry's ``scm`` sampler; rCM's fake score is a
copy of the teacher's UNet with its own AdamW, checkpointed with the student.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pipeline", type=Path)
    p.add_argument("--data", type=Path, required=True, help="folder of training images")
    p.add_argument("--objective", choices=["cd", "mcd", "scm", "rcm"], default="cd")
    p.add_argument("--tangent-warmup", type=int, default=1000, help="scm / rcm: steps of the tangent warm-up")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--teacher-sampler", default="dpmpp_2s", help="registry sampler of the teacher's ODE step")
    p.add_argument("--num-intervals", type=int, default=18)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", default=None, help="'latest' to continue a killed run")
    p.add_argument("--out", type=Path, default=Path("student-run"))
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if not (args.pipeline / "model_index.json").is_file():
        print(f"error: {args.pipeline} is not a saved pipeline (no model_index.json)", file=sys.stderr)
        return 2

    from diffusers import DiffusionPipeline

    from fewstep.distill import CD, MCD, RCM, SCM, Distiller, DistillConfig, TensorData, load_student
    from fewstep.distill.data import load_image_folder
    from fewstep.models import DiffusersDenoiser

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, local_files_only=True, use_safetensors=True)
    teacher = DiffusersDenoiser.from_pipeline(pipe)  # schedule and prediction type from the pipeline's scheduler
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    data = TensorData(load_image_folder(args.data, size, cfg.in_channels))
    if args.objective == "cd":
        objective = CD(args.num_intervals, teacher_sampler=args.teacher_sampler)
    elif args.objective == "mcd":
        objective = MCD(args.num_intervals, segments=4, teacher_sampler=args.teacher_sampler)
    else:  # sCM / rCM: the JVP runs through the UNet on SDPA's math kernel (attention="sdpa")
        objective = (SCM if args.objective == "scm" else RCM)(tangent_warmup=args.tangent_warmup)
    config = DistillConfig(
        output_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, checkpoint_every=args.checkpoint_every,
        resume=args.resume, cpu=args.cpu, log_every=min(50, args.steps),
        attention="sdpa" if args.objective in ("scm", "rcm") else "auto",
    )
    run = Distiller(objective, data, teacher, scheduler_config=dict(pipe.scheduler.config), config=config).train()
    if run.student_dir is not None and run.student_dir.is_dir():  # every process returns; rank 0 wrote it
        student = load_student(run.student_dir)
        noise = torch.randn(4, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        x = student.sample(noise, 2)
        print(f"student ({student.sampler}) saved to {run.student_dir}; 2-step samples in [{x.min():.2f}, {x.max():.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
