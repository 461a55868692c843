"""`fewstep report`: FID per NFE on a neural model and the exact-mixture error table, written to a
folder as CSV, JSON, Markdown, plots and sample grids.

Two studies, each optional:

* **FID per NFE** (:func:`fewstep.eval.fid.fid_per_nfe`) of a model (default: the embedded digits
  UNet, digit features, the digits test split as reference), with the data's own FID as the
  sampling floor when the reference is the digits test split: the same number of *real* train
  images compared with the same reference, i.e. what a perfect sampler would score;
* **exact mixture** (:mod:`fewstep.eval.exact`): every sampler against the exact probability-flow
  ODE on the digits Gaussian mixture (pure discretisation error).

Files: ``report.md`` (both tables), ``fid_per_nfe.csv/.json``, ``fid_vs_nfe.png``,
``samples_<sampler>.png`` (rows: a few NFEs, same noise in every row and every sampler),
``exact_mixture.csv/.json/.png``.  The FID study keeps its samples' features in ``fid_run/``, so an
interrupted report resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

import fewstep
from fewstep.eval.exact import DEFAULT_NFES, ExactRow, ExactStudy, default_exact_samplers, exact_error_table, rows_as_dicts

__all__ = [
    "run_report",
    "markdown_table",
    "data_floor",
    "DEFAULT_FID_SAMPLERS",
    "DEFAULT_FID_NFES",
    "DEFAULT_FID_SAMPLES",
    "DEFAULT_EXACT_SAMPLES",
]

#: Samplers of the default FID study (those registered are used): first, second and third order
#: deterministic solvers and one stochastic one.
DEFAULT_FID_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_3", "dpmpp_2m_sde")
DEFAULT_FID_NFES = DEFAULT_NFES  # the exact study's grid: 4, 5, 6, 8, 10, 15, 20, 50
#: Samples per (sampler, NFE) in the default FID study (see benchmarks/RESULTS.md for the floor).
DEFAULT_FID_SAMPLES = 500
DEFAULT_EXACT_SAMPLES = 1000
_GRID_COLUMNS = 16


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.2e}"


def _pivot(rows: Sequence[Any], key: str) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    names = list(dict.fromkeys(r.sampler for r in rows))
    nfes = sorted({r.nfe for r in rows})
    return names, nfes, {(r.sampler, r.nfe): getattr(r, key) for r in rows}


def markdown_table(rows: Sequence[Any], key: str, scale: float = 1.0, best: bool = True) -> str:
    """One row per sampler, one column per NFE (rows need ``sampler``, ``nfe``, ``stochastic`` and
    ``key``); values multiplied by ``scale``; the lowest per column in bold if ``best``."""
    names, nfes, val = _pivot(rows, key)
    val = {k: v * scale for k, v in val.items()}
    low = {}
    for n in nfes:
        finite = [val[(s, n)] for s in names if math.isfinite(val.get((s, n), math.nan))]
        low[n] = min(finite) if finite and best else None
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for s in names:
        stoch = " (stochastic)" if any(r.stochastic for r in rows if r.sampler == s) else ""
        cells = []
        for n in nfes:
            v = val.get((s, n), math.nan)
            c = _fmt(v)
            cells.append(f"**{c}**" if low[n] is not None and v == low[n] else c)
        lines.append(f"| {s}{stoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def _plain_log_axes(ax, nfe_ticks: Sequence[int] | None = None) -> None:
    """Log-log axes with plain numbers as tick labels (NFE ticks at the grid's budgets)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    if nfe_ticks:
        ax.set_xticks(sorted(set(nfe_ticks)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _plot_lines(ax, rows: Sequence[Any], key: str, x_key: str = "nfe") -> None:
    """One line per sampler, dashed when its runs drew noise (the rows' ``stochastic``, which
    follows the options used, e.g. ``ddim`` with ``eta > 0``)."""
    for s in dict.fromkeys(r.sampler for r in rows):
        pts = sorted((getattr(r, x_key), getattr(r, key)) for r in rows if r.sampler == s
                     and math.isfinite(getattr(r, key)) and getattr(r, key) > 0 and math.isfinite(getattr(r, x_key)))
        stochastic = any(r.stochastic for r in rows if r.sampler == s)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=s, ls="--" if stochastic else "-")


# ---------------------------------------------------------------------------------------------
# Exact mixture
# ---------------------------------------------------------------------------------------------


def plot_exact(rows: Sequence[ExactRow], path: Path, floor: float | None = None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, title in ((axes[0], "rmse", "RMSE to the exact ODE solution"), (axes[1], "fd", "Fréchet distance to exact-ODE samples")):
        _plot_lines(ax, rows, key)
        if key == "fd" and floor:
            ax.axhline(floor, color="gray", lw=1, ls=":", label="sampling floor")
        _plain_log_axes(ax, [r.nfe for r in rows])
        ax.set_xlabel("NFE")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def exact_section(rows: Sequence[ExactRow], study: ExactStudy, out_dir: Path, meta: dict[str, Any]) -> tuple[list[str], dict[str, Path]]:
    """Write the exact-mixture CSV, JSON and plot; return the Markdown section and the paths."""
    paths = {"exact_csv": out_dir / "exact_mixture.csv", "exact_json": out_dir / "exact_mixture.json",
             "exact_png": out_dir / "exact_mixture.png"}
    _write_rows(rows_as_dicts(rows), paths["exact_csv"], paths["exact_json"], meta)
    plot_exact(rows, paths["exact_png"], study.fd_floor)
    md = [
        "## Exact Gaussian mixture (scikit-learn 8x8 digits)",
        "",
        f"Model: {study.model!r}. Schedule: {study.schedule!r}. {study.noise.shape[0]} samples, noise seed {meta['seed']}; "
        "every sampler starts from the same noise, with its default time grid, and is compared with the exact "
        "probability-flow ODE solution from that noise (scipy DOP853, tolerance 1e-9).",
        "",
        "### RMSE to the exact ODE solution (lower is better; best per NFE in bold)",
        "",
        markdown_table(rows, "rmse"),
        "",
        "### Fréchet distance to the exact-ODE samples",
        "",
        f"Sampling floor (exact-ODE samples vs an independent exact data sample of the same size): {_fmt(study.fd_floor)}.",
        "",
        markdown_table(rows, "fd"),
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


def data_floor(reference: Any, extractor: Any, num_samples: int, seed: int = 0) -> dict[str, float] | None:
    """The sampling floor of a digits-test reference: FID and KID of ``num_samples`` real train
    images (a seeded random subset; all 1438 if more are asked) and of the whole train split,
    against the reference.  ``None`` for other references (no held-out real set is known)."""
    if not reference.source.startswith("digits-test"):
        return None
    from fewstep.eval.frechet import frechet_distance
    from fewstep.eval.kid import kernel_inception_distance
    from fewstep.eval.stats import RunningStats
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
    return {"n": n, "fid": fid_n, "kid": kid_n, "n_all": len(train), "fid_all": fid_all, "kid_all": kid_all}


def plot_fid(rows: Sequence[Any], path: Path, floor: dict[str, float] | None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _plot_lines(axes[0], rows, "fid")
    _plot_lines(axes[1], [_ms(r) for r in rows], "fid", x_key="ms")
    for ax, ticks in zip(axes, ([r.nfe for r in rows], None)):
        if floor:
            ax.axhline(floor["fid"], color="gray", lw=1, ls=":", label=f"data floor ({floor['n']} real images)")
        _plain_log_axes(ax, ticks)
        ax.set_ylabel("FID")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_xlabel("NFE")
    axes[0].set_title("FID vs NFE")
    axes[1].set_xlabel("generation time per sample (ms)")
    axes[1].set_title("FID vs wall time")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ms(r: Any) -> SimpleNamespace:
    """A row with its generation time per sample in milliseconds (``ms``), for tables and plots."""
    return SimpleNamespace(sampler=r.sampler, nfe=r.nfe, fid=r.fid, stochastic=r.stochastic, ms=r.seconds_per_sample * 1e3)


def save_sample_grid(rows: Sequence[tuple[str, torch.Tensor]], path: Path, title: str) -> None:
    """One labelled row per ``(label, images (k, C, H, W) in [-1, 1])``."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.55 * _GRID_COLUMNS + 1.2, 0.6 * len(rows) + 0.6), squeeze=False)
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


def _grid_nfes(nfes: Sequence[int]) -> list[int]:
    """Up to three NFEs for the sample grids: the smallest, one in the middle, the largest."""
    s = sorted(set(nfes))
    return sorted({s[0], s[len(s) // 2], s[-1]})


def fid_section(table: Any, meta: dict[str, Any], out_dir: Path, reference_images: torch.Tensor | None) -> tuple[list[str], dict[str, Path]]:
    """Write the FID CSV, JSON, plot and sample grids; return the Markdown section and the paths."""
    paths = {"fid_csv": out_dir / "fid_per_nfe.csv", "fid_json": out_dir / "fid_per_nfe.json", "fid_png": out_dir / "fid_vs_nfe.png"}
    rows = table.rows
    _write_rows(table.as_dicts(), paths["fid_csv"], paths["fid_json"], meta)
    floor = meta.get("floor")
    plot_fid(rows, paths["fid_png"], floor)
    names = list(dict.fromkeys(r.sampler for r in rows))
    grid_nfes = _grid_nfes([r.nfe for r in rows])
    for name in names:
        grid = [(f"NFE {n}", table.images(name, n)) for n in grid_nfes if not table.row(name, n).error]
        grid = [(lab, im) for lab, im in grid if len(im)]
        if reference_images is not None:
            grid.append(("data", reference_images))
        if grid:
            paths[f"samples_{name}"] = out_dir / f"samples_{name}.png"
            save_sample_grid(grid, paths[f"samples_{name}"], f"{name}: samples {0}-{_GRID_COLUMNS - 1} (same noise in every row)")
    kid_scale = 1e3
    md = [
        f"## FID per NFE: {meta['model']}",
        "",
        f"{meta['num_samples']} samples per (sampler, NFE), noise seeded per sample index (seed {meta['seed']}; every "
        f"sampler starts from the same noise), each sampler with its default time grid. Features: `{meta['extractor']}`. "
        f"Reference: `{meta['reference']['source']}` ({meta['reference']['num_samples']} images).",
        "",
    ]
    if floor:
        md += [
            f"Sampling floor: {floor['n']} real digits from the train split against the same reference score "
            f"FID **{_fmt(floor['fid'])}** (KID x 1e3: {_fmt(floor['kid'] * kid_scale)}); the whole train split "
            f"({floor['n_all']} images) scores FID {_fmt(floor['fid_all'])} (the data's own train-vs-test FID). "
            "A perfect sampler of the data distribution would score the floor at this sample count.",
            "",
        ]
    md += [
        "### FID (lower is better; best per NFE in bold)",
        "",
        markdown_table(rows, "fid"),
        "",
        "### KID x 1e3 (unbiased: 0 for the data distribution)",
        "",
        markdown_table(rows, "kid", kid_scale),
        "",
        "### Generation time per sample (ms; network and sampler, not features)",
        "",
        markdown_table([_ms(r) for r in rows], "ms", best=False),
        "",
        f"![FID vs NFE]({paths['fid_png'].name})",
        "",
        "### Samples",
        "",
    ]
    md += [f"![{n}]({paths[f'samples_{n}'].name})" for n in names if f"samples_{n}" in paths]
    md.append("")
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
) -> dict[str, Path]:
    """Run the FID-per-NFE study and the exact-mixture study and write the report.

    ``samplers``, ``nfes`` and ``num_samples`` apply to both studies when given; otherwise the FID
    study uses :data:`DEFAULT_FID_SAMPLERS` (those registered), :data:`DEFAULT_FID_NFES` and
    :data:`DEFAULT_FID_SAMPLES`, the exact study every diffusion sampler, ``DEFAULT_NFES`` and
    :data:`DEFAULT_EXACT_SAMPLES`.  ``model``: see :func:`fewstep.eval.model_spec.resolve_model`;
    ``reference``: a source for :func:`fewstep.eval.reference.reference_stats` (default: the
    digits test split for the embedded model; required for others).  Returns the written paths."""
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
    paths: dict[str, Path] = {"md": out / "report.md"}

    if fid:
        from fewstep.eval.features import get_extractor
        from fewstep.eval.fid import fid_per_nfe
        from fewstep.eval.model_spec import resolve_model
        from fewstep.eval.reference import reference_stats

        t0 = time.perf_counter()
        resolved = resolve_model(model, shape=shape, device=device)
        ext = get_extractor(extractor, inception_path=inception_path, device=device)
        ref_source = reference if reference is not None else resolved.default_reference
        if ref_source is None:
            raise ValueError(
                f"give reference statistics for {resolved.description}: --reference FOLDER (real images), a .npz "
                "written by fewstep, or digits[:train|:test]"
            )
        ref = reference_stats(ref_source, ext, progress=progress)
        fid_samplers = list(samplers) if samplers is not None else [s for s in DEFAULT_FID_SAMPLERS if s in fewstep.available()]
        fid_nfes = list(nfes) if nfes is not None else list(DEFAULT_FID_NFES)
        n_fid = int(num_samples) if num_samples is not None else DEFAULT_FID_SAMPLES
        table = fid_per_nfe(
            resolved.denoiser, shape=resolved.shape, samplers=fid_samplers, nfes=fid_nfes, reference=ref, extractor=ext,
            num_samples=n_fid, seed=seed, batch_size=batch_size, run_dir=run_dir or out / "fid_run",
            model_id=resolved.model_id, device=device, progress=progress,
        )
        floor = data_floor(ref, ext, n_fid, seed)
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
            "generated": table.generated,
            "run_dir": str(table.run_dir),
            "seconds": time.perf_counter() - t0,
        }
        lines, p = fid_section(table, fid_meta, out, ref_images)
        md += lines + [""]
        paths.update(p)

    if exact:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        names = list(samplers) if samplers is not None else default_exact_samplers()
        exact_nfes = list(nfes) if nfes is not None else list(DEFAULT_NFES)
        n_exact = int(num_samples) if num_samples is not None else DEFAULT_EXACT_SAMPLES
        bar = tqdm(total=len(names) * len(exact_nfes) + 1, desc="exact mixture", disable=not progress)
        bar.set_postfix_str("exact ODE reference")
        study = ExactStudy.make(num_samples=n_exact, seed=seed)
        bar.update(1)

        def tick(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        rows, _ = exact_error_table(names, exact_nfes, study=study, progress=tick)
        bar.close()
        exact_meta = {**base_meta, "num_samples": n_exact, "nfes": exact_nfes, "seconds": time.perf_counter() - t0}
        lines, p = exact_section(rows, study, out, exact_meta)
        md += lines + [""]
        paths.update(p)

    md.append(f"Total time: {time.perf_counter() - t_start:.1f} s.")
    paths["md"].write_text("\n".join(md) + "\n")
    return paths
