"""``fewstep distill``: the command line of :mod:`fewstep.distill`.

With no model arguments it distils the embedded digits UNet (:mod:`fewstep.models.embedded`) on
the CPU and prints the student's quality at 1, 2 and 4 steps next to the teacher's at 10 and 50
NFE (FID on digit features against the test split, and the RMSE to the teacher's ODE map from the
same noise).  ``--teacher`` takes a diffusers pipeline folder (``model_index.json``) or a folder
with ``unet/`` and ``scheduler/``; ``--data`` the training data (a ``.pt``/``.npy`` tensor, a
``.pt`` dict for LCD, or a folder of images).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_distill_parser", "cmd_distill", "DIGITS_DEFAULTS"]

#: Settings of the default run (the embedded digits UNet, CPU, under 15 minutes on 2 cores).  The
#: student re-reads the eps teacher's weights as a v-prediction network: at the top of DDPM's
#: linear schedule (alpha = 0.0064) an eps network's data prediction amplifies its error 156x, and
#: after 600 steps the one-step FID on digit features was 13.4 as eps and 0.86 as v
#: (benchmarks/RESULTS.md; Salimans & Ho 2022, sec. 4, make the same observation).
DIGITS_DEFAULTS: dict[str, Any] = {
    "objective": "cd",
    "steps": 1500,
    "batch_size": 64,
    "lr": 5e-4,
    "num_intervals": 18,
    "teacher_sampler": "ddim",
    "student_prediction_type": "v_prediction",
    "validate_every": 500,
    "probe_samples": 1000,
}


def add_distill_parser(sub: Any) -> None:
    """Register the ``distill`` subcommand on ``fewstep``'s subparsers."""
    d = sub.add_parser(
        "distill",
        help="distil a few-step consistency student (default: the embedded digits UNet, CPU, < 15 min)",
        description=__doc__.splitlines()[0] + " With no arguments: the embedded digits teacher on the CPU.",
    )
    d.add_argument("--objective", choices=["cd", "lcd", "mcd", "ict"], default=None, help="default: cd")
    d.add_argument("--teacher", type=Path, default=None, help="diffusers pipeline folder (default: embedded digits UNet)")
    d.add_argument("--student", type=Path, default=None, help="diffusers model folder to start the student from (default: the teacher's weights)")
    d.add_argument(
        "--student-prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
        help="what the student network predicts; it starts from the teacher's weights either way "
        "(default: the teacher's; v_prediction for the embedded digits teacher)",
    )
    d.add_argument("--data", type=Path, default=None, help="training data: .pt/.npy tensor (N, C, H, W) in [-1, 1], .pt dict, or image folder")
    d.add_argument("--steps", type=int, default=None, help=f"training steps (default: {DIGITS_DEFAULTS['steps']})")
    d.add_argument("--batch-size", type=int, default=None, help=f"global batch (default: {DIGITS_DEFAULTS['batch_size']})")
    d.add_argument("--grad-accum", type=int, default=1)
    d.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default: {DIGITS_DEFAULTS['lr']})")
    d.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="autocast precision (fp32 master weights)")
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--attention", choices=["auto", "sdpa", "xformers", "keep"], default="auto")
    d.add_argument("--compile", action="store_true", help="torch.compile the student")
    d.add_argument("--num-intervals", type=int, default=None, help="training grid intervals (CD/MCD), DDIM steps (LCD)")
    d.add_argument("--segments", type=int, default=4, help="MCD segments (default: %(default)s)")
    d.add_argument("--teacher-sampler", default=None, help="registry sampler of the teacher's step (default: ddim)")
    d.add_argument("--loss", choices=["l2", "pseudo_huber", "huber"], default=None, help="consistency distance (default: the objective's)")
    d.add_argument("--target-ema", type=float, default=None, help="EMA rate of the target network (0: stop-gradient)")
    d.add_argument("--out", type=Path, default=Path("distill-out"), help="output folder (default: %(default)s)")
    d.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    d.add_argument("--checkpoint-every", type=int, default=500)
    d.add_argument("--keep-checkpoints", type=int, default=3)
    d.add_argument("--validate-every", type=int, default=None, help="steps between quality checks (0: only at the end)")
    d.add_argument("--probe-samples", type=int, default=None, help="samples for the quality numbers (default: 1000)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    d.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads for torch (default: 1 for CPU runs, which stays fast on a shared machine; "
        "more threads than free cores slows PyTorch's CPU kernels down many times)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)


# ---------------------------------------------------------------------------------------------
# Loading teachers and data
# ---------------------------------------------------------------------------------------------


def _load_teacher(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A :class:`DiffusersDenoiser` and its scheduler config from a local diffusers folder."""
    import diffusers

    from fewstep._util import require_safetensors
    from fewstep.models.diffusers_models import DiffusersDenoiser

    unet_dir = folder / "unet"
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file() or not sched_file.is_file():
        raise ValueError(
            f"{folder} is not a diffusers pipeline folder: expected unet/config.json and scheduler/scheduler_config.json "
            "(save one with pipeline.save_pretrained(folder))"
        )
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown network class {cls_name!r} in {unet_dir / 'config.json'}")
    require_safetensors(unet_dir, "the teacher's UNet folder")  # a pickled .bin only: one message, never unpickled
    unet = cls.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    config = json.loads(sched_file.read_text())
    return DiffusersDenoiser(unet.eval(), config), config


def _load_data(path: Path, unet: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(data, cond, uncond)`` from a tensor file, a dict file or an image folder."""
    if path.is_dir():
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        from fewstep.distill.data import load_image_folder

        return load_image_folder(path, size, cfg.in_channels), {}, {}
    from fewstep.distill.data import load_data_file

    return load_data_file(path)  # .npy without pickles, .pt with weights_only=True


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _objective(args: argparse.Namespace, uncond: dict[str, torch.Tensor]) -> Any:
    from fewstep.distill import CD, ICT, LCD, MCD

    common: dict[str, Any] = {}
    if args.target_ema is not None:
        common["target_ema"] = args.target_ema
    if args.loss is not None:
        common["loss"] = args.loss
    sampler = args.teacher_sampler or DIGITS_DEFAULTS["teacher_sampler"]
    n = args.num_intervals
    if args.objective == "ict":
        return ICT(**({"loss": args.loss} if args.loss else {}))
    if args.objective == "lcd":
        return LCD(uncond=uncond or None, num_ddim_steps=n or 50, teacher_sampler=sampler, **common)
    if args.objective == "mcd":
        return MCD(n or 32, segments=args.segments, teacher_sampler=sampler, **common)
    return CD(n or DIGITS_DEFAULTS["num_intervals"], teacher_sampler=sampler, **common)


def cmd_distill(args: argparse.Namespace) -> int:
    from fewstep._util import atomic_write_json
    from fewstep.distill import Distiller, DistillConfig, TensorData
    from fewstep.distill.checkpoint import check_output_dir
    from fewstep.distill.validate import QualityProbe
    from fewstep.eval.frechet import frechet_distance_from_features  # noqa: F401  (fail early if eval is broken)

    check_output_dir(args.out, args.resume)  # a rerun on an existing run needs --resume: refused before any work
    args.objective = args.objective or DIGITS_DEFAULTS["objective"]
    digits = args.teacher is None
    on_cpu = args.cpu or digits or not torch.cuda.is_available()
    if args.threads is not None or on_cpu:
        torch.set_num_threads(args.threads or 1)
    features = reference_features = None
    if digits:
        from fewstep.eval.features import digits_features
        from fewstep.models.embedded import digits_denoiser, digits_images, digits_scheduler_config

        teacher = digits_denoiser()
        sched_cfg = digits_scheduler_config()
        if args.data is not None:
            raise ValueError("--data goes with --teacher; the embedded digits teacher trains on the digits")
        data, cond, uncond = digits_images("train"), {}, {}
        if args.student_prediction_type is None and args.student is None:
            args.student_prediction_type = DIGITS_DEFAULTS["student_prediction_type"]
        features = digits_features()
        reference_features = features(digits_images("test"))
    else:
        teacher, sched_cfg = _load_teacher(args.teacher)
        if args.data is None:
            raise ValueError("--teacher needs --data (the training images or latents)")
        data, cond, uncond = _load_data(args.data, teacher.model)
    student = None
    if args.student is not None:
        import diffusers

        from fewstep._util import require_safetensors

        cls_name = json.loads((args.student / "config.json").read_text()).get("_class_name", "UNet2DModel")
        require_safetensors(args.student, "--student")
        student = getattr(diffusers, cls_name).from_pretrained(args.student, local_files_only=True, use_safetensors=True)
    if args.student_prediction_type is not None and student is None:
        import copy

        student = copy.deepcopy(teacher.model)  # the teacher's weights, re-read as another prediction type
    objective = _objective(args, uncond)
    steps = args.steps if args.steps is not None else DIGITS_DEFAULTS["steps"]
    validate_every = args.validate_every if args.validate_every is not None else (DIGITS_DEFAULTS["validate_every"] if digits else 0)
    config = DistillConfig(
        output_dir=args.out,
        steps=steps,
        batch_size=args.batch_size or DIGITS_DEFAULTS["batch_size"],
        grad_accum=args.grad_accum,
        lr=args.lr or DIGITS_DEFAULTS["lr"],
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        attention=args.attention,
        compile=args.compile,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        seed=args.seed,
        validate_every=validate_every,
        progress=not args.quiet,
        cpu=args.cpu or digits,
        log_every=max(1, min(50, steps)),
    )
    n_probe = args.probe_samples or DIGITS_DEFAULTS["probe_samples"]
    shape = tuple(data.shape[1:])
    g = torch.Generator().manual_seed(args.seed + 12345)
    noise = torch.randn((n_probe, *shape), generator=g)
    probe_cond = None
    if args.objective == "lcd":
        if not cond:
            raise ValueError("LCD needs conditioning in --data (a .pt dict with encoder_hidden_states and uncond)")
        probe_cond = {k: v[:1].expand(n_probe, *v.shape[1:]) for k, v in cond.items()}
    with torch.no_grad():
        ref = fewstep_sample(teacher, noise, "dpmpp_3m", 50, probe_cond)
    probe = QualityProbe(noise, teacher.schedule, ref, features, reference_features, probe_cond)
    small = QualityProbe(noise[:256], teacher.schedule, ref[:256], features, reference_features, probe_cond)

    def validator(student_model: Any, step: int) -> dict[str, float]:
        return small.flat(small.student(student_model, objective.sampler, (1, 2, 4), objective.sampler_options()))

    distiller = Distiller(
        objective,
        TensorData(data, cond),
        teacher,
        student,
        prediction_type=args.student_prediction_type,
        guidance_embedding_dim=256 if args.objective == "lcd" else None,
        scheduler_config=sched_cfg,
        validator=validator if validate_every else None,
        config=config,
    )
    # The teacher is frozen: score it now, before training stores it in the autocast dtype.
    teacher_rows = [("teacher (dpmpp_2m)", k, s) for k, s in probe.teacher(teacher, "dpmpp_2m", (10, 50)).items()]
    result = distiller.train()
    if result.student_dir is None or int(os.environ.get("RANK", "0")) != 0:
        return 0
    from fewstep.distill.export import load_student

    loaded = load_student(result.student_dir)
    rows = [(f"student ({objective.name}, {loaded.sampler})", k, s) for k, s in probe.student(loaded.denoiser, loaded.sampler, (1, 2, 4), loaded.sampler_options).items()]
    rows += teacher_rows
    _print_table(rows, digits)
    atomic_write_json(args.out / "quality.json", [{"model": m, "nfe": k, **s} for m, k, s in rows], indent=1)
    print(f"student saved to {result.student_dir} (load with fewstep.distill.load_student)")
    return 0


def fewstep_sample(teacher: Any, noise: torch.Tensor, sampler: str, nfe: int, cond: Any) -> torch.Tensor:
    import fewstep

    return fewstep.sample(teacher, noise, sampler, nfe, cond=cond)


def _print_table(rows: list[tuple[str, int, dict[str, float]]], digits: bool) -> None:
    fd = "FID (digit features)" if digits else "FD"
    head = ("model", "NFE", fd, "RMSE to teacher ODE map")
    lines = [head] + [(m, str(k), f"{s.get('fd', float('nan')):.3f}", f"{s.get('rmse', float('nan')):.4f}") for m, k, s in rows]
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    for j, r in enumerate(lines):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print("(cm_multistep and lcm re-noise between steps, so their multi-step samples leave the ODE trajectory: "
          "read their RMSE at 1 step, and FID at every NFE)")
    sys.stdout.flush()
