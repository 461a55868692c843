"""FID with bootstrap intervals, paired differences and training cost of `fewstep distill` students
on the embedded digits teacher, next to the teacher itself (issue 18's methods table).

    python benchmarks/distill_methods.py NAME=RUN_FOLDER [NAME=RUN_FOLDER ...] [--teacher]
        [--nfe 1,2,4] [--samples 1000] [--seed 0] [--replicates 200] [--json OUT.json]

Each RUN_FOLDER is a `fewstep distill --out` folder; every student kind that
:func:`fewstep.distill.load_student` returns is scored with what its folder records:

* consistency students (CD, MCD, iCT, sLCT, ...) with their sampler (``cm_multistep``, ``mcd``);
* BOOT's one-step generator (NFE 1 only: its one input is the noise);
* an MMD-finetuned diffusion model with the sampler and options it was tuned through.

``--teacher`` adds the teacher rows: ``dpmpp_2m`` at 10 and 50 NFE (the CLI's teacher rows) and
``ddim`` with ``clip_denoised=1`` at ``--nfe`` (the sampler MMD finetunes, before finetuning).

Every row samples from one noise, the quality probe's of a ``fewstep distill --seed SEED`` run
(``--samples`` standard normals from ``torch.Generator().manual_seed(seed + 12345)``), through
:func:`fewstep.distill.validate.sample_consistency`: a run trained with that ``--seed`` gets
exactly the FID of its own ``quality.json`` (printed as a check).  FID is on the digit features
against the digits test split; the interval is issue 14's 95 % bootstrap
(:mod:`fewstep.eval.uncertainty`: multinomial resamples of the sample indices, normal interval).
Because sample ``i`` of every row starts from the same noise, the same resamples apply to all rows
and the paired difference of each row to the best row of its NFE, with its interval, says whether
a ranking exceeds the noise of this sample count.  None of this covers the training seed: runs
with other seeds are separate rows, and their spread is the one to compare differences with.

Training cost, from the run folder: steps, global batch, the trainer's wall seconds (the last
``seconds`` of ``metrics.jsonl``; they include in-training validation if ``--validate-every`` was
set) and, where the launcher wrote ``/usr/bin/time -v`` output to ``RUN_FOLDER.log`` next to the
folder, CPU seconds (user + system), elapsed wall time and peak RSS of the whole process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fewstep of this checkout

TEACHER_NFES = (10, 50)


def run_cost(folder: Path) -> dict[str, Any]:
    """What a run folder (and the launcher's ``FOLDER.log`` next to it, if any) records of its cost."""
    meta = json.loads((folder / "student" / "fewstep_student.json").read_text())
    training = meta.get("training", {})
    cost: dict[str, Any] = {
        "objective": meta.get("objective"),
        "student_kind": meta.get("student_kind", "consistency"),
        "seed": training.get("seed"),
        "steps": training.get("steps"),
        "batch_size": training.get("batch_size"),
        "lr": training.get("lr"),
        "validate_every": training.get("validate_every"),
        "noise_assignment": meta.get("noise_assignment"),
        "nfe_tuned": meta.get("nfe"),
    }
    seconds = None
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "seconds" in rec:
                seconds = float(rec["seconds"])
    cost["trainer_seconds"] = seconds
    log = folder.parent / f"{folder.name}.log"
    if log.is_file():
        text = log.read_text(errors="replace")
        user = re.search(r"User time \(seconds\): ([\d.]+)", text)
        system = re.search(r"System time \(seconds\): ([\d.]+)", text)
        elapsed = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if user and system:
            cost["cpu_seconds"] = float(user.group(1)) + float(system.group(1))
        if elapsed:
            parts = [float(p) for p in elapsed.group(1).split(":")]
            cost["elapsed_seconds"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        if rss:
            cost["peak_rss_mb"] = int(rss.group(1)) / 1000
    return cost


def _minutes(s: float | None) -> str:
    return "-" if s is None else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="NAME=RUN_FOLDER (the --out of fewstep distill)")
    p.add_argument("--teacher", action="store_true", help="also score the teacher (dpmpp_2m at 10 and 50 NFE, ddim + clip at --nfe)")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="the probe noise of a `fewstep distill --seed SEED` run (seed + 12345)")
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--json", type=Path, help="write every estimate, interval, difference and cost here")
    args = p.parse_args(argv)
    if not args.runs and not args.teacher:
        p.error("give NAME=RUN_FOLDER arguments, --teacher, or both")
    torch.set_num_threads(1)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the float32-modules note of every load
    import fewstep
    from fewstep.distill import load_student
    from fewstep.distill.validate import sample_consistency
    from fewstep.eval.features import digits_features
    from fewstep.eval.frechet import frechet_distance, gaussian_stats
    from fewstep.eval.uncertainty import bootstrap_counts, compare, fd_replicates, interval
    from fewstep.models.embedded import digits_denoiser, digits_images

    extractor = digits_features()
    ref = extractor(digits_images("test")).double().numpy()
    mu, sigma = gaussian_stats(ref)
    noise = torch.randn((args.samples, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed + 12345))
    counts = bootstrap_counts(args.samples, args.replicates, seed=args.seed)
    est: dict[int, dict[str, float]] = {}
    reps: dict[int, dict[str, np.ndarray]] = {}
    order: list[str] = []

    def score(name: str, nfe: int, x: torch.Tensor) -> float:
        x = x.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(x).all()):
            fd, r = math.inf, np.full(args.replicates, math.nan)
        else:
            f = extractor(x.float()).double().numpy()
            m, s = gaussian_stats(f)
            fd, r = float(frechet_distance(m, s, mu, sigma)), fd_replicates(f, counts, mu=mu, sigma=sigma)[0]
        est.setdefault(nfe, {})[name] = fd
        reps.setdefault(nfe, {})[name] = r
        if name not in order:
            order.append(name)
        return fd

    if args.teacher:
        teacher = digits_denoiser()
        with torch.no_grad():
            for k in TEACHER_NFES:
                score("teacher, dpmpp_2m", k, fewstep.sample(teacher, noise, "dpmpp_2m", k, schedule=teacher.schedule))
            for k in args.nfe:
                score("teacher, ddim + clip (before MMD)", k,
                      fewstep.sample(teacher, noise, "ddim", k, schedule=teacher.schedule, clip_denoised=1.0))
    costs: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[int, str]] = {}
    runs = dict(r.split("=", 1) for r in args.runs)
    for name, folder in runs.items():
        folder = Path(folder)
        st = load_student(folder / "student")
        costs[name] = run_cost(folder)
        own = {}
        if (folder / "quality.json").is_file():
            own = {row["nfe"]: row.get("fd") for row in json.loads((folder / "quality.json").read_text())
                   if str(row["model"]).startswith("student")}
        nfes = (1,) if costs[name]["student_kind"] == "boot" else args.nfe
        for k in nfes:
            x = sample_consistency(st.denoiser, noise, st.sampler, k, st.denoiser.schedule, st.sampler_options)
            fd = score(name, k, x)
            if costs[name]["seed"] == args.seed and own.get(k) is not None:
                checks.setdefault(name, {})[k] = "equal" if abs(fd - own[k]) < 1e-9 else f"differs ({own[k]:.6f})"
        print(f"scored {name}: {folder} ({st.meta['objective']}, {st.sampler})", file=sys.stderr, flush=True)

    cmps = {k: compare(est[k], reps[k]) for k in est}
    cols = [k for k in args.nfe if k in est] + [k for k in TEACHER_NFES if k in est and k not in args.nfe]
    print(f"FID (digit features, {args.samples} samples of seed-{args.seed} probe noise, 95 % bootstrap interval, "
          f"{args.replicates} resamples); in brackets: paired difference to the best row of the NFE [95 %], * where significant\n")
    print("| model | " + " | ".join(f"NFE {k}" for k in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in order:
        cells = []
        for k in cols:
            if name not in est.get(k, {}):
                cells.append("")
                continue
            iv = interval(est[k][name], reps[k][name])
            if not math.isfinite(iv.estimate):
                cells.append("non-finite samples")
                continue
            cmp = cmps[k]
            if cmp is None or name == cmp.best or len(est[k]) == 1:
                diff = "best" if cmp is not None and len(est[k]) > 1 else ""
            else:
                d = cmp.differences[name]
                diff = f"{d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]{' *' if d.significant else ''}"
            cells.append(f"{iv.estimate:.3f} [{iv.lo:.3f}, {iv.hi:.3f}]" + (f" ({diff})" if diff else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")
    if costs:
        print("\n| model | objective (kind) | seed | steps x batch | trainer wall | process wall | CPU | peak RSS | quality.json |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for name, c in costs.items():
            kind = c["objective"] + ("" if c["student_kind"] == "consistency" else f" ({c['student_kind']})")
            if c["noise_assignment"] and c["objective"] != "slct":
                kind += ", immiscible"
            if c["nfe_tuned"]:
                kind += f", tuned for NFE {c['nfe_tuned']}"
            chk = checks.get(name)
            chk_s = ("; ".join(f"{k}: {v}" for k, v in chk.items()) if chk else f"(other probe noise: seed {c['seed']})")
            cpu = c.get("cpu_seconds")
            rss = c.get("peak_rss_mb")
            print(f"| {name} | {kind} | {c['seed']} | {c['steps']} x {c['batch_size']} | {_minutes(c['trainer_seconds'])} | "
                  f"{_minutes(c.get('elapsed_seconds'))} | {'-' if cpu is None else f'{cpu:.0f} s'} | "
                  f"{'-' if rss is None else f'{rss / 1000:.2f} GB'} | {chk_s} |")
    versions = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    print("\n" + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.json is not None:
        out = {
            "argv": sys.argv[1:] if argv is None else list(argv),
            "versions": versions,
            "samples": args.samples, "seed": args.seed, "replicates": args.replicates,
            "fid": {str(k): {n: {"estimate": est[k][n], **{f: getattr(interval(est[k][n], reps[k][n]), f) for f in ("se", "lo", "hi")},
                                 **({"diff": vars(cmps[k].differences[n])} if cmps[k] is not None and n in cmps[k].differences else {})}
                             for n in est[k]} for k in est},
            "best": {str(k): (None if c is None else {"name": c.best, "significant": c.significant}) for k, c in cmps.items()},
            "cost": costs,
            "quality_json_check": {n: {str(k): v for k, v in c.items()} for n, c in checks.items()},
        }
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
