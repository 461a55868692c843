"""Regenerate the `fewstep report` tables of benchmarks/RESULTS.md, and the seed study behind the
report's defaults, in one command.

1. ``fewstep report`` with no arguments (seed 0): the FID-per-NFE study on the embedded digits
   UNet and the exact-mixture study, exactly what the README's first command runs;
2. the same FID study with seeds 1-4 (``--seeds``): for every metric (FD to the exact-ODE
   samples, FID, KID) and NFE, which sampler each seed calls significantly lowest, whether any
   seed contradicts another (a sampler bold at one seed and significantly worse than the lowest at
   another), and how the spread of each cell over the seeds compares with its bootstrap standard
   error.

The tables go between the ``<!-- report-tables:begin -->`` and ``<!-- report-tables:end -->``
markers of RESULTS.md (``--results``), with the date, device, load, torch and diffusers versions
and the wall and CPU time of step 1.  Run folders are kept under ``--work`` (default a temporary
folder), so a rerun resumes.

Usage:  python benchmarks/report_tables.py [--seeds 0,1,2,3,4] [--work DIR] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- report-tables:begin -->", "<!-- report-tables:end -->"
METRICS = (("fd_ode", "FD to the exact-ODE samples"), ("fid", "FID to the digits test split"), ("kid", "KID"))


def run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return its wall and CPU (user + system of the child) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def section(md: str, title: str) -> str:
    """The text of a ``## title...`` section of a report (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(title)}.*?(?=^## |\Z)", md, flags=re.S | re.M)
    return m.group(0).strip() if m else ""


def seed_study(rows_by_seed: dict[int, list[dict]]) -> list[str]:
    seeds = sorted(rows_by_seed)
    out = [f"Seeds {', '.join(map(str, seeds))}; per metric and NFE, the sampler each seed calls significantly lowest "
           "(bold in its report; `-` where none is):", ""]
    nfes = sorted({r["nfe"] for r in rows_by_seed[seeds[0]]})
    total = agree = contradictions = 0
    ratios: dict[str, list[float]] = {m: [] for m, _ in METRICS}
    for m, label in METRICS:
        out += [f"**{label}**", "", "| NFE | " + " | ".join(f"seed {s}" for s in seeds) + " | same at every seed | contradictions |",
                "|---:|" + "---|" * len(seeds) + "---|---:|"]
        for n in nfes:
            bold = {}
            for s in seeds:
                cell = [r for r in rows_by_seed[s] if r["nfe"] == n and r.get(f"{m}_best")]
                bold[s] = cell[0]["sampler"] if cell else "-"
            bad = 0
            for s in seeds:  # a sampler bold at seed s and significantly worse than the lowest at seed t
                if bold[s] == "-":
                    continue
                for t in seeds:
                    r = [x for x in rows_by_seed[t] if x["nfe"] == n and x["sampler"] == bold[s]]
                    if r and r[0].get(f"{m}_vs_best_lo", math.nan) > 0:
                        bad += 1
            same = len(set(bold.values())) == 1
            total += 1
            agree += same
            contradictions += bad
            out.append(f"| {n} | " + " | ".join(bold[s] for s in seeds) + f" | {'yes' if same else 'no'} | {bad} |")
            for name in {r["sampler"] for r in rows_by_seed[seeds[0]]}:
                vals = [x[m] for s in seeds for x in rows_by_seed[s] if x["nfe"] == n and x["sampler"] == name]
                ses = [x[f"{m}_se"] for s in seeds for x in rows_by_seed[s] if x["nfe"] == n and x["sampler"] == name]
                if len(vals) == len(seeds) and all(map(math.isfinite, vals + ses)) and np.mean(ses) > 0:
                    ratios[m].append(float(np.std(vals, ddof=1) / np.mean(ses)))
        out.append("")
    out += [f"Columns where every seed bolds the same cell (or none): {agree} of {total}; contradictions: {contradictions}.", ""]
    out += ["The lowest cell of each column per seed (bold or not), and the samplers significantly above the lowest at "
            "*every* seed (the conclusions that hold whatever the seed):", ""]
    for m, label in METRICS:
        out += [f"**{label}**", "", "| NFE | lowest at seeds " + ", ".join(map(str, seeds)) + " | significantly above the lowest at every seed |",
                "|---:|---|---|"]
        for n in nfes:
            lows, worse = [], None
            for s in seeds:
                col = [r for r in rows_by_seed[s] if r["nfe"] == n and math.isfinite(r[m])]
                lows.append(min(col, key=lambda r: r[m])["sampler"] if col else "-")
                w = {r["sampler"] for r in col if r.get(f"{m}_vs_best_lo", math.nan) > 0}
                worse = w if worse is None else worse & w
            out.append(f"| {n} | {', '.join(lows)} | {', '.join(sorted(worse or [])) or '-'} |")
        out.append("")
    out += ["Spread over the seeds against the bootstrap standard error (per cell: standard deviation of the "
            f"{len(seeds)} seeds' values / mean of their bootstrap SEs; median and range over the cells):", ""]
    for m, label in METRICS:
        r = ratios[m]
        if r:
            out.append(f"- {label}: median {np.median(r):.2f} (range {min(r):.2f}-{max(r):.2f}, {len(r)} cells)")
    out.append("")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--work", default=None, help="folder for the reports and run folders (default: temporary)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="fewstep-report-tables-"))
    fewstep_cmd = [sys.executable, "-m", "fewstep.cli", "report", "--quiet"]
    load = os.getloadavg()[0]
    wall, cpu = run(fewstep_cmd + ["--out", str(work / "seed0")])
    md0 = (work / "seed0" / "report.md").read_text()
    meta0 = json.loads((work / "seed0" / "fid_per_nfe.json").read_text())
    rows = {0: meta0["rows"]}
    resumed = meta0["meta"]["generated"] < len(rows[0]) * meta0["meta"]["num_samples"]
    for s in seeds:
        if s == 0:
            continue
        run(fewstep_cmd + ["--no-exact", "--seed", str(s), "--out", str(work / f"seed{s}")])
        rows[s] = json.loads((work / f"seed{s}" / "fid_per_nfe.json").read_text())["rows"]

    import diffusers
    import torch

    import fewstep

    fid_md = section(md0, "FID per NFE")
    fid_md = re.sub(r"^!\[.*$\n?", "", fid_md, flags=re.M)  # figures live in the report folder
    exact_md = section(md0, "Exact Gaussian mixture")
    exact_md = re.sub(r"^!\[.*$\n?", "", exact_md, flags=re.M)
    lines = [
        BEGIN,
        "",
        f"`python benchmarks/report_tables.py` — {time.strftime('%Y-%m-%d')}, CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load:.1f} at the start: shared with other jobs), fewstep "
        f"{fewstep.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}. "
        f"Step 1 is `fewstep report` with no arguments: {wall:.0f} s wall, {cpu:.0f} s CPU"
        + (" (resumed from its run folder, so not a timing of a fresh run)." if resumed else "."),
        "",
        "### The default report (seed 0)",
        "",
        re.sub(r"^(#+) ", r"#\1 ", fid_md, flags=re.M),
        "",
        re.sub(r"^(#+) ", r"#\1 ", exact_md, flags=re.M),
        "",
        "### The seed study behind the defaults",
        "",
        *seed_study(rows),
        END,
    ]
    path = Path(args.results)
    text = path.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote the report tables into {path} (reports in {work})")


if __name__ == "__main__":
    main()
