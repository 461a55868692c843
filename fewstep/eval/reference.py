"""Reference statistics: features of real data, cached as ``.npz`` keyed by extractor and data.

A source is one of

* a tensor of images ``(N, C, H, W)`` in ``[-1, 1]``;
* a folder of image files (PNG, JPEG, ...; searched recursively, read in sorted order; grey images
  stay one channel, everything else is converted to RGB);
* ``"digits"``, ``"digits:train"`` or ``"digits:test"``: scikit-learn's 8x8 digits as the embedded
  model sees them (:func:`fewstep.models.embedded.digits_images`);
* an ``.npz`` file written by :meth:`ReferenceStats.save` (used as it is).

The cache file is ``<extractor name>__<source key>.npz`` in the cache folder (``$FEWSTEP_CACHE``,
default ``~/.cache/fewstep/stats``).  The source key names the data and fingerprints it (a hash of
the tensor's bytes; of the folder's file names, sizes and modification times), and the file records
the sample count, so stale or mismatched statistics are never picked up.  Files are written
atomically: an interrupted run leaves no half-written cache, and a cache file damaged some other
way (truncated by a copy, an object array, wrong shapes) is recomputed with a warning naming it.
Statistics files are read with ``allow_pickle=False``: nothing in them is unpickled.  Under ``torch.distributed`` each
process extracts the features of its share of the images and the shares are merged.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep._dist import rank_world
from fewstep._util import IMAGE_EXTENSIONS, atomic_savez, check_replaceable, image_files, load_images
from fewstep.eval.features import FeatureExtractor, get_extractor
from fewstep.eval.stats import RunningStats, as_features

__all__ = ["ReferenceStats", "reference_stats", "default_cache_dir", "image_files", "load_images", "IMAGE_EXTENSIONS"]

CACHE_ENV = "FEWSTEP_CACHE"
_DIGITS_SPLITS = {"digits": None, "digits:all": None, "digits:train": "train", "digits:test": "test"}


def default_cache_dir() -> Path:
    """``$FEWSTEP_CACHE/stats``, else ``~/.cache/fewstep/stats``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fewstep") / "stats"


@dataclass
class ReferenceStats:
    """Gaussian statistics (and the features, for KID) of a reference set under one extractor."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased covariance
    num_samples: int
    extractor: str  # the extractor's name
    source: str  # the source key
    features: np.ndarray | None = field(default=None, repr=False)  # (N, D) float32, for KID
    created: str = ""

    @classmethod
    def from_features(cls, features: Any, extractor: str, source: str) -> "ReferenceStats":
        f = as_features(features)
        stats = RunningStats.from_features(f)
        return cls(stats.mean, stats.cov, f.shape[0], extractor, source, f.astype(np.float32), time.strftime("%Y-%m-%d %H:%M"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``.npz``), atomically."""
        arrays: dict[str, Any] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_samples": np.array(self.num_samples),
            "extractor": np.array(self.extractor),
            "source": np.array(self.source),
            "created": np.array(self.created),
        }
        if self.features is not None:
            arrays["features"] = self.features
        atomic_savez(path, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read a file written by :meth:`save` (``allow_pickle=False``: object arrays are refused,
        nothing is unpickled); a file that is not one is a ``ValueError`` naming it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            problem = _stats_problem(data)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        if problem is not None:
            raise ValueError(
                f"{path} is not a fewstep reference-statistics file ({problem}); recompute it with "
                "fewstep.eval.reference.reference_stats(source, extractor) from the images, or delete it"
            ) from None
        return cls(
            data["mu"].astype(np.float64),
            data["sigma"].astype(np.float64),
            int(data["num_samples"]),
            str(data["extractor"]),
            str(data["source"]),
            data["features"] if "features" in data else None,
            str(data["created"]) if "created" in data else "",
        )

    def check_extractor(self, extractor: FeatureExtractor) -> None:
        if self.extractor != extractor.name:
            raise ValueError(
                f"these reference statistics were computed with extractor {self.extractor!r}, not {extractor.name!r}; "
                "compute them with the extractor you evaluate with"
            )


def _stats_problem(data: dict[str, np.ndarray]) -> str | None:
    """Why arrays read from a statistics file are not reference statistics (``None`` if they are)."""
    missing = [k for k in ("mu", "sigma", "num_samples", "extractor", "source") if k not in data]
    if missing:
        return f"it lacks {', '.join(missing)}"
    mu, sigma, n = data["mu"], data["sigma"], data["num_samples"]
    if mu.ndim != 1 or mu.dtype.kind != "f" or sigma.shape != (mu.shape[0], mu.shape[0]) or sigma.dtype.kind != "f":
        return f"mu {mu.shape} and sigma {sigma.shape} are not a mean (D,) and a covariance (D, D) of floats"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu or sigma is not finite"
    if n.shape != () or n.dtype.kind not in "iu" or int(n) < 2:
        return f"num_samples is {n!r}, not a count of at least 2"
    for k in ("extractor", "source", "created"):
        if k in data and (data[k].shape != () or data[k].dtype.kind != "U"):
            return f"{k} is not a string"
    if "features" in data:
        f = data["features"]
        if f.ndim != 2 or f.shape != (int(n), mu.shape[0]) or f.dtype.kind != "f" or not np.isfinite(f).all():
            return f"features {f.shape} are not {int(n)} finite rows of {mu.shape[0]} floats"
    return None


def _folder_key(folder: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"folder-{folder.name}-{h.hexdigest()[:16]}-n{len(files)}"


def _tensor_key(images: torch.Tensor) -> str:
    t = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return f"tensor-{'x'.join(map(str, t.shape[1:]))}-{h}-n{t.shape[0]}"


def _batches(n: int, batch_size: int, rank: int, world: int) -> Iterator[tuple[int, int]]:
    """This process's share of ``[0, n)`` in batches: batch ``k`` goes to rank ``k % world``."""
    for k, start in enumerate(range(0, n, batch_size)):
        if k % world == rank:
            yield start, min(start + batch_size, n)


def _extract(
    n: int, get: Callable[[int, int], torch.Tensor], extractor: FeatureExtractor, batch_size: int, progress: bool, desc: str
) -> np.ndarray:
    """Features of items ``[0, n)`` (``get(start, end)`` gives images), sharded over processes and
    gathered in index order on every process."""
    from tqdm.auto import tqdm

    rank, world = rank_world()
    mine = list(_batches(n, batch_size, rank, world))
    parts = []
    for start, end in tqdm(mine, desc=desc, disable=not progress or rank != 0, leave=False):
        parts.append((start, extractor(get(start, end)).numpy().astype(np.float32)))
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for g in gathered for p in g]
    parts.sort(key=lambda p: p[0])
    return np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 0), np.float32)


def reference_stats(
    source: torch.Tensor | str | os.PathLike,
    extractor: str | FeatureExtractor = "digits",
    *,
    cache_dir: str | os.PathLike | None | bool = True,
    batch_size: int = 256,
    progress: bool = False,
) -> ReferenceStats:
    """Reference statistics of ``source`` (see the module docstring) under ``extractor``, from the
    cache when present.  ``cache_dir``: ``True`` for :func:`default_cache_dir`, a folder, or
    ``False``/``None`` to neither read nor write a cache."""
    ext = get_extractor(extractor)
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz") and Path(source).is_file():
        ref = ReferenceStats.load(source)
        ref.check_extractor(ext)
        return ref
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise ValueError(f"a reference tensor must hold images (N, C, H, W) in [-1, 1], got shape {tuple(source.shape)}")
        key = _tensor_key(source)
        n, get = source.shape[0], (lambda s, e: source[s:e].to(torch.float32))
    elif isinstance(source, str) and source.strip().lower() in _DIGITS_SPLITS:
        from fewstep.models.embedded import digits_images

        split = _DIGITS_SPLITS[source.strip().lower()]
        images = digits_images(split)
        key = f"digits-{split or 'all'}-n{images.shape[0]}"
        n, get = images.shape[0], (lambda s, e: images[s:e])
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(
                f"reference source {str(source)!r} is neither a folder of images, a statistics .npz file, nor one of "
                f"{', '.join(_DIGITS_SPLITS)}"
            )
        files = image_files(folder)
        key = _folder_key(folder, files)
        n, get = len(files), (lambda s, e: load_images(files[s:e]))
    else:
        raise TypeError(f"source must be an image tensor, a folder, a .npz file or 'digits[:split]', got {type(source).__name__}")
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")

    cache: Path | None = None
    if cache_dir is True:
        cache = default_cache_dir()
    elif cache_dir:
        cache = Path(cache_dir)
    path = cache / f"{ext.name}__{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        try:
            ref = ReferenceStats.load(path)
        except ValueError as err:  # truncated or not ours: recompute (the save below replaces it atomically)
            warnings.warn(f"the cached reference statistics are damaged, recomputing them: {err}", stacklevel=2)
        else:
            if ref.num_samples == n and ref.extractor == ext.name and ref.source == key:
                return ref
    if path is not None:
        check_replaceable(path)  # a folder or a link where the cache goes: say so before extracting features
    features = _extract(n, get, ext, batch_size, progress, f"reference features ({key})")
    ref = ReferenceStats.from_features(features, ext.name, key)
    rank, _ = rank_world()
    if path is not None and rank == 0:
        ref.save(path)
    return ref
