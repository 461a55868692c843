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
    # sCM / rCM steps cost about 1.7x CD's on the CPU (the JVP; rCM's fake score): 1000 keeps the
    # default run under 15 minutes (benchmarks/RESULTS.md, "Continuous-time consistency")
    "continuous_steps": 1000,
    "batch_size": 64,
    "lr": 5e-4,
    "num_intervals": 18,
    "teacher_sampler": "ddim",
    "student_prediction_type": "v_prediction",
    "validate_every": 500,
    "probe_samples": 1000,
}


#: Settings of --objective mmd / boot on the embedded digits teacher (measured, benchmarks/RESULTS.md).
#: MMD: the authors fine-tune without EMA with gradient clipping 0.5; the sampler clips its data
#: predictions to [-1, 1] as the digits model's scheduler config asks (clip_sample=True), which
#: keeps the tuned samples in the image range.  BOOT: its target is the student itself under
#: stop-gradient (no EMA network).
MMD_DEFAULTS: dict[str, Any] = {"nfe": 2, "steps": 300, "lr": 1e-4, "grad_clip": 0.5, "sampling_ema": None,
                                "sampler_options": {"clip_denoised": 1.0}}
BOOT_DEFAULTS: dict[str, Any] = {"steps": 1500, "lr": 5e-4}


def add_distill_parser(sub: Any) -> None:
    """Register the ``distill`` subcommand on ``fewstep``'s subparsers."""
    d = sub.add_parser(
        "distill",
        help="distil a few-step consistency student (default: the embedded digits UNet, CPU, < 15 min)",
        description=__doc__.splitlines()[0] + " With no arguments: the embedded digits teacher on the CPU.",
    )
    d.add_argument("--objective", choices=["cd", "lcd", "mcd", "ict", "slct", "scm", "rcm", "boot", "mmd"], default=None,
                   help="default: cd; scm / rcm: continuous-time consistency (sCM, score-regularised rCM); boot is data-free "
                   "(no --data); mmd fine-tunes the teacher for --nfe steps of --tune-sampler")
    d.add_argument("--teacher", type=Path, default=None, help="diffusers pipeline folder (default: embedded digits UNet)")
    d.add_argument("--student", type=Path, default=None, help="diffusers model folder to start the student from (default: the teacher's weights)")
    d.add_argument(
        "--student-prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None,
        help="what the student network predicts; it starts from the teacher's weights either way "
        "(default: the teacher's; v_prediction for the embedded digits teacher)",
    )
    d.add_argument("--data", type=Path, default=None,
                   help="training data: .pt/.npy tensor (N, C, H, W) in [-1, 1], .pt dict, a folder of images, a folder of "
                   "image-caption pairs (name.png + name.txt) or of webdataset .tar shards (with a text-to-image --teacher), "
                   "or a folder of latent shards written by --precompute")
    d.add_argument("--steps", type=check.positive_int, default=None,
                   help=f"training steps (default: {DIGITS_DEFAULTS['steps']}; scm / rcm: {DIGITS_DEFAULTS['continuous_steps']})")
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
    d.add_argument("--loss", choices=["l2", "pseudo_huber", "huber", "cauchy"], default=None, help="consistency distance (default: the objective's)")
    d.add_argument("--immiscible", nargs="?", const="exact", choices=["exact", "fp16"], default=None,
                   help="immiscible diffusion (Li et al. 2024): assign each micro-batch's noises to its data by minimum total "
                   "distance before noising (exact linear assignment, or on fp16 costs); sLCT's OT coupling does this already")
    d.add_argument("--slct-without", type=check.name_list, default=None, metavar="NAMES",
                   help="sLCT ingredients to switch off, comma-separated: cauchy, diffusion, ot, adaptive_c (all off: iCT)")
    m = d.add_argument_group("MMD finetuning (--objective mmd)")
    m.add_argument("--nfe", type=check.positive_int, default=None, help=f"the budget the model is tuned for (default: {MMD_DEFAULTS['nfe']})")
    m.add_argument("--tune-sampler", default=None, help="the deterministic registry sampler tuned for (default: ddim)")
    m.add_argument("--no-checkpointing", action="store_true",
                   help="keep every evaluation's activations instead of recomputing them (memory grows with --nfe)")
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
    g = d.add_argument_group("latent consistency distillation (--objective lcd) of a text-to-image pipeline")
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (LCM-LoRA) instead of the full UNet; the student folder holds them in diffusers' LoRA format")
    g.add_argument("--lora-rank", type=check.positive_int, default=None, help="LoRA rank (default: 64, the LCM-LoRA SDXL script's)")
    g.add_argument("--guidance-range", type=check.number_range, default=None,
                   help="W_MIN,W_MAX of the guidance scale drawn per sample, diffusers' convention (w = 1: no guidance; "
                   "default 6,16 for the full UNet, 4,16 with --lora)")
    g.add_argument("--skip", type=check.positive_int, default=None, help="DDIM grid steps spanned by one teacher step (default: 1)")
    g.add_argument("--resolution", type=check.positive_int, default=None,
                   help="pixel size of the square training crops of image-text data (default: the VAE's sample_size)")
    g.add_argument("--precompute", type=Path, default=None,
                   help="encode --data (image-caption pairs) once with the teacher's VAE and text encoders into latent shards "
                   "in this folder and exit; later runs take --data FOLDER")
    g.add_argument("--validation-prompts", nargs="+", default=None, metavar="PROMPT",
                   help="prompts sampled with the student every --validate-every steps and at the end, VAE-decoded into "
                   "OUT/validation/step-N.png")
    c = d.add_argument_group("continuous-time consistency (--objective scm | rcm)")
    c.add_argument("--tangent-warmup", type=check.nonnegative_int, default=None,
                   help="steps of sCM's tangent warm-up (default: a third of --steps, at most 10000, the paper's)")
    c.add_argument("--jvp", choices=["jvp", "fd"], default=None, help="tangent by torch.func.jvp (default) or finite differences")
    c.add_argument("--dmd-weight", type=check.positive_float, default=None, help="rCM: weight of the distribution-matching term (default: 1)")
    c.add_argument("--student-update-freq", type=check.positive_int, default=None,
                   help="rCM: after the warm-up the student updates every N-th step, the fake score on the others (default: 5)")
    s = d.add_argument_group("scale")
    s.add_argument("--tf32", action="store_true", help="TF32 matrix products on Ampere+ GPUs")
    s.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw", help="adamw8bit needs bitsandbytes")
    s.add_argument("--log-with", type=check.name_list, default=None,
                   help="tensorboard and/or wandb, comma-separated (metrics.csv and metrics.jsonl are always written)")
    s.add_argument("--num-workers", type=check.nonnegative_int, default=2, help="DataLoader workers decoding image-text data (default: %(default)s)")
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
    from fewstep.distill import CD, ICT, LCD, MCD, RCM, SCM

    common: dict[str, Any] = {}
    if args.target_ema is not None:
        common["target_ema"] = args.target_ema
    if args.loss is not None:
        common["loss"] = args.loss
    sampler = DIGITS_DEFAULTS["teacher_sampler"] if args.teacher_sampler is None else args.teacher_sampler
    n = args.num_intervals
    assigned = {"noise_assignment": args.immiscible} if args.immiscible is not None else {}
    if args.objective == "slct":
        from fewstep.distill.slct import SLCT

        return SLCT.without(args.slct_without or (), **({"loss": args.loss} if args.loss is not None else {}))
    if args.objective == "boot":
        from fewstep.distill import BOOT

        return BOOT(DIGITS_DEFAULTS["num_intervals"] if n is None else n, teacher_sampler=sampler)
    if args.objective == "mmd":
        from fewstep.distill import MMD

        return MMD(MMD_DEFAULTS["nfe"] if args.nfe is None else args.nfe, sampler="ddim" if args.tune_sampler is None else args.tune_sampler,
                   checkpointing=not args.no_checkpointing, sampler_options=MMD_DEFAULTS["sampler_options"])
    if args.objective == "ict":
        return ICT(**({"loss": args.loss} if args.loss is not None else {}), **assigned)
    if args.objective in ("scm", "rcm"):
        steps = DIGITS_DEFAULTS["steps"] if args.steps is None else args.steps
        cont: dict[str, Any] = {"tangent_warmup": min(10_000, steps // 3) if args.tangent_warmup is None else args.tangent_warmup}
        if args.jvp is not None:
            cont["jvp"] = args.jvp
        if args.objective == "scm":
            return SCM(**cont)
        if args.dmd_weight is not None:
            cont["dmd_weight"] = args.dmd_weight
        if args.student_update_freq is not None:
            cont["student_update_freq"] = args.student_update_freq
        return RCM(**cont)
    common.update(assigned)
    if args.objective == "lcd":
        lcd: dict[str, Any] = {"skip": 1 if args.skip is None else args.skip, "guidance_range": args.guidance_range}
        if args.lora:
            lcd.update(guidance_embedding=False, target_ema=0.0)
        return LCD(uncond=uncond or None, num_ddim_steps=50 if n is None else n, teacher_sampler=sampler, **lcd, **common)
    if args.objective == "mcd":
        return MCD(32 if n is None else n, segments=4 if args.segments is None else args.segments, teacher_sampler=sampler, **common)
    return CD(DIGITS_DEFAULTS["num_intervals"] if n is None else n, teacher_sampler=sampler, **common)


#: LoRA target modules of diffusers' train_lcm_distill_lora_sdxl.py (LCM-LoRA)
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TEXT_DATA = ("image_text", "tar")


def _data_kind(path: Path) -> str:
    """What ``--data`` holds: ``tensor`` (.pt/.npy), ``tar`` (webdataset shards), ``latents``
    (a --precompute folder), ``image_text`` (images with caption files) or ``images``."""
    from fewstep._util import IMAGE_EXTENSIONS
    from fewstep.distill.stream import CAPTION_EXTENSIONS

    if path.is_file():
        return "tar" if path.suffix == ".tar" else "tensor"
    if (path / "index.json").is_file():
        return "latents"
    if any(path.glob("*.tar")):
        return "tar"
    images = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if any(p.with_suffix(e).is_file() for p in images for e in CAPTION_EXTENSIONS):
        return "image_text"
    return "images"


def _text_pipeline(folder: Path) -> bool:
    """A text-to-image pipeline folder: VAE, tokenizer and text encoder next to the UNet."""
    return all((folder / sub).is_dir() for sub in ("vae", "tokenizer", "text_encoder"))


def _check_lcd_options(args: argparse.Namespace, kind: str | None) -> None:
    """The LCD / LoRA / image-text options: only where they apply, and consistent."""
    lcd_only = [k for k, v in (("--lora", args.lora or None), ("--guidance-range", args.guidance_range), ("--skip", args.skip))
                if v is not None]
    if lcd_only and args.objective != "lcd":
        raise UsageError(f"{', '.join(lcd_only)} {'applies' if len(lcd_only) == 1 else 'apply'} to --objective lcd only")
    if args.lora_rank is not None and not args.lora:
        raise UsageError(f"--lora-rank {args.lora_rank} needs --lora")
    if args.lora:
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise UsageError("--lora needs peft (pip install 'fewstep[lora]')")
        if args.target_ema:
            raise UsageError(f"--target-ema {args.target_ema} with --lora: LCM-LoRA's target is the student itself (stop-gradient); "
                             "leave --target-ema out")
        if args.student is not None:
            raise UsageError("--student with --lora: the LoRA student is the teacher's own UNet with adapters; leave --student out")
    if args.skip is not None:
        n = 50 if args.num_intervals is None else args.num_intervals
        if args.skip > n:
            raise UsageError(f"--skip {args.skip} exceeds the {n} DDIM steps of --num-intervals")
    if args.resolution is not None and kind not in TEXT_DATA and args.precompute is None:
        raise UsageError(f"--resolution {args.resolution} applies to image-caption --data (folders of name.png + name.txt, or .tar shards)")
    if args.precompute is not None:
        if kind not in TEXT_DATA:
            raise UsageError(f"--precompute {str(args.precompute)!r} encodes image-caption --data (name.png + name.txt, or .tar shards); "
                             f"--data {str(args.data)!r} holds none")
        if args.resume is not None:
            raise UsageError("--precompute writes latent shards and exits; it takes no --resume")
        check.output_dir(args.precompute, "--precompute")
        if args.precompute.is_dir() and any(args.precompute.iterdir()):
            raise UsageError(f"--precompute {str(args.precompute)!r} is not empty; give a new or empty folder")
    if args.log_with:
        from fewstep.distill.trainer import TRACKERS
        import importlib.util

        for t in args.log_with:
            if t not in TRACKERS:
                raise UsageError(f"--log-with {t!r}: choose from {', '.join(TRACKERS)} (metrics.csv is always written)")
            if importlib.util.find_spec(TRACKERS[t]) is None:
                raise UsageError(f"--log-with {t}: the {TRACKERS[t]} package is not installed (pip install {TRACKERS[t]})")
    if args.optimizer == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError("--optimizer adamw8bit: bitsandbytes is not installed (pip install bitsandbytes); use --optimizer adamw")


def _check_slct_options(args: argparse.Namespace) -> None:
    """``--slct-without`` only with sLCT and known names; ``--immiscible`` not with sLCT (its OT
    coupling is the same assignment); ``--loss`` not with ``--slct-without cauchy``."""
    without = args.slct_without or []
    if without and args.objective != "slct":
        raise UsageError(f"--slct-without applies to --objective slct only (got --objective {args.objective})")
    from fewstep.distill.slct import INGREDIENTS

    bad = [w for w in without if w not in INGREDIENTS]
    if bad:
        raise UsageError(f"--slct-without {bad[0]!r}: choose from {', '.join(INGREDIENTS)}")
    if args.objective == "slct" and args.immiscible is not None:
        raise UsageError("--immiscible with --objective slct: sLCT already assigns noise to data (its optimal-transport "
                         "coupling, squared-distance cost); leave --immiscible out, or --slct-without ot to turn it off")
    if "cauchy" in without and args.loss is not None:
        raise UsageError(f"--loss {args.loss} with --slct-without cauchy: give one of them")


def _check_boot_mmd_options(args: argparse.Namespace) -> None:
    """The options that BOOT and MMD finetuning take, and those they would ignore."""
    objective = args.objective
    mmd_only = [k for k, v in (("--nfe", args.nfe), ("--tune-sampler", args.tune_sampler),
                               ("--no-checkpointing", args.no_checkpointing or None)) if v is not None]
    if mmd_only and objective != "mmd":
        raise UsageError(f"{', '.join(mmd_only)} {'applies' if len(mmd_only) == 1 else 'apply'} to --objective mmd only")
    if objective in ("boot", "mmd"):
        given = [k for k, v in (("--loss", args.loss), ("--target-ema", args.target_ema), ("--segments", args.segments),
                                ("--immiscible", args.immiscible)) if v is not None]
        if objective == "mmd":
            given += [k for k, v in (("--num-intervals", args.num_intervals), ("--teacher-sampler", args.teacher_sampler),
                                     ("--student-prediction-type", args.student_prediction_type)) if v is not None]
        if given:
            why = ("BOOT regresses on the stop-gradient student itself (no EMA network) with an L2 loss, from noise alone "
                   "(no data to assign noise to)" if objective == "boot" else
                   "MMD finetuning samples with the model itself through --tune-sampler at --nfe and keeps its prediction type; "
                   "its noises are paired with no data")
            raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --objective {objective} ({why})")
    if objective == "mmd" and args.teacher is not None:
        raise UsageError("--objective mmd from the command line uses the digit features (8x8 grey images), i.e. the embedded "
                         "digits teacher; for your own model pass a differentiable feature extractor to fewstep.distill.MMD(features=...)")
    if args.tune_sampler is not None:
        from fewstep.distill.mmd import check_tunable

        try:
            check_tunable(args.tune_sampler, {})
        except (ValueError, TypeError) as err:
            raise UsageError(f"--tune-sampler {args.tune_sampler!r}: {err}") from None


def _check_distill(args: argparse.Namespace) -> None:
    """Every value of ``fewstep distill`` that can be checked without loading or computing anything."""
    objective = args.objective
    digits = args.teacher is None
    _check_boot_mmd_options(args)
    if digits:
        if args.data is not None and objective == "boot":
            raise UsageError("--objective boot is data-free (it learns from the teacher and noise only): leave --data out")
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
        if objective == "boot":
            if args.data is not None:
                raise UsageError("--objective boot is data-free (it learns from the teacher and noise only): leave --data out")
        elif args.data is None:
            raise UsageError("--teacher needs --data (the training images or latents: a .pt/.npy tensor (N, C, H, W) in "
                             "[-1, 1], a .pt dict, or a folder of images)")
    if not digits and objective == "boot":
        args._data_kind = "noise"
    elif not digits:
        what = "give a .pt/.pth/.npy tensor file, a folder of images, of image-caption pairs, of .tar shards or of latent shards"
        check.existing_path(args.data, "--data", what=what)
        kind = _data_kind(args.data)
        if kind == "tensor" and args.data.suffix not in (".pt", ".pth", ".npy"):
            raise UsageError(f"--data {str(args.data)!r}: {what}")
        if kind in ("images", "image_text"):
            check.image_folder(args.data, "--data", same_size=False)
        if kind in TEXT_DATA or args.validation_prompts:
            if not _text_pipeline(args.teacher):
                need = "image-caption --data" if kind in TEXT_DATA else "--validation-prompts"
                raise UsageError(f"{need} needs a text-to-image --teacher pipeline folder with vae/, tokenizer/ and text_encoder/ "
                                 f"(for the VAE and text encoders); {str(args.teacher)!r} has no {', '.join(x for x in ('vae', 'tokenizer', 'text_encoder') if not (args.teacher / x).is_dir())}")
        try:
            if kind == "image_text":
                from fewstep.distill.stream import ImageTextFolder

                ImageTextFolder(args.data)
            elif kind == "tar":
                from fewstep.distill.stream import TarShards

                TarShards(args.data)
            elif kind == "latents":
                from fewstep.distill.stream import LatentShards

                LatentShards(args.data)
        except ValueError as err:
            raise UsageError(f"--data {str(args.data)!r}: {err}") from None
        if objective == "lcd" and kind == "images":
            raise UsageError("--objective lcd needs conditioning with the data: image-caption pairs (name.png + name.txt), "
                             ".tar shards, latent shards, or a .pt dict with 'data' (or 'latents'), e.g. 'encoder_hidden_states', "
                             "and 'uncond'; an image folder without captions has none")
        args._data_kind = kind
    if digits and (args.validation_prompts or args.precompute is not None):
        raise UsageError("--validation-prompts and --precompute need a text-to-image --teacher pipeline folder and image-caption --data")
    _check_lcd_options(args, getattr(args, "_data_kind", None))
    if args.student is not None:
        check.existing_path(args.student, "--student", folder=True, what="give a diffusers model folder (model.save_pretrained(folder))")
        cfg = args.student / "config.json"
        if not cfg.is_file():
            raise UsageError(f"--student {str(args.student)!r} has no config.json; give a diffusers model folder (model.save_pretrained(folder))")
        _network_class(_read_json(cfg, "--student"), cfg, "--student")
    if objective in ("ict", "slct"):
        given = [k for k, v in (("--num-intervals", args.num_intervals), ("--teacher-sampler", args.teacher_sampler),
                                ("--target-ema", args.target_ema), ("--segments", args.segments)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --objective {objective} "
                             "(improved consistency training has its own noise curriculum, no teacher step and no EMA target)")
    _check_slct_options(args)
    continuous = [k for k, v in (("--tangent-warmup", args.tangent_warmup), ("--jvp", args.jvp)) if v is not None]
    if continuous and objective not in ("scm", "rcm"):
        raise UsageError(f"{', '.join(continuous)} {'applies' if len(continuous) == 1 else 'apply'} to --objective scm | rcm only")
    rcm_only = [k for k, v in (("--dmd-weight", args.dmd_weight), ("--student-update-freq", args.student_update_freq)) if v is not None]
    if rcm_only and objective != "rcm":
        raise UsageError(f"{', '.join(rcm_only)} {'applies' if len(rcm_only) == 1 else 'apply'} to --objective rcm only")
    if objective in ("scm", "rcm"):
        given = [k for k, v in (("--num-intervals", args.num_intervals), ("--teacher-sampler", args.teacher_sampler),
                                ("--target-ema", args.target_ema), ("--loss", args.loss), ("--lora", args.lora or None),
                                ("--immiscible", args.immiscible)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --objective {objective} "
                             "(continuous time: no grid, no teacher step, a stop-gradient target, sCM's own loss, a full student)")
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
    if args.steps is None and args.objective in ("scm", "rcm"):
        args.steps = DIGITS_DEFAULTS["continuous_steps"]
    _check_distill(args)
    args._on_interrupt = lambda: _distill_saved(args)
    from fewstep._util import atomic_write_json
    from fewstep.distill import Distiller, DistillConfig, TensorData
    from fewstep.distill.validate import QualityProbe
    from fewstep.eval.frechet import frechet_distance_from_features  # noqa: F401  (fail early if eval is broken)

    digits = args.teacher is None
    kind = "digits" if digits else args._data_kind
    objective = None if args.objective == "lcd" else _objective(args, {})  # its own checks, before anything is loaded
    on_cpu = args.cpu or digits or not torch.cuda.is_available()
    if args.threads is not None or on_cpu:
        torch.set_num_threads(1 if args.threads is None else args.threads)
    features = reference_features = None
    encoder = None
    if digits:
        from fewstep.eval.features import digits_features
        from fewstep.models.embedded import digits_denoiser, digits_images, digits_scheduler_config

        teacher = digits_denoiser()
        sched_cfg = digits_scheduler_config()
        source, uncond = TensorData(digits_images("train")), {}
        if args.objective == "boot":
            from fewstep.distill import NoiseData

            source = NoiseData((1, 8, 8))  # data-free: noise only
        if args.student_prediction_type is None and args.student is None and args.objective != "mmd":
            args.student_prediction_type = DIGITS_DEFAULTS["student_prediction_type"]
        features = digits_features()
        reference_features = features(digits_images("test"))
    else:
        net_cfg = _read_json(args.teacher / "unet" / "config.json", "--teacher")
        channels = int(net_cfg.get("in_channels", 3))
        if kind in TEXT_DATA or args.validation_prompts:
            from fewstep.distill.encode import PipelineEncoder

            encoder = PipelineEncoder.from_folder(args.teacher, resolution=args.resolution)
        if kind in TEXT_DATA:
            from fewstep.distill.stream import ImageTextData, ImageTextFolder, TarShards

            source = ImageTextData(ImageTextFolder(args.data) if kind == "image_text" else TarShards(args.data), encoder)
            if args.precompute is not None:
                from fewstep.distill.stream import precompute

                rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
                device = "cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                precompute(source, args.precompute, device=device, seed=args.seed, rank=rank, world=world)
                if rank == 0:
                    print(f"{source.num_examples} examples encoded into {args.precompute} (train on them with --data {args.precompute})")
                return 0
            uncond = None  # the encoder builds the recipe's unconditional inputs
        elif kind == "noise":  # BOOT: data-free, noise of the teacher network's input shape
            from fewstep.distill import NoiseData

            size = net_cfg.get("sample_size", 64)
            size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
            source, uncond = NoiseData((channels, *size)), {}
        elif kind == "latents":
            from fewstep.distill.stream import LatentShards

            source, uncond = LatentShards(args.data), None
        else:
            size = net_cfg.get("sample_size", 64)
            size = int(size if isinstance(size, int) else size[0])
            data, cond, uncond = _load_data(args.data, size, channels)  # the data first: a wrong file fails before the teacher loads
            if data.ndim < 2 or data.shape[0] < 1:
                raise UsageError(f"--data {str(args.data)!r} holds a tensor of shape {tuple(data.shape)}; expected (N, C, H, W)")
            if args.objective == "lcd" and not cond:
                raise UsageError(f"--objective lcd needs conditioning in --data {str(args.data)!r} (a .pt dict with "
                                 "encoder_hidden_states and uncond)")
            source = TensorData(data, cond)
        if len(source.shape) == 3 and source.shape[0] != channels:
            raise UsageError(f"--data {str(args.data)!r} holds {source.shape[0]}-channel data (shape {tuple(source.shape)}), but the "
                             f"teacher's network takes {channels} channels")
        if objective is None:
            objective = _objective(args, uncond or {})
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
    lora = None
    if args.lora:
        from peft import LoraConfig

        rank = 64 if args.lora_rank is None else args.lora_rank
        present = {n.rsplit(".", 1)[-1] for n, _ in teacher.model.named_modules()}
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=[t for t in LCM_LORA_TARGETS if t.rsplit(".", 1)[-1] in present])
    own = {"boot": BOOT_DEFAULTS, "mmd": MMD_DEFAULTS}.get(args.objective, {})
    steps = own.get("steps", DIGITS_DEFAULTS["steps"]) if args.steps is None else args.steps
    validate_every = args.validate_every if args.validate_every is not None else (DIGITS_DEFAULTS["validate_every"] if digits else 0)
    config = DistillConfig(
        output_dir=args.out,
        steps=steps,
        batch_size=DIGITS_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size,
        grad_accum=args.grad_accum,
        lr=own.get("lr", DIGITS_DEFAULTS["lr"]) if args.lr is None else args.lr,
        grad_clip=own.get("grad_clip", 1.0),
        sampling_ema=own.get("sampling_ema", 0.9999),
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
        tf32=args.tf32,
        optimizer=args.optimizer,
        log_with=tuple(args.log_with or ()),
        num_workers=args.num_workers,
    )
    config.check()
    default_probe = DIGITS_DEFAULTS["probe_samples"] if digits or kind not in (*TEXT_DATA, "latents") else 16
    n_probe = default_probe if args.probe_samples is None else args.probe_samples
    distiller = Distiller(
        objective,
        source,
        teacher,
        student,
        prediction_type=args.student_prediction_type,
        lora=lora,
        guidance_embedding_dim=256 if args.objective == "lcd" and not args.lora else None,
        scheduler_config=sched_cfg,
        config=config,
    )  # LCD's unconditional inputs come from the data's encoder here when --data carries text
    probe_teacher, probe_cond, student_cond, w = teacher, None, None, None
    if args.objective == "lcd":  # the quality probe of LCD: the guided teacher at the probe's guidance scale
        from fewstep.models import ClassifierFreeGuidance

        w = sum(objective.guidance_range) / 2
        probe_cond = _probe_conditioning(source, n_probe, args.seed)
        probe_teacher = ClassifierFreeGuidance(distiller.teacher, w, objective.uncond)
        student_cond = {**probe_cond, "guidance_scale": w} if objective.guidance_embedding else probe_cond
    shape = tuple(source.shape)
    g = torch.Generator().manual_seed(args.seed + 12345)
    noise = torch.randn((n_probe, *shape), generator=g)
    with torch.no_grad():
        ref = fewstep_sample(probe_teacher, noise, "dpmpp_3m", 50, probe_cond)
    probe = QualityProbe(noise, teacher.schedule, ref, features, reference_features, probe_cond, student_cond)
    k_small = min(256, n_probe)
    small = QualityProbe(noise[:k_small], teacher.schedule, ref[:k_small], features, reference_features,
                         _rows(probe_cond, k_small), _rows(student_cond, k_small))
    images = None
    if args.validation_prompts:
        from fewstep.distill.validate import ValidationImages

        images = ValidationImages(encoder, args.validation_prompts, args.out / "validation", objective.sampler,
                                  objective.sampler_options(), guidance_scale=w if objective.guidance_embedding else None, seed=args.seed)

    # BOOT generates in one evaluation; an MMD-tuned model is scored at its budget too
    nfes = (1,) if args.objective == "boot" else tuple(sorted({1, 2, 4, getattr(objective, "nfe", 1)}))

    def validator(student_model: Any, step: int) -> dict[str, float]:
        scores = small.flat(small.student(student_model, objective.sampler, nfes, objective.sampler_options()))
        if images is not None:
            scores.update(images(student_model, step))
        return scores

    distiller.validator = validator if (validate_every or images is not None) else None
    # The teacher is frozen: score it now, before training stores it in the autocast dtype.
    teacher_name = f"teacher (dpmpp_2m{f', w={w:g}' if w is not None else ''})"
    teacher_rows = [(teacher_name, k, s) for k, s in probe.teacher(probe_teacher, "dpmpp_2m", (10, 50)).items()]
    if args.objective == "mmd":  # the same model and sampler before finetuning, at equal NFE
        teacher_rows += [(f"teacher ({objective.sampler}, before finetuning)", k, s)
                         for k, s in probe.teacher(probe_teacher, objective.sampler, nfes, objective.sampler_options()).items()]
    result = distiller.train()
    if result.student_dir is None or int(os.environ.get("RANK", "0")) != 0:
        return 0
    from fewstep.distill.export import load_student

    loaded = load_student(result.student_dir, base=args.teacher / "unet" if args.lora else None)
    rows = [(f"student ({objective.name}, {loaded.sampler})", k, s) for k, s in probe.student(loaded.denoiser, loaded.sampler, nfes, loaded.sampler_options).items()]
    rows += teacher_rows
    _print_table(rows, digits)
    atomic_write_json(args.out / "quality.json", [{"model": m, "nfe": k, **s} for m, k, s in rows], indent=1)
    print(f"student saved to {result.student_dir} (load with fewstep.distill.load_student"
          f"{', base=the teacher UNet; or pipe.load_lora_weights(folder)' if args.lora else ''})")
    return 0


def _rows(cond: Any, n: int) -> Any:
    """The first ``n`` rows of every per-sample tensor of a conditioning structure."""
    from fewstep._util import tree_map

    if cond is None:
        return None
    return tree_map(lambda v: v[:n] if v.ndim >= 1 and v.shape[0] > 1 else v, cond)


def _probe_conditioning(source: Any, n: int, seed: int) -> dict[str, Any]:
    """``n`` rows of conditioning for the quality probe: the first examples of the data (their
    prompts), repeated as needed."""
    from fewstep._util import tree_map
    from fewstep.distill import sample_generators

    if getattr(source, "streaming", False):
        k = min(n, source.num_examples, 64)
        _, cond = source.prepare(source.read(range(k), seed), sample_generators(seed, 2**61, range(k)), "cpu")
    else:
        k = min(n, source.data.shape[0])
        cond = tree_map(lambda v: v[:k], source.cond)
    idx = torch.arange(n) % k
    return tree_map(lambda v: v.detach().cpu()[idx], cond)


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
