"""The ``fewstep`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fewstep.samplers.tuning import INGREDIENTS


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


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


def cmd_report(args: argparse.Namespace) -> int:
    from fewstep.eval.report import run_report

    try:
        paths = run_report(
            out_dir=args.out,
            samplers=args.samplers,
            nfes=args.nfe,
            num_samples=args.num_samples,
            seed=args.seed,
            progress=not args.quiet,
            command="fewstep " + " ".join(sys.argv[1:]) if sys.argv[1:] else "fewstep report",
            model=args.model,
            extractor=args.extractor,
            reference=args.reference,
            inception_path=args.inception_path,
            shape=args.shape,
            batch_size=args.batch_size,
            run_dir=args.run_dir,
            device=args.device,
            fid=not args.no_fid,
            exact=not args.no_exact,
        )
    except FileNotFoundError as err:  # missing weights (Inception, shipped files): the message says what to do
        print(f"fewstep report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _tune_model(spec: str, shape: Sequence[int] | None):
    """(denoiser, sample shape, noise dtype, description) for `fewstep tune --model`."""
    import torch

    if spec == "mixture":
        from fewstep.eval.exact import default_schedule
        from fewstep.models import GaussianMixture

        return GaussianMixture.digits().denoiser(default_schedule()), (64,), torch.float64, "the exact digits mixture"
    from fewstep.eval.model_spec import resolve_model

    resolved = resolve_model(spec, shape=shape)
    return resolved.denoiser, resolved.shape, torch.float32, resolved.description


def cmd_tune(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from fewstep.samplers.tuning import tune

    denoiser, shape, dtype, description = _tune_model(args.model, args.shape)
    stages = ["reference", "default", *(i for i in args.ingredients if i != "times")]  # times: one stage with coefficients
    bar = tqdm(total=len(stages), desc=f"tuning {args.sampler} at {args.nfe} NFE", disable=args.quiet,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} stages [{elapsed}<{remaining}{postfix}]")

    shown = [0.0]  # how much of the current stage the bar already shows

    def progress(msg: str, fraction: float) -> None:
        bar.set_postfix_str(msg[:60])
        bar.update(max(0.0, min(fraction, 1.0) - shown[0]))
        shown[0] = 0.0 if fraction >= 1.0 else max(shown[0], fraction)

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
    r.add_argument("--samplers", type=_name_list, default=None,
                   help="comma-separated names for both studies (default: a representative set for FID, all for the exact table)")
    r.add_argument("--nfe", type=_int_list, default=None,
                   help="comma-separated NFE budgets for both studies (default: 4,5,6,8,10,15,20,50)")
    r.add_argument("--num-samples", type=int, default=None, help="samples per (sampler, NFE) (default: 500 FID, 1000 exact)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--model", default="embedded",
                   help="'embedded' (default), a saved diffusers pipeline folder, or module:attribute naming a denoiser")
    r.add_argument("--shape", type=_int_list, default=None, help="sample shape C,H,W for a module:attribute model")
    r.add_argument("--extractor", default="digits",
                   help="features: digits (default), inception (clean-fid clean), inception-tf (legacy_tensorflow), or module:callable")
    r.add_argument("--inception-path", default=None,
                   help="local inception-2015-12-05.pt (or its folder); default $FEWSTEP_INCEPTION_PATH, then /tmp")
    r.add_argument("--reference", default=None,
                   help="reference statistics: a folder of real images, a .npz from fewstep, or digits[:train|:test] "
                        "(default for the embedded model: digits:test)")
    r.add_argument("--batch-size", type=int, default=250, help="samples per network batch (default: %(default)s)")
    r.add_argument("--run-dir", default=None, help="where generated features are kept for resuming (default: OUT/fid_run)")
    r.add_argument("--device", default=None, help="torch device for the network and features (default: cpu)")
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
    t.add_argument("--shape", type=_int_list, default=None, help="sample shape C,H,W for a module:attribute model")
    t.add_argument("--sampler", default="unipc_3", help="the base sampler (default: %(default)s)")
    t.add_argument("--nfe", type=int, default=5, help="network evaluations (default: %(default)s)")
    t.add_argument("--num-trajectories", type=int, default=None,
                   help="noises to fit on, half of them held out (default: tune()'s, 256)")
    t.add_argument("--ingredients", type=_name_list, default=list(INGREDIENTS),
                   help=f"stages, comma-separated (default: {','.join(INGREDIENTS)}; 'times' moves the evaluation times "
                        "together with the coefficients)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="plan.json", help="where to write the plan (default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)
    from fewstep.distill.cli import add_distill_parser

    add_distill_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as err:
        print(f"fewstep {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
