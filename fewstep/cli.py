"""The ``fewstep`` command line."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fewstep import _cli_checks as check
from fewstep._cli_checks import UsageError
from fewstep.samplers.tuning import INGREDIENTS


def cmd_samplers(args: argparse.Namespace) -> int:
    import fewstep

    names = fewstep.available()
    if args.verbose:
        for n in names:
            s = fewstep.spec(n).describe()
            print(f"{n}\n  {s['summary']}\n  paper: {s['paper']}\n  options: {s['options'] or '-'}\n")
        return 0
    rows = [("name", "family", "order", "evals/step", "stochastic", "kind", "min NFE", "diffusers loop")]
    for n in names:
        s = fewstep.spec(n)
        rows.append(
            (n, s.family, str(s.order), str(s.evals_per_step), "yes" if s.stochastic else "no", s.model_kind, str(s.min_nfe), "yes" if s.push_style else "no")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(names)} samplers; `fewstep samplers -v` shows papers and options.")
    return 0


# ---------------------------------------------------------------------------------------------
# fewstep report
# ---------------------------------------------------------------------------------------------

_MODEL_HELP = "use 'embedded', a folder holding a saved diffusers pipeline, or module:attribute naming a denoiser"
_DIGITS_SOURCES = ("digits", "digits:all", "digits:train", "digits:test")  # what fewstep.eval.reference reads
_INCEPTION = ("inception", "inception-clean", "inception-tf", "inception-legacy-tensorflow", "inception-legacy_tensorflow")
_WEIGHTS_FOLDER = ("dinov2", "clip")  # extractors whose weights are a local transformers folder


def _check_samplers(names: Sequence[str] | None, arg: str = "--samplers") -> None:
    import fewstep

    for n in names or ():
        try:
            fewstep.spec(n)
        except ValueError as err:
            raise UsageError(f"{arg} {n!r}: {err}") from None


def _check_pipeline_folder(spec: str, arg: str) -> None:
    from fewstep.eval.model_spec import _refuse_latent_pipeline

    try:
        _refuse_latent_pipeline(Path(spec).expanduser())
    except ValueError as err:
        raise UsageError(f"{arg} {spec!r}: {err}") from None


def _check_reference(source: str, extractor_given: bool, digits_features: bool = False) -> None:
    """``--reference``: a digits split, a ``.npz`` of statistics (fewstep's, or a clean-fid / EDM
    ``{mu, sigma}`` file with ``--extractor`` given), a folder or ``.zip`` of readable images."""
    import zipfile

    text = str(source).strip()
    what = "use a folder or .zip of real images, a statistics .npz (fewstep's, or clean-fid's / EDM's with --extractor), or digits[:train|:test]"
    if text.lower() in _DIGITS_SOURCES:
        return
    if text.lower().startswith("digits:"):
        raise UsageError(f"--reference {source!r}: unknown digits split; use digits, digits:train or digits:test")
    path = Path(text).expanduser()
    if text.endswith(".npz"):
        check.existing_path(path, "--reference", folder=False, what=what)
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
        except (OSError, zipfile.BadZipFile) as err:
            raise UsageError(f"--reference {source!r} is not a readable .npz statistics file ({err}); "
                             "recompute it, or point --reference at the images") from None
        if {"mu.npy", "sigma.npy"} <= names and "extractor.npy" not in names:
            if not extractor_given:
                raise UsageError(f"--reference {source!r} holds only mu and sigma (clean-fid / EDM / torch-fidelity statistics), "
                                 "which do not say which network made them; name it with --extractor (inception-tf for "
                                 "EDM's and most papers' statistics, inception for clean-fid's clean mode)")
            return
        need = {"mu.npy", "sigma.npy", "num_samples.npy", "extractor.npy", "source.npy"}
        missing = need - names
        if missing:
            raise UsageError(f"--reference {source!r} is not a reference-statistics file (no {', '.join(sorted(missing))}); "
                             "recompute it, or point --reference at the images")
        return
    if text.lower().endswith(".zip"):
        check.existing_path(path, "--reference", folder=False, what=what)
        if check.image_zip(path, "--reference") < 2:
            raise UsageError(f"--reference {source!r} holds a single image; reference statistics need at least 2")
        return
    if path.is_dir():
        fixed = {"shape": (1, 8, 8), "shape_reason": "the digits extractor (the default --extractor)"} if digits_features else {}
        if check.image_folder(path, "--reference", same_size=False, **fixed) < 2:
            raise UsageError(f"--reference {source!r} holds a single image; reference statistics need at least 2")
        return
    if path.exists():
        raise UsageError(f"--reference {source!r} is a file, not a folder or .zip of images or a .npz statistics file; {what}")
    raise UsageError(f"--reference {source!r}: no such folder or file; {what}")


def _check_report(args: argparse.Namespace) -> None:
    """Every value of ``fewstep report`` that can be checked without loading or computing anything."""
    if args.no_fid and args.no_exact:
        raise UsageError("--no-fid and --no-exact switch off both studies; drop one of them")
    fid_only = {"--model": args.model, "--shape": args.shape, "--extractor": args.extractor, "--reference": args.reference,
                "--inception-path": args.inception_path, "--batch-size": args.batch_size, "--run-dir": args.run_dir,
                "--device": args.device, "--ode-reference": args.ode_reference, "--metrics": args.metrics,
                "--retry-errors": args.retry_errors or None, "--no-ode": args.no_ode or None,
                "--weights-path": args.weights_path}
    if args.no_ode and args.ode_reference is not None:
        raise UsageError("--no-ode and --ode-reference contradict each other; drop one of them")
    if args.bootstrap == 1:
        raise UsageError("--bootstrap 1: intervals need at least 2 resamples (200 is the default); use 0 for none")
    if args.no_fid:
        given = [k for k, v in fid_only.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to the FID study, which --no-fid "
                             f"switches off; drop {'it' if len(given) == 1 else 'them'} or --no-fid")
    _check_samplers(args.samplers)
    check.output_dir(args.out, "--out")
    if args.no_fid:
        return
    if args.run_dir is not None:
        check.output_dir(args.run_dir, "--run-dir")
    model = "embedded" if args.model is None else args.model
    kind = check.model_spec(model, "--model", ("embedded",), _MODEL_HELP)
    if kind == "folder":
        _check_pipeline_folder(model, "--model")
    if args.shape is not None and kind == "name":
        raise UsageError(f"--shape {','.join(map(str, args.shape))}: the embedded model's samples are 1x8x8; --shape goes with "
                         "a pipeline folder or a module:attribute model")
    if args.reference is None and kind != "name":
        raise UsageError(f"--model {model!r} needs --reference: a folder of real images, a .npz written by fewstep, or "
                         "digits[:train|:test]")
    extractor = "digits" if args.extractor is None else args.extractor
    key = extractor.strip().lower()
    if args.inception_path is not None and key not in _INCEPTION:
        raise UsageError(f"--inception-path goes with --extractor inception or inception-tf, not {extractor!r}")
    if args.weights_path is not None and key not in _WEIGHTS_FOLDER:
        raise UsageError(f"--weights-path goes with --extractor dinov2 or clip, not {extractor!r}")
    if key in _INCEPTION or key in _WEIGHTS_FOLDER:
        from fewstep.eval.features import find_inception, find_weights_folder

        try:
            find_inception(args.inception_path) if key in _INCEPTION else find_weights_folder(key, args.weights_path)
        except FileNotFoundError as err:
            raise UsageError(f"--extractor {extractor}: {err}") from None
    elif ":" in extractor:
        check.module_spec(extractor, "--extractor")
    elif key != "digits":
        from fewstep._util import close_matches
        from fewstep.eval.features import EXTRACTOR_NAMES

        raise UsageError(f"--extractor {extractor!r}: unknown feature extractor{close_matches(key, EXTRACTOR_NAMES)}; use one of "
                         f"{', '.join(EXTRACTOR_NAMES)}, or module:callable for your own")
    if args.reference is not None:
        _check_reference(args.reference, args.extractor is not None, key == "digits")
    from fewstep.eval.extra_metrics import EXTRA_METRICS

    for m in args.metrics or ():
        if m not in EXTRA_METRICS:
            from fewstep._util import close_matches

            raise UsageError(f"--metrics {m!r}: unknown metric{close_matches(m, EXTRA_METRICS)}; choose from {', '.join(EXTRA_METRICS)}")
    if args.ode_reference is not None:
        _check_samplers([args.ode_reference[0]], "--ode-reference")
        import fewstep

        if fewstep.spec(args.ode_reference[0]).stochastic:
            raise UsageError(f"--ode-reference {args.ode_reference[0]}:{args.ode_reference[1]}: the exact-ODE reference needs a "
                             "deterministic sampler (e.g. dpmpp_3m:100)")
    args.device = check.device(args.device)
    if args.reference is None or not str(args.reference).strip().endswith(".npz"):
        from fewstep.eval.reference import default_cache_dir

        try:
            check.output_dir(default_cache_dir(), "the reference-statistics cache")
        except UsageError as err:
            raise UsageError(f"{err}, or set FEWSTEP_CACHE to a writable folder") from None


def _written_since(folder: Path, since: float) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.stat().st_mtime >= since)
    except OSError:
        return []


def _report_saved(out: Path, run_dir: Path | None, started: float) -> str:
    """What an interrupted report leaves behind, for the message."""
    parts = []
    try:
        chunks = len(list(run_dir.glob("cells/*/chunk_*.npz"))) if run_dir is not None and run_dir.is_dir() else 0
    except OSError:
        chunks = 0
    if chunks:
        parts.append(f"{chunks} finished batch{'es' if chunks != 1 else ''} of generated samples are kept in {run_dir}; "
                     "run the same command again to resume from them")
    written = _written_since(out, started) if out.is_dir() else []
    if written:
        parts.append(f"written to {out} so far: {', '.join(written)}")
    return "; ".join(parts) or "nothing was saved"


def cmd_report(args: argparse.Namespace) -> int:
    _check_report(args)
    from fewstep.eval.ode_reference import REPORT_ODE
    from fewstep.eval.report import run_report

    out = Path(args.out)
    run_dir = None if args.no_fid else Path(args.run_dir) if args.run_dir is not None else out / "fid_run"
    started = time.time() - 1.0
    args._on_interrupt = lambda: _report_saved(out, run_dir, started)
    paths = run_report(
        out_dir=args.out,
        samplers=args.samplers,
        nfes=args.nfe,
        num_samples=args.num_samples,
        seed=args.seed,
        progress=not args.quiet,
        command="fewstep " + " ".join(sys.argv[1:]) if sys.argv[1:] else "fewstep report",
        model="embedded" if args.model is None else args.model,
        extractor="digits" if args.extractor is None else args.extractor,
        reference=args.reference,
        inception_path=args.inception_path,
        shape=args.shape,
        batch_size=250 if args.batch_size is None else args.batch_size,
        run_dir=args.run_dir,
        device=args.device,
        fid=not args.no_fid,
        exact=not args.no_exact,
        ode_reference=None if args.no_ode else (args.ode_reference or REPORT_ODE),
        bootstrap=args.bootstrap,
        retry_errors=args.retry_errors,
        extra_metrics=tuple(args.metrics or ()),
        foreign_reference=args.extractor is not None,
        weights_path=args.weights_path,
    )
    failed = paths.pop("failed", [])
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if failed:
        print(f"fewstep report: error: every cell of the {' and the '.join(failed)} study failed; {paths['md']} lists why",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# fewstep tune
# ---------------------------------------------------------------------------------------------


def _tune_model(spec: str, shape: Sequence[int] | None):
    """(denoiser, sample shape, noise dtype, description) for `fewstep tune --model`."""
    import torch

    if spec.strip().lower() == "mixture":
        from fewstep.eval.exact import default_schedule
        from fewstep.models import GaussianMixture

        return GaussianMixture.digits().denoiser(default_schedule()), (64,), torch.float64, "the exact digits mixture"
    from fewstep.eval.model_spec import resolve_model

    resolved = resolve_model(spec, shape=shape)
    return resolved.denoiser, resolved.shape, torch.float32, resolved.description


def _check_tune(args: argparse.Namespace) -> None:
    """Every value of ``fewstep tune`` that can be checked without loading or computing anything."""
    from fewstep.samplers.registry import spec as sampler_spec

    kind = check.model_spec(args.model, "--model", ("embedded", "mixture"),
                            "use 'embedded', 'mixture', a folder holding a saved diffusers pipeline, or module:attribute naming a denoiser")
    if kind == "folder":
        _check_pipeline_folder(args.model, "--model")
    if args.shape is not None and kind == "name":
        raise UsageError(f"--shape {','.join(map(str, args.shape))}: --model {args.model} has a fixed sample shape; --shape goes "
                         "with a pipeline folder or a module:attribute model")
    try:
        s = sampler_spec(args.sampler)
    except ValueError as err:
        raise UsageError(f"--sampler {args.sampler!r}: {err}") from None
    if s.stochastic or not s.push_style or s.needs or s.model_kind != "diffusion":
        raise UsageError(f"--sampler {args.sampler!r} cannot be tuned: tuning needs a deterministic diffusion sampler with fixed "
                         "evaluation times (e.g. unipc_3, dpmpp_3m, deis_3, dpmpp_2m)")
    if args.nfe < s.min_nfe:
        raise UsageError(f"--nfe {args.nfe}: {args.sampler} needs at least {s.min_nfe} network evaluations")
    unknown = [i for i in args.ingredients if i not in INGREDIENTS]
    if unknown:
        from fewstep._util import close_matches

        raise UsageError(f"--ingredients {','.join(args.ingredients)}: unknown {unknown[0]!r}{close_matches(unknown[0], INGREDIENTS)}; "
                         f"choose from {','.join(INGREDIENTS)}")
    if "times" in args.ingredients and "coefficients" not in args.ingredients:
        raise UsageError(f"--ingredients {','.join(args.ingredients)}: 'times' moves the evaluation times together with the "
                         "coefficient table; add 'coefficients' (or use 'grid' to tune the grid alone)")
    check.output_file(args.out, "--out")


def cmd_tune(args: argparse.Namespace) -> int:
    _check_tune(args)
    import torch
    from tqdm.auto import tqdm

    from fewstep.samplers.tuning import tune

    args._on_interrupt = lambda: f"nothing was written (the plan goes to {args.out} only when tuning ends)"
    denoiser, shape, dtype, description = _tune_model(args.model, args.shape)
    stages = ["reference", "default", *(i for i in args.ingredients if i != "times")]  # times: one stage with coefficients
    bar = tqdm(total=len(stages), desc=f"tuning {args.sampler} at {args.nfe} NFE", disable=args.quiet,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} stages [{elapsed}<{remaining}{postfix}]")

    shown = [0.0]  # how much of the current stage the bar already shows

    def progress(msg: str, fraction: float) -> None:
        bar.set_postfix_str(msg[:60])
        bar.update(max(0.0, min(fraction, 1.0) - shown[0]))
        shown[0] = 0.0 if fraction >= 1.0 else max(shown[0], fraction)

    try:
        plan = tune(
            denoiser,
            sampler=args.sampler,
            nfe=args.nfe,
            generator=torch.Generator().manual_seed(args.seed),
            shape=shape,
            dtype=dtype,
            ingredients=args.ingredients,
            progress=progress,
            **({"num_trajectories": args.num_trajectories} if args.num_trajectories is not None else {}),
        )
    finally:
        bar.close()
    plan.meta["model"] = description
    path = plan.save(args.out)
    print(f"{plan!r} for {description}, written to {path}")
    print(f"{'stage':18s} {'train RMSE':>11s} {'val RMSE':>9s}  kept")
    for st in plan.meta["stages"]:
        print(f"{st['stage']:18s} {st['train_rmse']:11.4g} {st['val_rmse']:9.4g}  {'yes' if st['accepted'] else 'no'}")
    print(f"{plan.meta['seconds']:.0f} s, {plan.meta['network_evaluations']} single-sample network evaluations; "
          f"use it with fewstep.sample(denoiser, noise, plan=SamplingPlan.load({str(path)!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Few-step sampling for diffusion and consistency models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("samplers", help="list the registered samplers")
    s.add_argument("-v", "--verbose", action="store_true", help="papers and options too")
    s.set_defaults(func=cmd_samplers)
    r = sub.add_parser(
        "report",
        help="FID per NFE on a neural model (default: the embedded digits UNet) and the exact-mixture error table",
        description="With no arguments: FID (digit features) per NFE of the default samplers on the embedded digits "
        "UNet, and every sampler's error per NFE on the exact digits mixture; CSV, JSON, Markdown, plots and sample grids.",
    )
    r.add_argument("--out", default="fewstep-report", help="output folder (default: %(default)s)")
    r.add_argument("--samplers", type=check.name_list, default=None,
                   help="comma-separated names for both studies (default: a representative set for FID, all for the exact table)")
    r.add_argument("--nfe", type=check.nfe_list, default=None,
                   help="comma-separated NFE budgets for both studies (default: 4,5,6,8,10,15,20,50)")
    r.add_argument("--num-samples", type=check.int_at_least(2), default=None,
                   help="samples per (sampler, NFE), at least 2 (default: 500 FID, 1000 exact)")
    r.add_argument("--seed", type=check.seed, default=0, help="noise seed, 0 to 2**63-1 (default: %(default)s)")
    r.add_argument("--model", default=None,
                   help="'embedded' (default), a saved diffusers pipeline folder, or module:attribute naming a denoiser")
    r.add_argument("--shape", type=check.shape_list, default=None, help="sample shape C,H,W for a module:attribute model")
    r.add_argument("--extractor", default=None,
                   help="features: digits (default), inception (clean-fid clean), inception-tf (legacy_tensorflow), dinov2 "
                        "(DINOv2 ViT-L/14, dgm-eval's preprocessing), clip (CLIP image embeddings, for --metrics cmmd), or "
                        "module:callable")
    r.add_argument("--inception-path", default=None,
                   help="local inception-2015-12-05.pt (or its folder); default $FEWSTEP_INCEPTION_PATH, then /tmp")
    r.add_argument("--weights-path", default=None,
                   help="local folder of the dinov2 / clip weights (transformers format); default $FEWSTEP_DINOV2_PATH / "
                        "$FEWSTEP_CLIP_PATH")
    r.add_argument("--reference", default=None,
                   help="reference: a folder or .zip of real images (any sizes), a statistics .npz (fewstep's, or clean-fid's / "
                        "EDM's {mu, sigma} with --extractor naming the network that made it), or digits[:train|:test] "
                        "(default for the embedded model: digits:test)")
    r.add_argument("--ode-reference", type=check.sampler_budget, default=None,
                   help="SAMPLER:NFE of the model's exact-ODE samples behind the headline FD (default: dpmpp_3m:100)")
    r.add_argument("--no-ode", action="store_true", help="no exact-ODE reference (FID and KID to the reference only)")
    r.add_argument("--bootstrap", type=check.nonnegative_int, default=None,
                   help="bootstrap resamples behind every interval, 0 for none (default: 200 for the FID study, 100 for "
                        "the exact study)")
    r.add_argument("--metrics", type=check.name_list, default=None,
                   help="extra metrics, comma-separated: precision_recall, inception_score, cmmd")
    r.add_argument("--retry-errors", action="store_true", help="run the cells that recorded an error again (same run folder)")
    r.add_argument("--batch-size", type=check.positive_int, default=None, help="samples per network batch (default: 250)")
    r.add_argument("--run-dir", default=None, help="where generated features are kept for resuming (default: OUT/fid_run)")
    r.add_argument("--device", default=None, help="torch device for the network and features: cpu, cuda, cuda:N, mps (default: cpu)")
    r.add_argument("--no-fid", action="store_true", help="skip the FID study")
    r.add_argument("--no-exact", action="store_true", help="skip the exact-mixture study")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_report)
    t = sub.add_parser(
        "tune",
        help="tune a sampling plan (grid, per-step orders, coefficients and evaluation times) for one model and NFE budget",
        description="Fits a sampling plan to the model's own many-step trajectories and writes it as JSON.",
    )
    t.add_argument("--model", default="embedded",
                   help="'embedded' (default: the digits UNet), 'mixture' (the exact digits mixture), a saved diffusers "
                        "pipeline folder, or module:attribute naming a denoiser")
    t.add_argument("--shape", type=check.shape_list, default=None, help="sample shape C,H,W for a module:attribute model")
    t.add_argument("--sampler", default="unipc_3", help="the base sampler (default: %(default)s)")
    t.add_argument("--nfe", type=check.positive_int, default=5, help="network evaluations (default: %(default)s)")
    t.add_argument("--num-trajectories", type=check.int_at_least(8), default=None,
                   help="noises to fit on, at least 8, half of them held out (default: tune()'s, 256)")
    t.add_argument("--ingredients", type=check.name_list, default=list(INGREDIENTS),
                   help=f"stages, comma-separated (default: {','.join(INGREDIENTS)}; 'times' moves the evaluation times "
                        "together with the coefficients)")
    t.add_argument("--seed", type=check.seed, default=0, help="noise seed, 0 to 2**63-1 (default: %(default)s)")
    t.add_argument("--out", default="plan.json", help="where to write the plan (default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)
    from fewstep.distill.cli import add_distill_parser

    add_distill_parser(sub)
    return p


def _user_modules(args: argparse.Namespace) -> list[str]:
    """The modules of ``module:attribute`` values on the command line (the user's own code)."""
    out = []
    for name in ("model", "extractor"):
        v = getattr(args, name, None)
        if isinstance(v, str) and ":" in v and not Path(v).exists():
            out.append(v.strip().partition(":")[0])
    return out


def _keep_traceback(err: BaseException, args: argparse.Namespace) -> bool:
    return bool(os.environ.get("FEWSTEP_TRACEBACK")) or check.raised_in_user_code(err, _user_modules(args))


def _os_error_text(err: OSError) -> str:
    if err.errno is None or not err.strerror:  # fewstep's own FileNotFoundError messages say what to do
        return str(err)
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    hint = {errno.ENOSPC: "free some disk space or write elsewhere", errno.EDQUOT: "free some disk space or write elsewhere",
            errno.EACCES: "check the permissions or write elsewhere", errno.EPERM: "check the permissions or write elsewhere",
            errno.EROFS: "write elsewhere"}.get(err.errno, "")
    return f"{err.strerror}{f': {where}' if where else ''}{f' ({hint})' if hint else ''}"


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 2


def _quiet_stdout() -> None:
    """After a broken pipe (``fewstep samplers | head``), send what is left of stdout nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fewstep ARGV``; returns the exit status.

    A mistake in the arguments is one line ``fewstep CMD: error: ...`` and status 2, before any
    model is loaded or work started; an ``OSError`` while working (disk full, no permission) one
    line naming the path, status 1; Ctrl-C says what was saved and where, status 130.  An exception
    raised inside the user's own code (a ``--model module:attribute`` denoiser, a
    ``--extractor module:callable``) keeps its traceback, as does everything that is not a
    ``ValueError``, ``TypeError`` or ``OSError``; ``FEWSTEP_TRACEBACK=1`` keeps those tracebacks
    too (all but the argument checks' own messages)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's own error (status 2) or --help (0)
        return _exit_code(exit_.code)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"fewstep {args.command}"

    def fail(message: str, code: int) -> int:
        sys.stdout.flush()
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        return fail(str(err), 2)
    except KeyboardInterrupt:
        note: Callable[[], str] | None = getattr(args, "_on_interrupt", None)
        try:
            saved = note() if note is not None else "nothing was saved"
        except Exception:  # noqa: BLE001 - describing what was saved must not raise over the interrupt
            saved = "what was saved could not be listed"
        sys.stdout.flush()
        print(f"\n{prog}: interrupted; {saved}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except OSError as err:
        if _keep_traceback(err, args):
            raise
        return fail(_os_error_text(err), 2 if err.errno is None else 1)
    except (ValueError, TypeError) as err:
        if _keep_traceback(err, args):
            raise
        return fail(str(err), 2)


if __name__ == "__main__":
    sys.exit(main())
