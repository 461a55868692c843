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
  ``run_dir/cells/<cell>/chunk_<start>_<end>.npz`` atomically (temporary file, then rename) as soon
  as the batch is done; a new call with the same ``run_dir`` generates only the index ranges no
  chunk covers.  A killed run loses at most the batches in flight.  ``run_dir/manifest.json``
  records what the samples depend on (the model -- its ``model_id``, or a fingerprint of an
  ``nn.Module`` denoiser's weights and settings --, the schedule, shape, seed, sample count,
  extractor, dtype) and a mismatching run folder is refused rather than mixed.
* **Sharded.**  Under ``torch.distributed`` (started by ``torchrun``, by ``accelerate launch
  --multi_gpu``, which sets the same environment, or initialised by the caller, e.g. through
  ``accelerate.PartialState``; gloo on CPU) batch ``k`` of the work list goes to rank
  ``k % world_size``; ranks write chunks into the shared
  ``run_dir`` and every rank computes the same table after a barrier.

FID is the Fréchet distance of the Gaussian fits (:mod:`fewstep.eval.frechet`, statistics folded in
chunk by chunk with :class:`fewstep.eval.stats.RunningStats`); KID is
:func:`fewstep.eval.kid.kernel_inception_distance` against the reference features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fewstep
from fewstep._dist import barrier, maybe_init_distributed
from fewstep._util import module_fingerprint, seeded_generator
from fewstep.eval.features import FeatureExtractor, get_extractor
from fewstep.eval.frechet import frechet_distance
from fewstep.eval.kid import kernel_inception_distance
from fewstep.eval.reference import ReferenceStats
from fewstep.eval.stats import RunningStats, atomic_savez, atomic_write_bytes
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
    them; ``error`` says why a cell has no numbers (an impossible budget, non-finite samples)."""

    sampler: str
    nfe: int
    fid: float
    kid: float
    kid_std: float
    num_samples: int
    seconds_per_sample: float
    stochastic: bool
    error: str = ""


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

    def row(self, sampler: str, nfe: int) -> FidRow:
        for r in self.rows:
            if r.sampler == sampler and r.nfe == nfe:
                return r
        raise KeyError(f"no row for ({sampler!r}, {nfe})")

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def _chunks(self, sampler: str, nfe: int) -> list[dict[str, np.ndarray]]:
        return [c for _, _, c in _read_chunks(self.run_dir / "cells" / self.cells[(sampler, nfe)])]

    def features(self, sampler: str, nfe: int) -> np.ndarray:
        """The (N, F) features of a cell, in sample-index order."""
        return np.concatenate([c["features"] for c in self._chunks(sampler, nfe)])

    def images(self, sampler: str, nfe: int) -> torch.Tensor:
        """The first ``keep_images`` samples of a cell, in index order."""
        parts = [c["images"] for c in self._chunks(sampler, nfe) if "images" in c and len(c["images"])]
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)


def _read_chunks(folder: Path) -> list[tuple[int, int, dict[str, np.ndarray]]]:
    out = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("chunk_*.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):  # not ours or damaged outside our atomic writes: redo it
            p.unlink(missing_ok=True)
            continue
        out.append((int(data["start"]), int(data["end"]), data))
    out.sort(key=lambda c: c[0])
    return out


def _covered(folder: Path) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _ in _read_chunks(folder)]


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
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
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
    progress: bool | Callable[[str], None] = True,
) -> FidTable:
    """FID and KID for every (sampler, NFE) of the grid; see the module docstring.

    Args:
        denoiser: ``denoiser(x, t) -> x0_hat`` with a ``.schedule`` (or pass ``schedule``), e.g.
            :func:`fewstep.models.embedded.digits_denoiser` or a ``DiffusersDenoiser``.
        shape: the shape of one sample, e.g. ``(1, 8, 8)``.
        samplers, nfes: the grid (every sampler at every NFE; budgets a sampler cannot meet become
            rows with ``error`` set).
        reference: statistics of the real data under the same extractor
            (:func:`fewstep.eval.reference.reference_stats`).
        extractor: a feature extractor or its name (:func:`fewstep.eval.features.get_extractor`).
        num_samples: samples per cell.  seed: the noise seed (sample ``i`` uses ``[seed, i]``).
        batch_size: samples per network batch, and the unit of checkpointing and sharding.
        run_dir: where samples' features are kept between runs (resume); default a temporary
            folder removed at the end.
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
        progress: a progress bar (``True``), none, or a callable receiving a message per batch.
    """
    ext = get_extractor(extractor, device=device)
    reference.check_extractor(ext)
    shape = tuple(int(s) for s in shape)
    if int(num_samples) < 2:
        raise ValueError(f"num_samples must be at least 2 (a covariance needs two samples), got {num_samples}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    schedule = model_schedule(denoiser, schedule)
    options = {k: dict(v) for k, v in (sampler_options or {}).items()}
    unknown = set(options) - set(samplers)
    if unknown:
        raise ValueError(f"sampler_options names samplers not in the grid: {sorted(unknown)}")
    num_samples, batch_size = int(num_samples), int(batch_size)
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
        "num_samples": num_samples,
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
        for name in samplers:
            fewstep.spec(name)  # an unknown name fails here, before any work
            for nfe in nfes:
                opts = options.get(name, {})
                key = cell_key(name, int(nfe), opts)
                cells[(name, int(nfe))] = key
                try:
                    stochastic[(name, int(nfe))] = prepare(name, int(nfe), schedule, **opts).stochastic
                except ValueError as err:
                    errors[(name, int(nfe))] = str(err)
                    continue
                folder = run / "cells" / key
                if (folder / "error.json").is_file():
                    errors[(name, int(nfe))] = json.loads((folder / "error.json").read_text())["error"]
                    continue
                for s, e in _missing(_covered(folder), num_samples, batch_size):
                    work.append((name, int(nfe), s, e))
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
                    atomic_write_bytes(folder / "error.json", json.dumps({"error": str(err)}).encode())
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

        # Every rank reads all chunks and computes the same table.
        rows = []
        for name in samplers:
            for nfe in nfes:
                key, nfe = cells[(name, int(nfe))], int(nfe)
                stoch = stochastic.get((name, nfe), fewstep.spec(name).stochastic)
                folder = run / "cells" / key
                if (folder / "error.json").is_file() and (name, nfe) not in errors:
                    errors[(name, nfe)] = json.loads((folder / "error.json").read_text())["error"]
                if (name, nfe) in errors:
                    rows.append(FidRow(name, nfe, math.nan, math.nan, math.nan, 0, math.nan, stoch, errors[(name, nfe)]))
                    continue
                chunks = _read_chunks(folder)
                stats, feats, seconds, count = RunningStats(), [], 0.0, 0
                for s, e, c in chunks:
                    if s != count:
                        raise RuntimeError(f"internal error: {folder} has a gap or overlap at index {count} (chunk starts at {s})")
                    stats.update(c["features"])
                    feats.append(c["features"])
                    seconds += float(c["seconds"])
                    count = e
                if count != num_samples:
                    raise RuntimeError(f"internal error: {folder} covers {count} of {num_samples} samples")
                fid = frechet_distance(stats.mean, stats.cov, reference.mu, reference.sigma)
                kid = kid_std = math.nan
                if reference.features is not None:
                    kid, kid_std = kernel_inception_distance(np.concatenate(feats), reference.features, kid_subsets, kid_subset_size)
                rows.append(FidRow(name, nfe, fid, kid, kid_std, num_samples, seconds / num_samples, stoch))
        ref_info = {"source": reference.source, "num_samples": reference.num_samples, "extractor": reference.extractor}
        table = FidTable(rows, run, ref_info, generated, ext.name, cells)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return table
