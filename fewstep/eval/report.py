"""`fewstep report`: FID per NFE on a neural model and the exact-mixture error table, written to a
folder as CSV, JSON, Markdown, plots and sample grids.

Two studies, each optional:

* **FID per NFE** (:func:`fewstep.eval.fid.fid_per_nfe`) of a model (default: the embedded digits
  UNet, digit features, the digits test split as reference).  The headline is the Fréchet
  distance to the model's own exact-ODE samples from the same noises (``fd_ode``,
  :mod:`fewstep.eval.ode_reference`: no sampling floor, the model's own error left out); beside it
  FID and KID to the reference, with the data's own FID as the sampling floor when the reference
  is the digits test split (the same number of *real* train images against the same reference:
  what a perfect sampler would score);
* **exact mixture** (:mod:`fewstep.eval.exact`): every sampler against the exact probability-flow
  ODE on the digits Gaussian mixture (pure discretisation error).

Every number is printed with the half-width of its 95 % bootstrap interval and a cell is bold only
where it is the column's lowest *and* its paired interval against every other sampler of the
column excludes 0 (:mod:`fewstep.eval.uncertainty`); the findings under each table say, per NFE,
which sampler is significantly lowest or which ones cannot be told from the lowest.

Files: ``report.md`` (all tables), ``fid_per_nfe.csv/.json``, ``fid_vs_nfe.png``,
``samples_nfe<k>.png`` (one row per sampler at one NFE, the exact-ODE samples and real data: the
same noise in every row), ``exact_mixture.csv/.json/.png``.  The FID study keeps its samples'
features in ``fid_run/``, so an interrupted report resumes where it stopped, and a larger
``--num-samples`` adds to it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import fewstep
from fewstep.eval.exact import DEFAULT_NFES, EXACT_REPLICATES, ExactRow, ExactStudy, default_exact_samplers, exact_error_study, rows_as_dicts
from fewstep.eval.ode_reference import REPORT_ODE
from fewstep.eval.uncertainty import DEFAULT_REPLICATES, Z95

__all__ = [
    "run_report",
    "markdown_table",
    "data_floor",
    "DEFAULT_FID_SAMPLERS",
    "DEFAULT_FID_NFES",
    "DEFAULT_FID_SAMPLES",
    "DEFAULT_EXACT_SAMPLES",
    "findings",
]

#: Samplers of the default FID study (those registered are used): first, second and third order
#: deterministic solvers and one stochastic one.
DEFAULT_FID_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_3", "dpmpp_2m_sde")
#: NFEs of the default FID study: the exact study's grid without 50, whose cells cost as much as the
#: exact-ODE reference that now stands for "many steps" (benchmarks/RESULTS.md, the seed study).
DEFAULT_FID_NFES = (4, 5, 6, 8, 10, 15, 20)
#: Samples per (sampler, NFE) in the default FID study (see benchmarks/RESULTS.md for the seed study).
DEFAULT_FID_SAMPLES = 500
DEFAULT_EXACT_SAMPLES = 1000
_GRID_COLUMNS = 16


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "0"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def _pivot(rows: Sequence[Any], key: str) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    names = list(dict.fromkeys(r.sampler for r in rows))
    nfes = sorted({r.nfe for r in rows})
    return names, nfes, {(r.sampler, r.nfe): getattr(r, key) for r in rows}


def _cell(value: float, se: float | None, scale: float) -> str:
    """``value`` and the half-width of its 95 % interval (``Z95 * se``), both times ``scale``."""
    text = _fmt(value * scale)
    if se is not None and math.isfinite(se) and math.isfinite(value):
        text += f" ± {_fmt(Z95 * se * scale)}"
    return text


def markdown_table(rows: Sequence[Any], key: str, scale: float = 1.0, comparisons: Mapping[int, Any] | None = None,
                   intervals: bool = True) -> str:
    """One row per sampler, one column per NFE (rows need ``sampler``, ``nfe``, ``stochastic`` and
    ``key``, and ``key_se`` when ``intervals``); values times ``scale`` with the half-width of
    their 95 % interval.  A cell is bold only where ``comparisons[nfe]`` (paired comparisons,
    :func:`fewstep.eval.uncertainty.compare`) names it significantly lowest: without comparisons
    nothing is bold."""
    names, nfes, val = _pivot(rows, key)
    se = {(r.sampler, r.nfe): getattr(r, f"{key}_se", None) if intervals else None for r in rows}
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for s in names:
        stoch = " (stochastic)" if any(r.stochastic for r in rows if r.sampler == s) else ""
        cells = []
        for n in nfes:
            c = _cell(val.get((s, n), math.nan), se.get((s, n)), scale)
            comp = (comparisons or {}).get(n)
            cells.append(f"**{c}**" if comp is not None and comp.significant and comp.best == s else c)
        lines.append(f"| {s}{stoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference_table(rows: Sequence[Any], comparisons: Mapping[int, Any], scale: float = 1.0) -> str:
    """Each cell's paired difference to its column's lowest cell, with the half-width of its 95 %
    interval; "lowest" marks the column's lowest cell (bold when it is significantly lowest), and
    "(tie)" a difference whose interval contains 0."""
    names, nfes, _ = _pivot(rows, "nfe")
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for s in names:
        cells = []
        for n in nfes:
            comp = comparisons.get(n)
            d = comp.differences.get(s) if comp is not None else None
            if d is None:
                cells.append("–")
            elif comp.best == s:
                cells.append("**lowest**" if comp.significant else "lowest")
            else:
                cells.append(f"+{_fmt(d.diff * scale)} ± {_fmt(Z95 * d.se * scale)}{'' if d.significant else ' (tie)'}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _metric_block(rows: Sequence[Any], key: str, comparisons: Mapping[str, Mapping[int, Any]]) -> list[str]:
    """A metric's table, the paired differences to each column's lowest cell, and the findings."""
    comps = comparisons.get(key, {})
    return [markdown_table(rows, key, comparisons=comps), "", "Paired difference to the column's lowest cell:", "",
            difference_table(rows, comps), "", *[f"- {line}" for line in findings(comps)], ""]


def findings(comparisons: Mapping[int, Any]) -> list[str]:
    """One sentence per NFE: which sampler is significantly lowest, or which cannot be told from
    the lowest (paired 95 % intervals)."""
    out = []
    for n in sorted(comparisons):
        comp = comparisons[n]
        if comp.significant:
            out.append(f"NFE {n}: `{comp.best}` is lowest, significantly below every other sampler.")
            continue
        ties = [s for s, d in comp.differences.items() if s != comp.best and not d.significant]
        out.append(f"NFE {n}: no sampler is significantly lowest; `{comp.best}` is lowest, tied with "
                   + ", ".join(f"`{t}`" for t in ties) + ".")
    return out


def _write_rows(rows: list[dict], csv_path: Path, json_path: Path, meta: dict[str, Any]) -> None:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axes(ax, values: Sequence[float], nfe_ticks: Sequence[int] | None = None) -> None:
    """Log-log axes whose tick labels are plain numbers: the grid's budgets on x (or 1-2-5 steps),
    1-2-5 steps on y over the range of ``values``, no minor labels (they overlap)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    if nfe_ticks:
        ax.xaxis.set_major_locator(FixedLocator(sorted(set(nfe_ticks))))
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    pos = [v for v in values if math.isfinite(v) and v > 0]
    if pos:
        lo, hi = min(pos), max(pos)
        decades = math.log10(hi / lo) if hi > lo else 0.0
        subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(NullFormatter())


def _plot_lines(ax, rows: Sequence[Any], key: str, x_key: str = "nfe", colors: Mapping[str, Any] | None = None) -> list[float]:
    """One line per sampler with 95 % error bars (``key_lo``/``key_hi`` where the rows have them),
    dashed when its runs drew noise (the rows' ``stochastic``).  A lower end at or near 0, which a
    log axis cannot show, is drawn to a quarter of the smallest plotted value (the bottom of the
    axis).  Returns the plotted values and interval ends (for the axis range)."""
    ok = [r for r in rows if math.isfinite(getattr(r, key)) and getattr(r, key) > 0 and math.isfinite(getattr(r, x_key))]
    if not ok:
        return []
    bottom = min(getattr(r, key) for r in ok) / 4
    shown: list[float] = [bottom]
    for s in dict.fromkeys(r.sampler for r in ok):
        pts = sorted((r.nfe, getattr(r, x_key), getattr(r, key), getattr(r, f"{key}_lo", math.nan), getattr(r, f"{key}_hi", math.nan))
                     for r in ok if r.sampler == s)  # joined in NFE order (on the time panel too)
        _, x, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
        stochastic = any(r.stochastic for r in rows if r.sampler == s)
        kw = {"marker": "o", "ms": 3, "label": s, "ls": "--" if stochastic else "-", "capsize": 2, "lw": 1.2}
        if colors is not None:
            kw["color"] = colors[s]
        if np.isfinite(lo).all() and np.isfinite(hi).all():
            ax.errorbar(x, y, yerr=np.stack([y - np.maximum(lo, bottom), np.maximum(hi - y, 0)]), **kw)
            shown += list(hi)
        else:
            ax.errorbar(x, y, **kw)
        shown += list(y)
    return shown


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per sampler: the default cycle for up to 10, else matplotlib's tab20 and then its
    darker tab20b (distinct up to 40 lines)."""
    plt = _pyplot()
    if len(names) <= 10:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    else:
        cycle = list(plt.get_cmap("tab20").colors) + list(plt.get_cmap("tab20b").colors)
    return {n: cycle[i % len(cycle)] for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# Exact mixture
# ---------------------------------------------------------------------------------------------


def plot_exact(rows: Sequence[ExactRow], path: Path) -> None:
    """RMSE and Fréchet distance to the exact ODE per NFE, one line per sampler with 95 % error
    bars.  No floor line: the Fréchet distance to the *paired* exact-ODE samples goes to 0."""
    plt = _pyplot()
    names = list(dict.fromkeys(r.sampler for r in rows))
    colors = _colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    for ax, key, title in ((axes[0], "rmse", "RMSE to the exact ODE solution"), (axes[1], "fd", "Fréchet distance to the exact-ODE samples")):
        shown = _plot_lines(ax, rows, key, colors=colors)
        _plain_log_axes(ax, shown, [r.nfe for r in rows])
        if shown:
            ax.set_ylim(min(shown) / 1.1, max(shown) * 1.3)
        ax.set_xlabel("NFE")
        ax.set_ylabel(key.upper() if key == "rmse" else "FD")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(labels) - 1) // 8), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def exact_section(rows: Sequence[ExactRow], comparisons: Mapping[str, Mapping[int, Any]], study: ExactStudy, out_dir: Path,
                  meta: dict[str, Any]) -> tuple[list[str], dict[str, Path]]:
    """Write the exact-mixture CSV, JSON and plot; return the Markdown section and the paths."""
    paths = {"exact_csv": out_dir / "exact_mixture.csv", "exact_json": out_dir / "exact_mixture.json",
             "exact_png": out_dir / "exact_mixture.png"}
    _write_rows(rows_as_dicts(rows), paths["exact_csv"], paths["exact_json"], meta)
    plot_exact(rows, paths["exact_png"])
    md = [
        "## Exact Gaussian mixture (scikit-learn 8x8 digits)",
        "",
        f"Model: {study.model!r}. Schedule: {study.schedule!r}. {study.noise.shape[0]} samples, noise seed {meta['seed']}; "
        "every sampler starts from the same noise, with its default time grid, and is compared with the exact "
        "probability-flow ODE solution from that noise (scipy DOP853, tolerance 1e-9). "
        + _uncertainty_text(study.bootstrap, study.noise.shape[0], "the exact-ODE samples resampled with the same indices"),
        "",
        "### RMSE to the exact ODE solution (lower is better)",
        "",
        markdown_table(rows, "rmse", comparisons=comparisons.get("rmse")),
        "",
        "### Fréchet distance to the exact-ODE samples",
        "",
        f"These distances have no sampling floor (an exact solver scores 0 at any sample count). For scale: the "
        f"exact-ODE samples against an independent exact data sample of the same size score {_fmt(study.fd_floor)}.",
        "",
        markdown_table(rows, "fd", comparisons=comparisons.get("fd")),
        "",
        "Stochastic samplers do not follow the ODE; their RMSE includes their own noise, so compare them by Fréchet distance.",
        "",
        f"![error vs NFE]({paths['exact_png'].name})",
        "",
    ]
    skipped = [r for r in rows if r.error]
    if skipped:
        md += ["Cells without numbers (a budget the sampler cannot meet, or a run that went non-finite):", ""]
        md += [f"- {r.sampler} at NFE {r.nfe}: {r.error}" for r in skipped]
        md.append("")
    md.append(f"Exact-mixture study: {meta['seconds']:.1f} s.")
    return md, paths


# ---------------------------------------------------------------------------------------------
# FID per NFE
# ---------------------------------------------------------------------------------------------


def _uncertainty_text(bootstrap: int, n: int, held: str = "the reference held fixed") -> str:
    if not bootstrap:
        return "No intervals were computed (bootstrap switched off), so nothing is marked as best."
    return (f"Each number is followed by the half-width of its 95 % interval (bootstrap over the {n} sample indices, "
            f"{bootstrap} resamples, {held}: how much another noise seed would move it). A cell is "
            "**bold** only where it is the column's lowest and its paired 95 % interval against every other sampler "
            "of the column excludes 0 (the same resamples for every sampler, which start from the same noises).")


def data_floor(reference: Any, extractor: Any, num_samples: int, seed: int = 0, bootstrap: int = DEFAULT_REPLICATES) -> dict[str, float] | None:
    """The sampling floor of a digits-test reference: FID and KID of ``num_samples`` real train
    images (a seeded random subset; all 1438 if more are asked) and of the whole train split,
    against the reference, with the bootstrap standard error of the subset's FID.  ``None`` for
    other references (no held-out real set is known)."""
    if not reference.source.startswith("digits-test"):
        return None
    from fewstep.eval.frechet import frechet_distance
    from fewstep.eval.kid import kernel_inception_distance
    from fewstep.eval.stats import RunningStats
    from fewstep.eval.uncertainty import bootstrap_counts, fd_replicates
    from fewstep.models.embedded import digits_images

    train = digits_images("train")
    feats = extractor(train).numpy()
    n = min(int(num_samples), len(train))
    subset = feats[np.random.default_rng(seed).permutation(len(train))[:n]]

    def fid_kid(f: np.ndarray) -> tuple[float, float]:
        st = RunningStats.from_features(f)
        fid = frechet_distance(st.mean, st.cov, reference.mu, reference.sigma)
        kid = kernel_inception_distance(f, reference.features)[0] if reference.features is not None else math.nan
        return fid, kid

    fid_n, kid_n = fid_kid(subset)
    fid_all, kid_all = fid_kid(feats)
    se = math.nan
    if bootstrap:
        se = float(np.std(fd_replicates(subset, bootstrap_counts(n, bootstrap, seed), mu=reference.mu, sigma=reference.sigma)[0], ddof=1))
    return {"n": n, "fid": fid_n, "fid_se": se, "kid": kid_n, "n_all": len(train), "fid_all": fid_all, "kid_all": kid_all}


def plot_fid(rows: Sequence[Any], path: Path, floor: dict[str, float] | None, has_ode: bool = False) -> None:
    """FD to the exact-ODE samples vs NFE (when measured), FID vs NFE and FID vs generation time,
    with 95 % error bars and one legend for all panels; the data floor (with its interval as a
    band) only on the FID panels, which it bounds."""
    plt = _pyplot()
    names = list(dict.fromkeys(r.sampler for r in rows))
    colors = _colors(names)
    panels = (["fd_ode"] if has_ode else []) + ["fid", "time"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.0), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "time":  # no error bars here: they are on the FID panel, and would hide the times
            shown = _plot_lines(ax, [_ms(r, bars=False) for r in rows], "fid", x_key="ms", colors=colors)
        else:
            shown = _plot_lines(ax, rows, panel, colors=colors)
        if panel != "fd_ode" and floor:
            ax.axhline(floor["fid"], color="gray", lw=1, ls=":")
            if math.isfinite(floor.get("fid_se", math.nan)):
                half = Z95 * floor["fid_se"]
                ax.axhspan(max(floor["fid"] - half, 1e-12), floor["fid"] + half, color="gray", alpha=0.12, lw=0)
            shown.append(floor["fid"])
        xs = [r.nfe for r in rows] if panel != "time" else None
        xvals = [r.seconds_per_sample * 1e3 for r in rows if math.isfinite(r.fid) and r.seconds_per_sample > 0] if panel == "time" else []
        _plain_log_axes(ax, shown, xs)
        if shown:
            ax.set_ylim(min(shown) / 1.1, max(shown) * 1.3)
        if panel == "time" and xvals:
            ax.set_xlim(min(xvals) / 1.3, max(xvals) * 1.3)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("NFE" if panel != "time" else "generation time per sample (ms)")
        ax.set_ylabel({"fd_ode": "FD to the exact-ODE samples", "fid": "FID", "time": "FID"}[panel])
        ax.set_title({"fd_ode": "FD to the model's exact-ODE samples", "fid": "FID to the reference vs NFE",
                      "time": "FID vs generation time"}[panel])
    handles, labels = axes[0][0].get_legend_handles_labels()
    if floor:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="gray", lw=1, ls=":"))
        labels.append(f"data floor ({floor['n']} real images, 95 % band)")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(r: Any, bars: bool = True) -> SimpleNamespace:
    """A row with its generation time per sample in milliseconds (``ms``), for tables and plots."""
    lo, hi = (getattr(r, "fid_lo", math.nan), getattr(r, "fid_hi", math.nan)) if bars else (math.nan, math.nan)
    return SimpleNamespace(sampler=r.sampler, nfe=r.nfe, fid=r.fid, fid_lo=lo, fid_hi=hi, stochastic=r.stochastic,
                           ms=r.seconds_per_sample * 1e3)


def save_sample_grid(rows: Sequence[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    """One labelled row per ``(label, images (k, C, H, W) in [-1, 1])``."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.55 * _GRID_COLUMNS + 1.8, 0.6 * len(rows) + 0.7), squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], rows):
        x = ((imgs[:_GRID_COLUMNS].float().clamp(-1, 1) + 1) / 2).cpu()
        c, h, w = x.shape[1:]
        pad = torch.full((x.shape[0], c, h, 1), 0.5)
        strip = torch.cat([torch.cat([xi, pi], dim=2) for xi, pi in zip(x, pad)], dim=2)  # (C, H, k (W + 1))
        if c == 1:
            ax.imshow(strip[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid_nfe(nfes: Sequence[int]) -> int:
    """The NFE of the sample grid: the grid's budget closest to 8 (few steps, where samplers differ)."""
    return min(sorted(set(nfes)), key=lambda n: (abs(math.log(n / 8)), n))


def fid_section(table: Any, meta: dict[str, Any], out_dir: Path, reference_images: torch.Tensor | None) -> tuple[list[str], dict[str, Path]]:
    """Write the FID CSV, JSON, plot and sample grid; return the Markdown section and the paths."""
    paths = {"fid_csv": out_dir / "fid_per_nfe.csv", "fid_json": out_dir / "fid_per_nfe.json", "fid_png": out_dir / "fid_vs_nfe.png"}
    rows = table.rows
    _write_rows(table.as_dicts(), paths["fid_csv"], paths["fid_json"], meta)
    floor = meta.get("floor")
    ode = table.ode_reference
    has_ode = ode is not None and not ode.get("error") and any(math.isfinite(r.fd_ode) for r in rows)
    plot_fid(rows, paths["fid_png"], floor, has_ode)
    names = list(dict.fromkeys(r.sampler for r in rows))
    grid_nfe = _grid_nfe([r.nfe for r in rows])
    grid = [(name, table.images(name, grid_nfe)) for name in names if not table.row(name, grid_nfe).error]
    if has_ode:
        grid.append((f"exact ODE ({ode['sampler']}, {ode['nfe']} NFE)", table.images(ode["sampler"], ode["nfe"])))
    grid = [(lab, im) for lab, im in grid if len(im)]
    if reference_images is not None:
        grid.append(("data (test split)", reference_images))
    if grid:
        paths["samples"] = out_dir / f"samples_nfe{grid_nfe}.png"
        save_sample_grid(grid, paths["samples"], f"samples 0-{_GRID_COLUMNS - 1} at NFE {grid_nfe}, the same noise in every row")
    kid_scale = 1e3
    comps = table.comparisons
    md = [
        f"## FID per NFE: {meta['model']}",
        "",
        f"{meta['num_samples']} samples per (sampler, NFE), noise seeded per sample index (seed {meta['seed']}; every "
        f"sampler starts from the same noise), each sampler with its default time grid. Features: `{meta['extractor']}`. "
        f"Reference: `{meta['reference']['source']}` ({meta['reference']['num_samples'] or 'unknown number of'} images"
        f"{'' if meta['reference'].get('has_features', True) else '; only its mu and sigma: KID is unavailable'}). "
        + _uncertainty_text(table.bootstrap, meta["num_samples"]),
        "",
    ]
    if meta.get("reference_note"):
        md += [meta["reference_note"], ""]
    if has_ode:
        md += [
            "### FD to the model's exact-ODE samples (the headline; lower is better)",
            "",
            f"Fréchet distance, on the same features, between each cell's samples and the model's own many-step solution "
            f"from the same noises (`{ode['sampler']}` at {ode['nfe']} NFE): it measures the sampler alone, with no "
            "sampling floor (an exact solver scores 0 at any sample count) and without the model's own error.",
            "",
            *_metric_block(rows, "fd_ode", comps),
        ]
    elif ode is not None and ode.get("error"):
        md += [f"The exact-ODE reference ({ode['sampler']} at {ode['nfe']} NFE) failed: {ode['error']}", ""]
    md += ["### FID to the reference (lower is better)", ""]
    if floor:
        half = Z95 * floor["fid_se"] if math.isfinite(floor.get("fid_se", math.nan)) else math.nan
        md += [
            f"Sampling floor: {floor['n']} real digits from the train split against the same reference score "
            f"FID **{_fmt(floor['fid'])}**{f' ± {_fmt(half)}' if math.isfinite(half) else ''} (KID x 1e3: "
            f"{_fmt(floor['kid'] * kid_scale)}); the whole train split ({floor['n_all']} images) scores FID "
            f"{_fmt(floor['fid_all'])} (the data's own train-vs-test FID). A perfect sampler of the data distribution "
            "would score the floor at this sample count.",
            "",
        ]
    md += _metric_block(rows, "fid", comps)
    if meta["reference"].get("has_features", True):
        md += [
            "### KID x 1e3 (unbiased: 0 for the data distribution)",
            "",
            "clean-fid's subset mean (100 subsets of at most 1000), with the 95 % bootstrap interval of the full-sample "
            "unbiased estimate it converges to (what another seed would move).",
            "",
            markdown_table(rows, "kid", kid_scale, comparisons=comps.get("kid")),
            "",
            "Spread of the subset estimates (clean-fid's `kid_std`, x 1e3; it measures the subsets, not the seed):",
            "",
            markdown_table(rows, "kid_std", kid_scale, intervals=False),
            "",
            *[f"- {line}" for line in findings(comps.get("kid", {}))],
            "",
        ]
    extra_keys = list(dict.fromkeys(k for r in rows for k in r.extra))
    for k in extra_keys:
        tab = [SimpleNamespace(sampler=r.sampler, nfe=r.nfe, stochastic=r.stochastic, v=r.extra.get(k, math.nan)) for r in rows]
        md += [f"### {k} (no interval)", "", markdown_table(tab, "v", intervals=False), ""]
    md += [
        "### Generation time per sample (ms; network and sampler, not features)",
        "",
        markdown_table([_ms(r) for r in rows], "ms", intervals=False),
        "",
        f"![FID vs NFE]({paths['fid_png'].name})",
        "",
    ]
    if "samples" in paths:
        md += ["### Samples", "", f"![samples at NFE {grid_nfe}]({paths['samples'].name})", ""]
    failed = [r for r in rows if r.error]
    if failed:
        md += ["Cells without numbers:", ""] + [f"- {r.sampler} at NFE {r.nfe}: {r.error}" for r in failed] + [""]
    md.append(f"FID study: {meta['seconds']:.1f} s ({meta['generated']} samples generated in this run, the rest "
              f"resumed from `{meta['run_dir']}`).")
    return md, paths


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _device_text(device: Any) -> str:
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_report(
    out_dir: str | os.PathLike = "fewstep-report",
    samplers: Sequence[str] | None = None,
    nfes: Sequence[int] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    command: str = "fewstep report",
    *,
    model: Any = "embedded",
    extractor: Any = "digits",
    reference: Any = None,
    inception_path: str | os.PathLike | None = None,
    shape: Sequence[int] | None = None,
    batch_size: int = 250,
    run_dir: str | os.PathLike | None = None,
    device: str | None = None,
    fid: bool = True,
    exact: bool = True,
    ode_reference: tuple[str, int] | None = REPORT_ODE,
    bootstrap: int | None = None,
    retry_errors: bool = False,
    extra_metrics: Sequence[str] = (),
    foreign_reference: bool = False,
    weights_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the FID-per-NFE study and the exact-mixture study and write the report.

    ``samplers``, ``nfes`` and ``num_samples`` apply to both studies when given; otherwise the FID
    study uses :data:`DEFAULT_FID_SAMPLERS` (those registered), :data:`DEFAULT_FID_NFES` and
    :data:`DEFAULT_FID_SAMPLES`, the exact study every diffusion sampler, ``DEFAULT_NFES`` and
    :data:`DEFAULT_EXACT_SAMPLES`.  ``model``: see :func:`fewstep.eval.model_spec.resolve_model`;
    ``reference``: a source for :func:`fewstep.eval.reference.reference_stats` (default: the
    digits test split for the embedded model; required for others; ``foreign_reference=True``
    accepts a clean-fid / EDM ``{mu, sigma}`` file as statistics of ``extractor``).
    ``ode_reference``: the exact-ODE cell behind the headline ``fd_ode`` (``None``: none);
    ``bootstrap``: resamples behind every interval (0: none; default 200 for the FID study and
    100 for the exact study, which has seven times as many cells); ``retry_errors``: run cells that
    recorded an error again; ``extra_metrics``: see :func:`fewstep.eval.fid.fid_per_nfe`.
    Returns the written paths; ``paths["failed"]`` lists the studies in which every cell failed."""
    from fewstep._cli_checks import output_dir

    if not (fid or exact):
        raise ValueError("nothing to do: both the FID study and the exact-mixture study are switched off")
    # Every argument is checked before any work (the command line checks more: fewstep.cli).
    for n in samplers or ():
        fewstep.spec(n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_samples is not None and int(num_samples) < 2:
        raise ValueError(f"num_samples must be at least 2 (a covariance needs two samples), got {num_samples}")
    if nfes is not None:
        bad = [n for n in nfes if int(n) < 1]
        if not list(nfes) or bad or len(set(map(int, nfes))) != len(list(nfes)):
            raise ValueError(f"nfes must be distinct positive integers, got {list(nfes)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if bootstrap is not None and (int(bootstrap) < 0 or int(bootstrap) == 1):
        raise ValueError(f"bootstrap must be 0 (no intervals) or at least 2 resamples, got {bootstrap}")
    if ode_reference is not None:
        fewstep.spec(ode_reference[0])
        if int(ode_reference[1]) < 1:
            raise ValueError(f"the exact-ODE reference needs a positive NFE, got {ode_reference[1]}")
    from fewstep.eval.extra_metrics import EXTRA_METRICS

    bad_metrics = [m for m in extra_metrics if m not in EXTRA_METRICS]
    if bad_metrics:
        raise ValueError(f"unknown metrics {bad_metrics}; choose from {', '.join(EXTRA_METRICS)}")
    out = output_dir(out_dir, "out_dir")  # an existing file, or a folder that cannot be written, fails here
    if fid and run_dir is not None:
        output_dir(run_dir, "run_dir")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base_meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command, "device": _device_text(device), "seed": seed}
    md = [
        "# fewstep report",
        "",
        f"Generated {base_meta['date']} by `{command}` on {base_meta['device']} (fewstep {fewstep.__version__}, torch {torch.__version__}).",
        "",
    ]
    paths: dict[str, Any] = {"md": out / "report.md"}
    failed: list[str] = []

    if fid:
        from fewstep.eval.features import get_extractor
        from fewstep.eval.fid import fid_per_nfe
        from fewstep.eval.model_spec import resolve_model
        from fewstep.eval.reference import reference_stats

        t0 = time.perf_counter()
        resolved = resolve_model(model, shape=shape, device=device)
        ext = get_extractor(extractor, inception_path=inception_path, weights_path=weights_path, device=device)
        ref_source = reference if reference is not None else resolved.default_reference
        if ref_source is None:
            raise ValueError(
                f"give reference statistics for {resolved.description}: --reference FOLDER (real images), a .npz "
                "written by fewstep, or digits[:train|:test]"
            )
        ref = reference_stats(ref_source, ext, progress=progress, foreign=foreign_reference)
        fid_samplers = list(samplers) if samplers is not None else [s for s in DEFAULT_FID_SAMPLERS if s in fewstep.available()]
        fid_nfes = list(nfes) if nfes is not None else list(DEFAULT_FID_NFES)
        n_fid = int(num_samples) if num_samples is not None else DEFAULT_FID_SAMPLES
        table = fid_per_nfe(
            resolved.denoiser, shape=resolved.shape, samplers=fid_samplers, nfes=fid_nfes, reference=ref, extractor=ext,
            num_samples=n_fid, seed=seed, batch_size=batch_size, run_dir=run_dir or out / "fid_run",
            model_id=resolved.model_id, device=device, progress=progress, ode_reference=ode_reference,
            bootstrap=DEFAULT_REPLICATES if bootstrap is None else bootstrap, retry_errors=retry_errors,
            extra_metrics=tuple(extra_metrics),
        )
        floor = data_floor(ref, ext, n_fid, seed, table.bootstrap)
        ref_images = None
        if ref.source.startswith("digits-test"):
            from fewstep.models.embedded import digits_images

            ref_images = digits_images("test")[:_GRID_COLUMNS]
        fid_meta = {
            **base_meta,
            "model": resolved.description,
            "model_id": resolved.model_id,
            "extractor": ext.name,
            "reference": table.reference,
            "num_samples": n_fid,
            "batch_size": batch_size,
            "samplers": fid_samplers,
            "nfes": fid_nfes,
            "floor": floor,
            "ode_reference": table.ode_reference,
            "bootstrap": table.bootstrap,
            "reference_note": ref.note,
            "generated": table.generated,
            "run_dir": str(table.run_dir),
            "seconds": time.perf_counter() - t0,
        }
        lines, p = fid_section(table, fid_meta, out, ref_images)
        md += lines + [""]
        paths.update(p)
        if all(r.error for r in table.rows):
            failed.append("FID")

    if exact:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        names = list(samplers) if samplers is not None else default_exact_samplers()
        exact_nfes = list(nfes) if nfes is not None else list(DEFAULT_NFES)
        n_exact = int(num_samples) if num_samples is not None else DEFAULT_EXACT_SAMPLES
        bar = tqdm(total=len(names) * len(exact_nfes) + 1, desc="exact mixture", disable=not progress)
        bar.set_postfix_str("exact ODE reference")
        study = ExactStudy.make(num_samples=n_exact, seed=seed, bootstrap=EXACT_REPLICATES if bootstrap is None else bootstrap)
        bar.update(1)

        def tick(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        rows, comparisons, _ = exact_error_study(names, exact_nfes, study=study, progress=tick)
        bar.close()
        exact_meta = {**base_meta, "num_samples": n_exact, "nfes": exact_nfes, "bootstrap": study.bootstrap,
                      "seconds": time.perf_counter() - t0}
        lines, p = exact_section(rows, comparisons, study, out, exact_meta)
        md += lines + [""]
        paths.update(p)
        if all(r.error for r in rows):
            failed.append("exact mixture")

    md.append(f"Total time: {time.perf_counter() - t_start:.1f} s.")
    paths["md"].write_text("\n".join(md) + "\n")
    paths["failed"] = failed
    return paths
