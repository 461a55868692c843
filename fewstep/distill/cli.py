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

from fewstep import _cli_checks as check
from fewstep._cli_checks import UsageError

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
    d.add_argument("--steps", type=check.positive_int, default=None, help=f"training steps (default: {DIGITS_DEFAULTS['steps']})")
    d.add_argument("--batch-size", type=check.positive_int, default=None,
                   help=f"global batch, divisible by processes x --grad-accum (default: {DIGITS_DEFAULTS['batch_size']})")
    d.add_argument("--grad-accum", type=check.positive_int, default=1, help="micro-batches per step (default: %(default)s)")
    d.add_argument("--lr", type=check.positive_float, default=None, help=f"AdamW learning rate (default: {DIGITS_DEFAULTS['lr']})")
    d.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no", help="autocast precision (fp32 master weights)")
    d.add_argument("--gradient-checkpointing", action="store_true")
    d.add_argument("--attention", choices=["auto", "sdpa", "xformers", "keep"], default="auto")
    d.add_argument("--compile", action="store_true", help="torch.compile the student")
    d.add_argument("--num-intervals", type=check.positive_int, default=None,
                   help=f"training grid intervals (CD: {DIGITS_DEFAULTS['num_intervals']}, MCD: 32), DDIM steps (LCD: 50)")
    d.add_argument("--segments", type=check.positive_int, default=None, help="MCD segments, dividing --num-intervals (default: 4)")
    d.add_argument("--teacher-sampler", default=None, help="registry sampler of the teacher's step (default: ddim)")
    d.add_argument("--loss", choices=["l2", "pseudo_huber", "huber"], default=None, help="consistency distance (default: the objective's)")
    d.add_argument("--target-ema", type=check.unit_interval, default=None, help="EMA rate of the target network, in [0, 1) (0: stop-gradient)")
    d.add_argument("--out", type=Path, default=Path("distill-out"), help="output folder (default: %(default)s)")
    d.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    d.add_argument("--checkpoint-every", type=check.positive_int, default=500, help="steps between checkpoints (default: %(default)s)")
    d.add_argument("--keep-checkpoints", type=check.positive_int, default=3, help="checkpoints kept (default: %(default)s)")
    d.add_argument("--validate-every", type=check.nonnegative_int, default=None, help="steps between quality checks (0: only at the end)")
    d.add_argument("--probe-samples", type=check.int_at_least(2), default=None,
                   help=f"samples for the quality numbers, at least 2 (default: {DIGITS_DEFAULTS['probe_samples']})")
    d.add_argument("--seed", type=check.seed, default=0, help="0 to 2**63-1 (default: %(default)s)")
    d.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    d.add_argument(
        "--threads", type=check.positive_int, default=None,
        help="CPU threads for torch (default: 1 for CPU runs, which stays fast on a shared machine; "
        "more threads than free cores slows PyTorch's CPU kernels down many times)",
    )
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_distill)


# ---------------------------------------------------------------------------------------------
# Loading teachers and data
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path, arg: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{arg}: {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{arg}: {path} does not hold a JSON object")
    return data


def _network_class(config: dict[str, Any], path: Path, arg: str) -> Any:
    import diffusers

    cls_name = config.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, str(cls_name), None) if isinstance(cls_name, str) and not cls_name.startswith("_") else None
    if not isinstance(cls, type):
        raise UsageError(f"{arg}: unknown network class {cls_name!r} in {path}; fewstep loads diffusers model classes only")
    return cls


def _teacher_files(folder: Path) -> tuple[Path, Path]:
    unet_cfg, sched_file = folder / "unet" / "config.json", folder / "scheduler" / "scheduler_config.json"
    if not unet_cfg.is_file() or not sched_file.is_file():
        raise UsageError(
            f"--teacher {str(folder)!r} is not a diffusers pipeline folder: expected unet/config.json and "
            "scheduler/scheduler_config.json (save one with pipeline.save_pretrained(folder))"
        )
    return unet_cfg, sched_file


def _load_teacher(folder: Path) -> tuple[Any, dict[str, Any]]:
    """A :class:`DiffusersDenoiser` and its scheduler config from a local diffusers folder."""
    from fewstep.models.diffusers_models import DiffusersDenoiser

    from fewstep._util import require_safetensors

    unet_cfg, sched_file = _teacher_files(folder)
    cls = _network_class(_read_json(unet_cfg, "--teacher"), unet_cfg, "--teacher")
    require_safetensors(folder / "unet", "the teacher's UNet folder")  # a pickled .bin only: one message, never unpickled
    unet = cls.from_pretrained(folder / "unet", local_files_only=True, use_safetensors=True)
    config = _read_json(sched_file, "--teacher")
    return DiffusersDenoiser(unet.eval(), config), config


def _load_data(path: Path, size: int, channels: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(data, cond, uncond)`` from a tensor file, a dict file or an image folder (resized to
    ``size`` with ``channels`` channels)."""
    if path.is_dir():
        from fewstep.distill.data import load_image_folder

        return load_image_folder(path, size, channels), {}, {}
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise UsageError(f"--data {str(path)!r}: use a .pt/.pth/.npy file or a folder of images")
    from fewstep.distill.data import load_data_file

    return load_data_file(path)  # .npy without pickles, .pt with weights_only=True


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _objective(args: argparse.Namespace, uncond: dict[str, torch.Tensor]) -> Any:
    """The objective of the command line; an explicit value is used as given (checked
    positive by argparse), only a missing one takes the default."""
    from fewstep.distill import CD, ICT, LCD, MCD

    common: dict[str, Any] = {}
    if args.target_ema is not None:
        common["target_ema"] = args.target_ema
    if args.loss is not None:
        common["loss"] = args.loss
    sampler = DIGITS_DEFAULTS["teacher_sampler"] if args.teacher_sampler is None else args.teacher_sampler
    n = args.num_intervals
    if args.objective == "ict":
        return ICT(**({"loss": args.loss} if args.loss is not None else {}))
    if args.objective == "lcd":
        return LCD(uncond=uncond or None, num_ddim_steps=50 if n is None else n, teacher_sampler=sampler, **common)
    if args.objective == "mcd":
        return MCD(32 if n is None else n, segments=4 if args.segments is None else args.segments, teacher_sampler=sampler, **common)
    return CD(DIGITS_DEFAULTS["num_intervals"] if n is None else n, teacher_sampler=sampler, **common)


def _check_distill(args: argparse.Namespace) -> None:
    """Every value of ``fewstep distill`` that can be checked without loading or computing anything."""
    objective = args.objective
    digits = args.teacher is None
    if digits:
        if args.data is not None:
            raise UsageError("--data goes with --teacher; the embedded digits teacher trains on the digits "
                             "(give --teacher FOLDER to distil your own model)")
        if objective == "lcd":
            raise UsageError("--objective lcd distils a conditional teacher: give --teacher FOLDER and --data with its "
                             "conditioning (the embedded digits teacher is unconditional)")
    else:
        check.existing_path(args.teacher, "--teacher", folder=True, what="give a diffusers pipeline folder (pipeline.save_pretrained(folder))")
        unet_cfg, sched_file = _teacher_files(args.teacher)
        _network_class(_read_json(unet_cfg, "--teacher"), unet_cfg, "--teacher")
        _read_json(sched_file, "--teacher")
        if args.data is None:
            raise UsageError("--teacher needs --data (the training images or latents: a .pt/.npy tensor (N, C, H, W) in "
                             "[-1, 1], a .pt dict, or a folder of images)")
        what = "give a .pt/.pth/.npy tensor file or a folder of images"
        check.existing_path(args.data, "--data", what=what)
        if args.data.is_dir():
            check.image_folder(args.data, "--data", same_size=False)
        elif args.data.suffix not in (".pt", ".pth", ".npy"):
            raise UsageError(f"--data {str(args.data)!r}: {what}")
        if objective == "lcd" and args.data.is_dir():
            raise UsageError("--objective lcd needs conditioning with the data: a .pt dict with 'data' (or 'latents'), "
                             "e.g. 'encoder_hidden_states', and 'uncond'; an image folder has none")
    if args.student is not None:
        check.existing_path(args.student, "--student", folder=True, what="give a diffusers model folder (model.save_pretrained(folder))")
        cfg = args.student / "config.json"
        if not cfg.is_file():
            raise UsageError(f"--student {str(args.student)!r} has no config.json; give a diffusers model folder (model.save_pretrained(folder))")
        _network_class(_read_json(cfg, "--student"), cfg, "--student")
    if objective == "ict":
        given = [k for k, v in (("--num-intervals", args.num_intervals), ("--teacher-sampler", args.teacher_sampler),
                                ("--target-ema", args.target_ema), ("--segments", args.segments)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --objective ict "
                             "(improved consistency training has its own noise curriculum, no teacher step and no EMA target)")
    if args.segments is not None and objective != "mcd":
        raise UsageError(f"--segments {args.segments} applies to --objective mcd only")
    if args.teacher_sampler is not None:
        from fewstep.distill.teacher import IntervalSolver

        try:
            IntervalSolver.check(args.teacher_sampler)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--teacher-sampler {args.teacher_sampler!r}: {err}") from None
    if objective == "mcd":
        n = 32 if args.num_intervals is None else args.num_intervals
        seg = 4 if args.segments is None else args.segments
        if n % seg:
            raise UsageError(f"--segments {seg} must divide --num-intervals {n}")
    batch = DIGITS_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if batch % (world * args.grad_accum):
        raise UsageError(f"--batch-size {batch} (global) must be divisible by processes x --grad-accum = {world} x {args.grad_accum}")
    if args.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise UsageError("--attention xformers: xformers is not installed; use --attention sdpa (or auto)")
    check.output_dir(args.out, "--out")
    if args.resume is not None and str(args.resume) != "latest":
        check.existing_path(args.resume, "--resume", folder=True, what="pass 'latest' or a checkpoint-<step> folder of this run")
    from fewstep.distill.checkpoint import check_output_dir

    # one rule for the CLI and the Python API: a non-empty --out needs --resume; a checkpoint to resume is verified
    check_output_dir(args.out, args.resume)


def _distill_saved(args: argparse.Namespace) -> str:
    """What an interrupted distillation leaves behind, for the message."""
    from fewstep.distill.checkpoint import CheckpointDir

    done = CheckpointDir(args.out / "checkpoints").complete()
    if not done:
        return (f"no checkpoint was written yet (the first comes after {args.checkpoint_every} steps, --checkpoint-every); "
                "nothing to resume")
    step, path = done[-1]
    again = "run the same command again" if args.resume is not None else "run the same command with --resume latest"
    return f"the last checkpoint is {path} (step {step}); {again} to continue from it"


def cmd_distill(args: argparse.Namespace) -> int:
    args.objective = DIGITS_DEFAULTS["objective"] if args.objective is None else args.objective
    _check_distill(args)
    args._on_interrupt = lambda: _distill_saved(args)
    from fewstep._util import atomic_write_json
    from fewstep.distill import Distiller, DistillConfig, TensorData
    from fewstep.distill.validate import QualityProbe
    from fewstep.eval.frechet import frechet_distance_from_features  # noqa: F401  (fail early if eval is broken)

    digits = args.teacher is None
    objective = None if args.objective == "lcd" else _objective(args, {})  # its own checks, before anything is loaded
    on_cpu = args.cpu or digits or not torch.cuda.is_available()
    if args.threads is not None or on_cpu:
        torch.set_num_threads(1 if args.threads is None else args.threads)
    features = reference_features = None
    if digits:
        from fewstep.eval.features import digits_features
        from fewstep.models.embedded import digits_denoiser, digits_images, digits_scheduler_config

        teacher = digits_denoiser()
        sched_cfg = digits_scheduler_config()
        data, cond, uncond = digits_images("train"), {}, {}
        if args.student_prediction_type is None and args.student is None:
            args.student_prediction_type = DIGITS_DEFAULTS["student_prediction_type"]
        features = digits_features()
        reference_features = features(digits_images("test"))
    else:
        net_cfg = _read_json(args.teacher / "unet" / "config.json", "--teacher")
        size = net_cfg.get("sample_size", 64)
        size = int(size if isinstance(size, int) else size[0])
        channels = int(net_cfg.get("in_channels", 3))
        data, cond, uncond = _load_data(args.data, size, channels)  # the data first: a wrong file fails before the teacher loads
        if data.ndim < 2 or data.shape[0] < 1:
            raise UsageError(f"--data {str(args.data)!r} holds a tensor of shape {tuple(data.shape)}; expected (N, C, H, W)")
        if data.ndim == 4 and data.shape[1] != channels:
            raise UsageError(f"--data {str(args.data)!r} holds {data.shape[1]}-channel data (shape {tuple(data.shape)}), but the "
                             f"teacher's network takes {channels} channels")
        if args.objective == "lcd" and not cond:
            raise UsageError(f"--objective lcd needs conditioning in --data {str(args.data)!r} (a .pt dict with "
                             "encoder_hidden_states and uncond)")
        if objective is None:
            objective = _objective(args, uncond)
        teacher, sched_cfg = _load_teacher(args.teacher)
    student = None
    if args.student is not None:
        from fewstep._util import require_safetensors

        cls = _network_class(_read_json(args.student / "config.json", "--student"), args.student / "config.json", "--student")
        require_safetensors(args.student, "--student")
        student = cls.from_pretrained(args.student, local_files_only=True, use_safetensors=True)
    if args.student_prediction_type is not None and student is None:
        import copy

        student = copy.deepcopy(teacher.model)  # the teacher's weights, re-read as another prediction type
    steps = DIGITS_DEFAULTS["steps"] if args.steps is None else args.steps
    validate_every = args.validate_every if args.validate_every is not None else (DIGITS_DEFAULTS["validate_every"] if digits else 0)
    config = DistillConfig(
        output_dir=args.out,
        steps=steps,
        batch_size=DIGITS_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size,
        grad_accum=args.grad_accum,
        lr=DIGITS_DEFAULTS["lr"] if args.lr is None else args.lr,
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
    config.check()
    n_probe = DIGITS_DEFAULTS["probe_samples"] if args.probe_samples is None else args.probe_samples
    shape = tuple(data.shape[1:])
    g = torch.Generator().manual_seed(args.seed + 12345)
    noise = torch.randn((n_probe, *shape), generator=g)
    probe_cond = None
    if args.objective == "lcd":
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
