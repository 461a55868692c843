"""The ``fewstep`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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

    paths = run_report(
        out_dir=args.out,
        samplers=args.samplers,
        nfes=args.nfe,
        num_samples=args.num_samples,
        seed=args.seed,
        progress=not args.quiet,
        command="fewstep " + " ".join(sys.argv[1:]) if sys.argv[1:] else "fewstep report",
    )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fewstep", description="Few-step sampling for diffusion and consistency models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("samplers", help="list the registered samplers")
    s.add_argument("-v", "--verbose", action="store_true", help="papers and options too")
    s.set_defaults(func=cmd_samplers)
    r = sub.add_parser("report", help="error per NFE of every sampler on the exact digits mixture")
    r.add_argument("--out", default="fewstep-report", help="output folder (default: %(default)s)")
    r.add_argument("--samplers", type=_name_list, default=None, help="comma-separated names (default: all)")
    r.add_argument("--nfe", type=_int_list, default=[4, 5, 6, 8, 10, 15, 20, 50], help="comma-separated NFE budgets")
    r.add_argument("--num-samples", type=int, default=1000, help="samples per (sampler, NFE) (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_report)
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
