"""FID and KID per NFE over a grid of (sampler, NFE): seeded per sample, resumable, sharded.

:func:`fid_per_nfe` generates ``num_samples`` samples for every cell of the grid, extracts their
features and compares them with reference statistics.  How it keeps its promises:

* **Seeding per sample index.**  Sample ``i`` starts from noise drawn from its own
  ``torch.Generator`` seeded from a hash of ``(seed, i)`` (:func:`sample_generators`), and a
  stochastic sampler draws its later noise for that sample from the same generator
  (``fewstep.sample(..., generator=[g_0, ..., g_{B-1}])``).  Every cell starts from the same noise
  per index (a paired comparison of samplers).  Nothing depends on which samples share a batch or a
  process, except floating-point round-off inside the network when the batch size changes
  (network kernels may sum in another order for another batch shape: about 1e-6 in the digits
  UNet's output, up to 7e-5 in its samples after the 1/alpha of the noisiest steps, 3e-6 relative
  in the FID).  Batches are fixed index ranges, ``[k B, (k + 1) B)``, so a run with 1 or 2
  processes, or a killed and resumed run, evaluates the same network batches and gives bit-identical
  samples.
* **Resumable.**  Each batch's features (and the first ``keep_images`` images) are written to
  ``run_dir/cells/<cell>/chunk_<start>_<end>.npz`` atomically (a uniquely named temporary file,
  then a rename) as soon as the batch is done; a new call with the same ``run_dir`` generates only
  the index ranges no chunk covers.  A killed run loses at most the batches in flight.
* **Run folders heal.**  A chunk that cannot be read or does not hold what its name says (truncated
  by a full disk or a copy, written by something else, an object array) is deleted with a warning
  naming it and generated again; chunks are read without unpickling (``allow_pickle=False``).  Runs
  with different batch sizes, one after the other or at the same time, may leave chunks whose
  ranges overlap: reading takes each sample index once (from the chunk that reaches furthest) and
  generation fills only the indices no chunk covers, so the folder stays usable.  ``run_dir/manifest.json``
  records what the samples depend on (the model -- its ``model_id``, or a fingerprint of an
  ``nn.Module`` denoiser's weights and settings --, the schedule, shape, seed, sample count,
  extractor, dtype) and a mismatching run folder is refused rather than mixed.
* **Sharded.**  Under ``torch.distributed`` (started by ``torchrun``, by ``accelerate launch
  --multi_gpu``, which sets the same environment, or initialised by the caller, e.g. through
  ``accelerate.PartialState``; gloo on CPU) batch ``k`` of the work list goes to rank
  ``k % world_size``; ranks write chunks into the shared
  ``run_dir`` and every rank computes the same table after a barrier.

* **Runs grow.**  The sample count is not part of the manifest: sample ``i`` is the same whatever
  ``num_samples`` is, so raising ``num_samples`` on an existing run folder generates only the new
  indices (and lowering it reads the first ``num_samples``).  Batches stay the fixed ranges
  ``[k B, (k + 1) B)`` clipped to what is missing, so a grown run can differ from a fresh run of
  the larger size only by the batch-size round-off above, in the batch that straddled the old end.
* **Failed cells are named and retried.**  A batch whose samples go non-finite is rerun one sample
  at a time to find the first failing index; the cell's ``error.json`` records it and the message
  names it.  ``retry_errors=True`` (``fewstep report --retry-errors``) forgets the recorded errors
  of the grid's cells and runs them again, in the same run folder.

FID is the Fréchet distance of the Gaussian fits (:mod:`fewstep.eval.frechet`, statistics folded in
chunk by chunk with :class:`fewstep.eval.stats.RunningStats`); KID is
:func:`fewstep.eval.kid.kernel_inception_distance` against the reference features.  With
``ode_reference=(sampler, nfe)`` the model's own many-step samples from the same noises are one
more cell, and every cell gets ``fd_ode``, the Fréchet distance to them (zero for an exact solver,
so it has no sampling floor: :mod:`fewstep.eval.ode_reference`).  Every number comes with a
bootstrap standard error and 95 % interval over the sample indices, and every column with paired
differences to its best cell (:mod:`fewstep.eval.uncertainty`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fewstep
from fewstep._dist import barrier, maybe_init_distributed
from fewstep._util import atomic_savez, atomic_write_bytes, module_fingerprint, seeded_generator
from fewstep.eval.features import FeatureExtractor, get_extractor
from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features
from fewstep.eval.kid import kernel_inception_distance
from fewstep.eval.reference import ReferenceStats
from fewstep.eval.stats import RunningStats
from fewstep.eval.uncertainty import (
    DEFAULT_REPLICATES,
    Z95,
    Comparison,
    bootstrap_counts,
    compare,
    fd_replicates,
    interval,
    mmd_replicates,
    resampled_moments,
)
from fewstep.samplers.core import NonFiniteError, model_schedule, prepare

__all__ = [
    "FidRow",
    "FidTable",
    "fid_per_nfe",
    "sample_generators",
    "sample_noise",
    "maybe_init_distributed",
    "cell_key",
]

_MANIFEST = "manifest.json"
_FORMAT = 2  # 2: the model is fingerprinted and the schedule recorded
_NOT_COMPARED = ("num_samples",)  # recorded by older versions; a run folder now grows with the sample count
#: Above this many generated or reference samples the N x N kernel matrices of KID's bootstrap do
#: not fit in memory; KID's interval then comes from its subsets and KID gets no paired comparison.
MAX_KERNEL_SAMPLES = 5000
#: The metrics of a row that carry intervals and paired comparisons: (field, what it is).
METRICS = (("fd_ode", "FD to the exact-ODE samples"), ("fid", "FID to the reference"), ("kid", "KID to the reference"))


def sample_generators(seed: int, start: int, end: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample index in ``[start, end)``, seeded from the key
    ``("fid-sample", seed, index)`` (:func:`fewstep._util.seeded_generator`: a hash, so every
    index has its own stream whatever the indices)."""
    return [seeded_generator("fid-sample", seed, i, device=device) for i in range(start, end)]


def sample_noise(seed: int, start: int, end: int, shape: Sequence[int]) -> torch.Tensor:
    """The starting noise of samples ``[start, end)``: (end - start, *shape) float32."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in sample_generators(seed, start, end)])


def cell_key(sampler: str, nfe: int, options: Mapping[str, Any] | None = None) -> str:
    """Folder name of one grid cell: ``<sampler>-nfe<nfe>``, with a hash of non-default options."""
    key = f"{sampler}-nfe{nfe}"
    if options:
        h = hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode()).hexdigest()[:8]
        key = f"{sampler}-{h}-nfe{nfe}"
    return key


@dataclass
class FidRow:
    """One cell of the table.  ``seconds_per_sample`` is the generation wall time (network and
    sampler, not feature extraction) per sample, summed over the batches of the run(s) that made
    them; ``error`` says why a cell has no numbers (an impossible budget, non-finite samples, with
    the first failing sample index).

    Every metric ``m`` of :data:`METRICS` has ``m_se`` (bootstrap standard error over the sample
    indices) and ``m_lo``/``m_hi`` (95 % interval); ``fd_ode`` is NaN without an ODE reference.
    ``kid``/``kid_std`` are clean-fid's subset mean and subset spread; ``kid_se`` is the bootstrap
    standard error of the full-sample unbiased MMD^2 (the limit of the subset mean), which is what
    another seed would move (above :data:`MAX_KERNEL_SAMPLES` samples: ``kid_std`` scaled by
    ``sqrt(subset size / N)``, without a paired comparison).  ``extra`` holds optional metrics (precision, recall, ...)."""

    sampler: str
    nfe: int
    fid: float
    kid: float
    kid_std: float
    num_samples: int
    seconds_per_sample: float
    stochastic: bool
    error: str = ""
    fid_se: float = math.nan
    fid_lo: float = math.nan
    fid_hi: float = math.nan
    kid_se: float = math.nan
    kid_lo: float = math.nan
    kid_hi: float = math.nan
    fd_ode: float = math.nan
    fd_ode_se: float = math.nan
    fd_ode_lo: float = math.nan
    fd_ode_hi: float = math.nan
    extra: dict = field(default_factory=dict)


@dataclass
class FidTable:
    """The result of :func:`fid_per_nfe`: rows in grid order, plus where the samples live
    (:meth:`features` and :meth:`images` read them from ``run_dir``, so they need a kept run
    folder, not the temporary default)."""

    rows: list[FidRow]
    run_dir: Path
    reference: dict[str, Any]
    generated: int  # samples this process generated in this call (the rest came from earlier runs or other ranks)
    extractor: str
    cells: dict[tuple[str, int], str] = field(default_factory=dict, repr=False)
    #: ``comparisons[metric][nfe]``: the column's best sampler, whether it is significantly best, and
    #: every sampler's paired difference to it (:func:`fewstep.eval.uncertainty.compare`).
    comparisons: dict[str, dict[int, Comparison]] = field(default_factory=dict, repr=False)
    ode_reference: dict[str, Any] | None = None  # {"sampler", "nfe", "cell", "error"} of the exact-ODE cell
    bootstrap: int = 0  # resamples behind every interval

    def row(self, sampler: str, nfe: int) -> FidRow:
        for r in self.rows:
            if r.sampler == sampler and r.nfe == nfe:
                return r
        raise KeyError(f"no row for ({sampler!r}, {nfe})")

    def as_dicts(self) -> list[dict[str, Any]]:
        """One flat dict per row: its fields, the ``extra`` metrics as columns, and per metric the
        paired difference to the column's best cell (``m_vs_best``, ``m_vs_best_lo``,
        ``m_vs_best_hi``) and whether this cell is that best and significantly so (``m_best``)."""
        out = []
        for r in self.rows:
            d = asdict(r)
            d.update(d.pop("extra"))
            for m, _ in METRICS:
                comp = self.comparisons.get(m, {}).get(r.nfe)
                diff = comp.differences.get(r.sampler) if comp is not None else None
                d[f"{m}_vs_best"] = diff.diff if diff is not None else math.nan
                d[f"{m}_vs_best_lo"] = diff.lo if diff is not None else math.nan
                d[f"{m}_vs_best_hi"] = diff.hi if diff is not None else math.nan
                d[f"{m}_best"] = bool(comp is not None and comp.best == r.sampler and comp.significant)
            out.append(d)
        return out

    def _pieces(self, sampler: str, nfe: int) -> list[tuple[int, int, _Chunk]]:
        folder = self.run_dir / "cells" / self.cells[(sampler, nfe)]
        chunks = _read_chunks(folder)
        try:
            n = self.row(sampler, nfe).num_samples
        except KeyError:
            n = 0
        return _cover(chunks, n or max((c[1] for c in chunks), default=0))[0]

    def features(self, sampler: str, nfe: int) -> np.ndarray:
        """The (N, F) features of a cell, in sample-index order."""
        parts = [c[2]["features"][lo - c[0] : hi - c[0]] for lo, hi, c in self._pieces(sampler, nfe)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def images(self, sampler: str, nfe: int) -> torch.Tensor:
        """The first ``keep_images`` samples of a cell, in index order."""
        parts = _image_prefix(self._pieces(sampler, nfe))
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)


_Chunk = tuple[int, int, dict[str, np.ndarray]]  # (start, end, arrays) of one chunk file
_CHUNK_NAME = re.compile(r"^chunk_(\d+)_(\d+)\.npz$")


def _chunk_problem(name: str, data: Mapping[str, np.ndarray], dim: int | None) -> str | None:
    """Why the arrays of a chunk file are not a chunk of this run (``None`` if they are)."""
    m = _CHUNK_NAME.match(name)
    if m is None:
        return "its name is not chunk_<start>_<end>.npz"
    missing = [k for k in ("start", "end", "features", "seconds") if k not in data]
    if missing:
        return f"it lacks {', '.join(missing)}"
    try:
        start, end = int(data["start"]), int(data["end"])
    except (TypeError, ValueError):
        return "its start and end are not integers"
    if (start, end) != (int(m.group(1)), int(m.group(2))) or not 0 <= start < end:
        return f"it says it holds samples [{start}, {end}), not what its name says"
    f = data["features"]
    if f.ndim != 2 or f.shape[0] != end - start or f.dtype.kind != "f":
        return f"its features have shape {f.shape} ({f.dtype}), not ({end - start}, D) floats"
    if dim is not None and f.shape[1] != dim:
        return f"its features have dimension {f.shape[1]}, not the extractor's {dim}"
    if not np.isfinite(f).all():
        return "its features are not finite"
    sec = data["seconds"]
    if sec.shape != () or sec.dtype.kind not in "fiu" or not float(sec) >= 0:
        return "its seconds entry is not one non-negative number"
    if "images" in data:
        im = data["images"]
        if im.ndim < 1 or im.shape[0] > end - start or im.dtype.kind != "f":
            return f"its images have shape {im.shape} ({im.dtype}), more than its {end - start} samples or not floats"
    return None


def _read_chunks(folder: Path, dim: int | None = None) -> list[_Chunk]:
    """Every valid chunk of a cell folder, sorted by start.  A file that cannot be read or is not a
    chunk of this run is deleted with a warning naming it, so its samples are generated again."""
    out: list[_Chunk] = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("chunk_*.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            problem = _chunk_problem(p.name, data, dim)
        except FileNotFoundError:  # another process healed it first
            continue
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            problem = f"it cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        if problem is not None:
            warnings.warn(f"{p}: {problem}; deleting it, its samples will be generated again", stacklevel=3)
            p.unlink(missing_ok=True)
            continue
        out.append((int(data["start"]), int(data["end"]), data))
    out.sort(key=lambda c: (c[0], -c[1]))
    return out


def _cover(chunks: Sequence[_Chunk], n: int) -> tuple[list[tuple[int, int, _Chunk]], list[tuple[int, int]]]:
    """Take every index of ``[0, n)`` once from the chunks, which may overlap (runs with another
    batch size) or leave gaps: ``(pieces, gaps)``, pieces ``(lo, hi, chunk)`` in index order, each
    from the chunk covering ``lo`` that reaches furthest (the earliest-starting of equals)."""
    order = sorted(chunks, key=lambda c: (c[0], -c[1]))
    pieces: list[tuple[int, int, _Chunk]] = []
    gaps: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        best = None
        for c in order:
            if c[0] > pos:
                break
            if c[1] > pos and (best is None or c[1] > best[1]):
                best = c
        if best is None:
            nxt = min([c[0] for c in order if c[0] > pos] + [n])
            gaps.append((pos, nxt))
            pos = nxt
            continue
        hi = min(best[1], n)
        pieces.append((pos, hi, best))
        pos = hi
    return pieces, gaps


def _image_prefix(pieces: Sequence[tuple[int, int, _Chunk]]) -> list[np.ndarray]:
    """The kept images of the contiguous prefix ``[0, k)`` of sample indices."""
    parts, pos = [], 0
    for lo, hi, (s, _, c) in pieces:
        if lo != pos or "images" not in c:
            break
        top = min(hi, s + len(c["images"]))
        if top <= lo:
            break
        parts.append(c["images"][lo - s : top - s])
        pos = top
        if top < hi:
            break
    return parts


def _covered(folder: Path, dim: int | None = None) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _ in _read_chunks(folder, dim)]


def _missing(covered: Iterable[tuple[int, int]], n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches ``[k B, (k + 1) B)`` (clipped to uncovered gaps) that no chunk covers yet."""
    marks = np.zeros(n, dtype=bool)
    for s, e in covered:
        marks[s:e] = True
    out = []
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        i = start
        while i < end:
            if marks[i]:
                i += 1
                continue
            j = i
            while j < end and not marks[j]:
                j += 1
            out.append((i, j))
            i = j
    return out


def _read_error(folder: Path) -> str | None:
    """The error a cell recorded (``error.json``), or ``None``; an unreadable record is deleted with
    a warning, so the cell is tried again."""
    path = folder / "error.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("error"), str):
            return rec["error"]
        problem = 'it is not {"error": "..."}'
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        problem = f"it cannot be read ({err})"
    warnings.warn(f"{path}: {problem}; deleting it, the cell will be run again", stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def _model_key(denoiser: Any, model_id: str | None, temporary: bool) -> str:
    """What identifies the model in the manifest: ``model_id``, else a fingerprint of an
    ``nn.Module`` denoiser; a run folder that outlives the call needs one of the two."""
    if model_id is not None:
        return str(model_id)
    if isinstance(denoiser, torch.nn.Module):
        return f"{type(denoiser).__name__}-{module_fingerprint(denoiser)[:16]}"
    if temporary:
        return type(denoiser).__name__
    raise ValueError(
        f"pass model_id=... to name the model in {_MANIFEST}: the denoiser ({type(denoiser).__name__}) is not a "
        "torch.nn.Module whose weights fewstep could fingerprint, and a run folder is only reused for the same model "
        "(change the model_id whenever the model changes)"
    )


def _schedule_key(schedule: Any) -> str:
    """A digest of the schedule's plain-data description (its repr where it has none)."""
    try:
        text = json.dumps(schedule.config(), sort_keys=True, default=str)
    except NotImplementedError:
        text = repr(schedule)
    return f"{type(schedule).__name__}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _check_manifest(run_dir: Path, manifest: dict[str, Any], rank: int) -> None:
    path = run_dir / _MANIFEST
    if path.exists() or path.is_symlink():
        try:
            if not path.is_file() or path.is_symlink():
                raise ValueError("it is not a regular file")
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("it does not hold a JSON object")
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} cannot be read ({err}), so fewstep cannot tell which run the samples in {run_dir} belong to; "
                "delete that folder to start over, or use another run folder"
            ) from None
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k) and k not in _NOT_COMPARED)
        if diff:
            raise ValueError(
                f"{run_dir} holds a run with different settings ({', '.join(f'{k}: {old.get(k)!r} != {manifest.get(k)!r}' for k in diff)}); "
                "use another run folder, or delete this one to start over"
            )
    elif rank == 0:
        atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode())


def _as_progress(progress: bool | Callable[[str], None], total: int, rank: int) -> tuple[Callable[[str], None], Callable[[], None]]:
    if callable(progress):
        return progress, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="FID per NFE", unit="batch", disable=not progress or rank != 0)

    def tick(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    return tick, bar.close


def _failing_sample(denoiser: Any, shape: tuple[int, ...], name: str, nfe: int, seed: int, start: int, end: int,
                    schedule: Any, device: Any, dtype: torch.dtype, options: Mapping[str, Any]) -> tuple[int | None, str]:
    """The first index of ``[start, end)`` whose sample alone goes non-finite, and its error
    (``None`` if none does alone: then only the batch as a whole failed)."""
    for i in range(start, end):
        gens = sample_generators(seed, i, i + 1)
        noise = torch.randn(shape, generator=gens[0])[None]
        try:
            with torch.no_grad():
                fewstep.sample(denoiser, noise.to(device=device, dtype=dtype), name, nfe, schedule=schedule, generator=gens,
                               **options)
        except (NonFiniteError, FloatingPointError) as err:
            return i, str(err)
    return None, ""


def _cell_features(folder: Path, dim: int, n: int) -> tuple[np.ndarray, float]:
    """The (n, D) features of a cell in index order and the generation seconds they took."""
    pieces, gaps = _cover(_read_chunks(folder, dim), n)
    if gaps:
        raise RuntimeError(
            f"{folder} lacks samples {', '.join(f'[{a}, {b})' for a, b in gaps)} (another process deleted or "
            "is still writing them?); run fid_per_nfe again with this run folder to generate them"
        )
    feats, seconds = [], 0.0
    for lo, hi, (s, e, c) in pieces:
        feats.append(c["features"][lo - s : hi - s])
        seconds += float(c["seconds"]) * (hi - lo) / (e - s)  # a piece of a chunk: its share of the time
    return np.concatenate(feats), seconds


def fid_per_nfe(
    denoiser: Callable[..., torch.Tensor],
    *,
    shape: Sequence[int],
    samplers: Sequence[str],
    nfes: Sequence[int],
    reference: ReferenceStats,
    extractor: str | FeatureExtractor = "digits",
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 100,
    run_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    sampler_options: Mapping[str, Mapping[str, Any]] | None = None,
    schedule: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    keep_images: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    ode_reference: tuple[str, int] | None = None,
    bootstrap: int = DEFAULT_REPLICATES,
    retry_errors: bool = False,
    extra_metrics: Sequence[str] = (),
    progress: bool | Callable[[str], None] = True,
) -> FidTable:
    """FID and KID (and FD to the exact-ODE samples) for every (sampler, NFE) of the grid, each
    with a bootstrap interval; see the module docstring.

    Args:
        denoiser: ``denoiser(x, t) -> x0_hat`` with a ``.schedule`` (or pass ``schedule``), e.g.
            :func:`fewstep.models.embedded.digits_denoiser` or a ``DiffusersDenoiser``.
        shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        samplers, nfes: the grid (every sampler at every NFE; budgets a sampler cannot meet become
            rows with ``error`` set).
        reference: statistics of the real data under the same extractor
            (:func:`fewstep.eval.reference.reference_stats`).  Without its features (a foreign
            ``{mu, sigma}`` file) KID is NaN.
        extractor: a feature extractor or its name (:func:`fewstep.eval.features.get_extractor`).
        num_samples: samples per cell.  seed: the noise seed (sample ``i`` uses ``[seed, i]``).
        batch_size: samples per network batch, and the unit of checkpointing and sharding.
        run_dir: where samples' features are kept between runs (resume, growth); default a
            temporary folder removed at the end.
        model_id: a string naming the model in the manifest (a run folder is only reused for the
            same model; it must change whenever the weights change).  Default: for an
            ``nn.Module`` denoiser, a fingerprint of its state dict and settings
            (:func:`fewstep._util.module_fingerprint`, which reads every weight once: pass a
            ``model_id`` to skip that for a large model); other denoisers need an explicit
            ``model_id`` when a ``run_dir`` is given.
        sampler_options: per-sampler solver options, ``{"ddim": {"eta": 1.0}}``.
        device, dtype: where and in what dtype the network runs (noise is drawn on the CPU).
        keep_images: how many of the first samples of each cell to keep as images (sample grids).
        kid_subsets, kid_subset_size: KID's subset averaging.
        ode_reference: ``(sampler, nfe)`` of the model's many-step solution from the same noises
            (:data:`fewstep.eval.ode_reference.REPORT_ODE`); every row then gets ``fd_ode``.
        bootstrap: resamples of the sample indices behind every interval (0: no intervals).
        retry_errors: run the grid's cells that recorded an error again.
        extra_metrics: any of ``"precision_recall"`` (Kynkäänniemi et al. 2019, k = 3, needs the
            reference features), ``"inception_score"`` (needs an extractor with a classifier,
            ``logits_from_features``), ``"cmmd"`` (Jayasumana et al. 2024; meaningful on CLIP
            features): :mod:`fewstep.eval.extra_metrics`.  They land in ``FidRow.extra``.
        progress: a progress bar (``True``), none, or a callable receiving a message per batch.
    """
    from fewstep.eval.extra_metrics import check_extra_metrics, extra_metric_values

    ext = get_extractor(extractor, device=device)
    reference.check_extractor(ext)
    check_extra_metrics(extra_metrics, ext, reference)
    shape = tuple(int(s) for s in shape)
    if int(num_samples) < 2:
        raise ValueError(f"num_samples must be at least 2 (a covariance needs two samples), got {num_samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if int(bootstrap) < 0 or int(bootstrap) == 1:
        raise ValueError(f"bootstrap must be 0 (no intervals) or at least 2 resamples, got {bootstrap}")
    schedule = model_schedule(denoiser, schedule)
    dim = int(np.asarray(reference.mu).shape[0])  # the features' dimension: a chunk with another one is not ours
    options = {k: dict(v) for k, v in (sampler_options or {}).items()}
    unknown = set(options) - set(samplers)
    if unknown:
        raise ValueError(f"sampler_options names samplers not in the grid: {sorted(unknown)}")
    num_samples, batch_size = int(num_samples), int(batch_size)
    grid = [(name, int(nfe)) for name in samplers for nfe in nfes]
    ode_cell = None
    if ode_reference is not None:
        ode_cell = (str(ode_reference[0]), int(ode_reference[1]))
        if fewstep.spec(ode_cell[0]).stochastic:
            raise ValueError(f"the ODE reference must be a deterministic sampler, not {ode_cell[0]!r}")
    cells_to_run = grid + ([ode_cell] if ode_cell is not None and ode_cell not in grid else [])
    rank, world = maybe_init_distributed()

    temp = None
    if run_dir is None:
        if world > 1:
            raise ValueError("with several processes, pass a run_dir on a filesystem every process can see")
        temp = tempfile.mkdtemp(prefix="fewstep-fid-")
        run_dir = temp
    run = Path(run_dir)
    manifest = {
        "format": _FORMAT,
        "model": _model_key(denoiser, model_id, temporary=temp is not None),
        "schedule": _schedule_key(schedule),
        "shape": list(shape),
        "seed": int(seed),
        "extractor": ext.name,
        "dtype": str(dtype).replace("torch.", ""),
    }
    try:
        if rank == 0:
            run.mkdir(parents=True, exist_ok=True)
        barrier()
        _check_manifest(run, manifest, rank)

        # Plan: which cells are possible, which index ranges are missing.
        cells: dict[tuple[str, int], str] = {}
        errors: dict[tuple[str, int], str] = {}
        stochastic: dict[tuple[str, int], bool] = {}  # whether the cell's program draws noise (its options)
        work: list[tuple[str, int, int, int]] = []
        for name, _ in cells_to_run:
            fewstep.spec(name)  # an unknown name fails here, before any work
        if retry_errors and rank == 0:
            for name, nfe in cells_to_run:
                (run / "cells" / cell_key(name, nfe, options.get(name, {})) / "error.json").unlink(missing_ok=True)
        barrier()
        for name, nfe in cells_to_run:
            opts = options.get(name, {})
            key = cell_key(name, nfe, opts)
            cells[(name, nfe)] = key
            try:
                stochastic[(name, nfe)] = prepare(name, nfe, schedule, **opts).stochastic
            except ValueError as err:
                errors[(name, nfe)] = str(err)
                continue
            folder = run / "cells" / key
            recorded = _read_error(folder)
            if recorded is not None:
                errors[(name, nfe)] = recorded
                continue
            for s, e in _missing(_covered(folder, dim), num_samples, batch_size):
                work.append((name, nfe, s, e))
        barrier()  # every rank planned from the same files

        mine = [w for k, w in enumerate(work) if k % world == rank]
        tick, close = _as_progress(progress, len(mine), rank)
        generated = 0
        failed: set[tuple[str, int]] = set()
        try:
            for name, nfe, start, end in mine:
                if (name, nfe) in failed:
                    continue
                folder = run / "cells" / cells[(name, nfe)]
                gens = sample_generators(seed, start, end)
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        x, info = fewstep.sample(
                            denoiser, noise.to(device=device, dtype=dtype), name, nfe,
                            schedule=schedule, generator=gens, return_info=True, **options.get(name, {}),
                        )
                    stochastic[(name, nfe)] = info.stochastic
                except (NonFiniteError, FloatingPointError) as err:
                    index, alone = _failing_sample(denoiser, shape, name, nfe, seed, start, end, schedule, device, dtype,
                                                   options.get(name, {}))
                    where = (f"sample {index} (noise seed {seed}) goes non-finite: {alone}" if index is not None else
                             f"the batch of samples [{start}, {end}) goes non-finite, though each sample alone does not: {err}")
                    msg = f"{where}; after fixing the cause, rerun with retry_errors=True (fewstep report --retry-errors)"
                    atomic_write_bytes(folder / "error.json", json.dumps(
                        {"error": msg, "sample": index, "batch": [start, end]}).encode())
                    failed.add((name, nfe))
                    continue
                seconds = time.perf_counter() - t0
                x = x.to("cpu", torch.float32)
                feats = ext(x).numpy().astype(np.float32)
                arrays: dict[str, Any] = {"start": np.array(start), "end": np.array(end), "features": feats,
                                          "seconds": np.array(seconds)}
                if start < keep_images:
                    arrays["images"] = x[: max(0, min(end, keep_images) - start)].numpy()
                atomic_savez(folder / f"chunk_{start:08d}_{end:08d}.npz", **arrays)
                generated += end - start
                tick(f"{name} nfe={nfe} [{start}, {end})")
        finally:
            close()
        barrier()

        # Every rank reads all chunks and computes the same table (the bootstrap resamples are seeded).
        for key in cells_to_run:
            if key not in errors:
                recorded = _read_error(run / "cells" / cells[key])
                if recorded is not None:
                    errors[key] = recorded
        counts = bootstrap_counts(num_samples, bootstrap, seed) if bootstrap else None
        ode_feats = None
        ode_info = None
        if ode_cell is not None:
            ode_info = {"sampler": ode_cell[0], "nfe": ode_cell[1], "cell": cells[ode_cell], "error": errors.get(ode_cell, "")}
            if ode_cell not in errors:
                ode_feats = _cell_features(run / "cells" / cells[ode_cell], dim, num_samples)[0]
        ref_feats = reference.features
        ode_moments = None
        rows, reps = [], {m: {} for m, _ in METRICS}
        for name, nfe in grid:
            stoch = stochastic.get((name, nfe), fewstep.spec(name).stochastic)
            if (name, nfe) in errors:
                rows.append(FidRow(name, nfe, math.nan, math.nan, math.nan, 0, math.nan, stoch, errors[(name, nfe)]))
                continue
            feats, seconds = _cell_features(run / "cells" / cells[(name, nfe)], dim, num_samples)
            stats = RunningStats.from_features(feats)
            values = {"fid": frechet_distance(stats.mean, stats.cov, reference.mu, reference.sigma), "kid": math.nan,
                      "fd_ode": math.nan}
            kid_std = math.nan
            if ref_feats is not None:
                values["kid"], kid_std = kernel_inception_distance(feats, ref_feats, kid_subsets, kid_subset_size)
            if ode_feats is not None:
                values["fd_ode"] = frechet_distance_from_features(feats, ode_feats)
            row = FidRow(name, nfe, values["fid"], values["kid"], kid_std, num_samples, seconds / num_samples, stoch,
                         fd_ode=values["fd_ode"], extra=extra_metric_values(extra_metrics, feats, ref_feats, ext))
            if counts is not None:
                if ode_feats is not None and ode_moments is None and ode_feats.shape[0] >= ode_feats.shape[1]:
                    ode_moments = resampled_moments(ode_feats, counts)  # once for every cell
                r_fid, r_ode = fd_replicates(feats, counts, mu=reference.mu, sigma=reference.sigma, paired_with=ode_feats,
                                             paired_moments=ode_moments)
                kernel_ok = ref_feats is not None and max(num_samples, len(ref_feats)) <= MAX_KERNEL_SAMPLES
                cell_reps = {"fid": r_fid, "fd_ode": r_ode, "kid": mmd_replicates(feats, ref_feats, counts) if kernel_ok else None}
                if ref_feats is not None and not kernel_ok and math.isfinite(values["kid"]):
                    # N x N kernels do not fit: the subsets' spread scaled to the full sample
                    # (first-order U-statistic variance ~ 1/size); no paired comparison for KID.
                    m_sub = min(kid_subset_size, num_samples, len(ref_feats))
                    row.kid_se = kid_std * math.sqrt(m_sub / num_samples)
                    row.kid_lo, row.kid_hi = values["kid"] - Z95 * row.kid_se, values["kid"] + Z95 * row.kid_se
                for m, _ in METRICS:
                    if cell_reps[m] is None or not math.isfinite(values[m]):
                        continue
                    iv = interval(values[m], cell_reps[m], nonnegative=m != "kid")
                    setattr(row, f"{m}_se", iv.se)
                    setattr(row, f"{m}_lo", iv.lo)
                    setattr(row, f"{m}_hi", iv.hi)
                    reps[m][(name, nfe)] = cell_reps[m]
            rows.append(row)
        comparisons: dict[str, dict[int, Comparison]] = {m: {} for m, _ in METRICS}
        for m, _ in METRICS:
            for nfe in dict.fromkeys(n for _, n in grid):
                est = {r.sampler: getattr(r, m) for r in rows if r.nfe == nfe and (r.sampler, nfe) in reps[m]}
                comp = compare(est, {s: reps[m][(s, nfe)] for s in est}) if est else None
                if comp is not None:
                    comparisons[m][nfe] = comp
        ref_info = {"source": reference.source, "num_samples": reference.num_samples, "extractor": reference.extractor,
                    "has_features": reference.features is not None}
        table = FidTable(rows, run, ref_info, generated, ext.name, cells, comparisons, ode_info, int(bootstrap))
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return table
