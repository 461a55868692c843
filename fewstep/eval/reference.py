"""Reference statistics: features of real data, cached as ``.npz`` keyed by extractor and data.

A source is one of

* a tensor of images ``(N, C, H, W)`` in ``[-1, 1]``;
* a folder of image files (PNG, JPEG, ...; searched recursively, read in sorted order; grey images
  stay one channel, everything else is converted to RGB), or a ``.zip`` archive of them (EDM's and
  StyleGAN's dataset format; members read in sorted order, never extracted to disk).  Images of
  different sizes are allowed: they are grouped by size and each group goes to the extractor as
  it is, so every image is resized once, from its own size, by the extractor's own resize (for
  Inception in clean mode PIL bicubic to 299x299, exactly clean-fid's ``make_custom_stats``); an
  extractor of one fixed input size (the digits network) refuses other sizes;
* ``"digits"``, ``"digits:train"`` or ``"digits:test"``: scikit-learn's 8x8 digits as the embedded
  model sees them (:func:`fewstep.models.embedded.digits_images`);
* an ``.npz`` file written by :meth:`ReferenceStats.save` (used as it is), or a *foreign*
  ``{mu, sigma}`` file: clean-fid's ``make_custom_stats`` / its downloadable statistics, EDM's
  ``fid-refs/*.npz``, or torch-fidelity statistics saved with ``np.savez(path, mu=..., sigma=...)``
  (torch-fidelity's own cache files are pickles, which fewstep does not read).  Such a file does not
  say which network made it, so it is accepted only with ``foreign=True`` (``fewstep report``:
  ``--extractor`` given explicitly), taken to be of the extractor named, checked against its
  feature dimension, and has no features: KID, precision/recall and CMMD are unavailable with it.

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
from collections.abc import Callable, Sequence
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
    note: str = ""  # how the statistics were made, when the report should say so (foreign file, mixed sizes)

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
    def load(cls, path: str | os.PathLike, foreign_extractor: str | None = None) -> "ReferenceStats":
        """Read a file written by :meth:`save` (``allow_pickle=False``: object arrays are refused,
        nothing is unpickled); a file that is not one is a ``ValueError`` naming it.  With
        ``foreign_extractor`` (the name of the extractor the file was made with, as the caller
        states it), a clean-fid / EDM / torch-fidelity ``{mu, sigma}`` file is read too."""
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            if is_foreign_stats(data):
                problem = _foreign_problem(data)
                if problem is None:
                    if foreign_extractor is None:
                        raise ValueError(
                            f"{path} holds only mu and sigma (clean-fid / EDM / torch-fidelity statistics) and does not say "
                            "which feature network made them; name it: fewstep report --extractor NAME (e.g. inception-tf "
                            "for EDM's and most papers' statistics, inception for clean-fid's clean mode), or "
                            "reference_stats(path, extractor, foreign=True)"
                        )
                    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                    digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:16]
                    return cls(mu, sigma, 0, str(foreign_extractor), f"npz-{Path(path).name}-{digest}", None, "",
                               f"Reference statistics: `{Path(path).name}`, a {{mu, sigma}} file from another tool, taken to be "
                               f"of the extractor named on the command line (`{foreign_extractor}`); it holds no features, so "
                               "KID is unavailable and FID has no reference-side uncertainty.")
            else:
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
        dim = getattr(extractor, "dim", None)
        if dim is not None and int(np.asarray(self.mu).shape[0]) != int(dim):
            raise ValueError(
                f"the reference statistics ({self.source}) have {np.asarray(self.mu).shape[0]} dimensions, but the extractor "
                f"{extractor.name!r} gives {dim}: they were made with another feature network"
            )


def is_foreign_stats(data: dict[str, np.ndarray]) -> bool:
    """Whether the arrays of an ``.npz`` are a ``{mu, sigma}`` file of another tool (not ours)."""
    return "mu" in data and "sigma" in data and "extractor" not in data


def _foreign_problem(data: dict[str, np.ndarray]) -> str | None:
    mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or mu.dtype.kind != "f" or sigma.shape != (mu.shape[0], mu.shape[0]) or sigma.dtype.kind != "f":
        return f"mu {mu.shape} and sigma {sigma.shape} are not a mean (D,) and a covariance (D, D) of floats"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu or sigma is not finite"
    return None


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


class _ImageItems:
    """The image files of a folder, or the image members of a ``.zip`` archive, in sorted order:
    their cache key, the ``(C, H, W)`` of each (from the headers: nothing is decoded) and the
    images at a list of indices (:func:`fewstep._util.load_images`, which takes files and
    file-like objects alike)."""

    def __init__(self, source: Path):
        self.source = source
        self.zip: zipfile.ZipFile | None = None
        if source.is_dir():
            self.items: list[Any] = image_files(source)
            h = hashlib.sha256()
            for p in self.items:
                st = p.stat()
                h.update(f"{p.relative_to(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            kind = "folder"
        else:
            try:
                self.zip = zipfile.ZipFile(source)
            except (OSError, zipfile.BadZipFile) as err:
                raise ValueError(f"{source} is not a readable zip archive of images ({err})") from None
            self.items = sorted(i.filename for i in self.zip.infolist()
                                if not i.is_dir() and Path(i.filename).suffix.lower() in IMAGE_EXTENSIONS)
            if not self.items:
                raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the zip archive {source}")
            st = source.stat()
            h = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
            for name in self.items:
                h.update(f"{name}\0{self.zip.getinfo(name).CRC}\n".encode())
            kind = "zip"
        self.key = f"{kind}-{source.stem if kind == 'zip' else source.name}-{h.hexdigest()[:16]}-n{len(self.items)}"

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, i: int) -> Any:
        if self.zip is None:
            return self.items[i]
        import io

        return io.BytesIO(self.zip.read(self.items[i]))

    def shapes(self) -> list[tuple[int, int, int]]:
        from PIL import Image

        out = []
        for i in range(len(self.items)):
            with Image.open(self._open(i)) as im:
                w, h = im.size
                out.append((1 if im.mode == "L" else 3, h, w))
        return out

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return load_images([self._open(i) for i in indices])


def _tensor_key(images: torch.Tensor) -> str:
    t = images.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    return f"tensor-{'x'.join(map(str, t.shape[1:]))}-{h}-n{t.shape[0]}"


def _size_batches(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size`` images of one size each (groups in order of first
    appearance, indices in order within a group)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, shp in enumerate(shapes):
        groups.setdefault(tuple(shp), []).append(i)
    return [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def _extract(
    n: int, batches: Sequence[Sequence[int]], get: Callable[[Sequence[int]], torch.Tensor], extractor: FeatureExtractor,
    progress: bool, desc: str,
) -> np.ndarray:
    """Features of items ``[0, n)`` (``get(indices)`` gives the images of one batch), batch ``k``
    on rank ``k % world``, gathered in index order on every process."""
    from tqdm.auto import tqdm

    rank, world = rank_world()
    mine = [b for k, b in enumerate(batches) if k % world == rank]
    parts = []
    for idx in tqdm(mine, desc=desc, disable=not progress or rank != 0, leave=False):
        parts.append((list(idx), extractor(get(idx)).numpy().astype(np.float32)))
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = [p for g in gathered for p in g]
    if not parts:
        return np.zeros((0, 0), np.float32)
    out = np.zeros((n, parts[0][1].shape[1]), np.float32)
    for idx, f in parts:
        out[idx] = f
    return out


def reference_stats(
    source: torch.Tensor | str | os.PathLike,
    extractor: str | FeatureExtractor = "digits",
    *,
    cache_dir: str | os.PathLike | None | bool = True,
    batch_size: int = 256,
    progress: bool = False,
    foreign: bool = False,
) -> ReferenceStats:
    """Reference statistics of ``source`` (see the module docstring) under ``extractor``, from the
    cache when present.  ``cache_dir``: ``True`` for :func:`default_cache_dir`, a folder, or
    ``False``/``None`` to neither read nor write a cache.  ``foreign=True`` accepts a clean-fid /
    EDM / torch-fidelity ``{mu, sigma}`` file as statistics of ``extractor``."""
    ext = get_extractor(extractor)
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz") and Path(source).is_file():
        ref = ReferenceStats.load(source, foreign_extractor=ext.name if foreign else None)
        ref.check_extractor(ext)
        return ref
    note = ""
    if isinstance(source, torch.Tensor):
        if source.ndim != 4:
            raise ValueError(f"a reference tensor must hold images (N, C, H, W) in [-1, 1], got shape {tuple(source.shape)}")
        key = _tensor_key(source)
        n = source.shape[0]
        batches = [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]
        get: Callable[[Sequence[int]], torch.Tensor] = lambda idx: source[idx[0] : idx[-1] + 1].to(torch.float32)  # noqa: E731
    elif isinstance(source, str) and source.strip().lower() in _DIGITS_SPLITS:
        from fewstep.models.embedded import digits_images

        split = _DIGITS_SPLITS[source.strip().lower()]
        images = digits_images(split)
        key = f"digits-{split or 'all'}-n{images.shape[0]}"
        n = images.shape[0]
        batches = [list(range(k, min(k + batch_size, n))) for k in range(0, n, batch_size)]
        get = lambda idx: images[idx[0] : idx[-1] + 1]  # noqa: E731
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not (path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")):
            raise ValueError(
                f"reference source {str(source)!r} is neither a folder of images, a .zip archive of images, a statistics "
                f".npz file, nor one of {', '.join(_DIGITS_SPLITS)}"
            )
        items = _ImageItems(path)
        key, n = items.key, len(items)
        shapes = items.shapes()
        batches = _size_batches(shapes, batch_size)
        sizes = sorted(set(shapes))
        if len(sizes) > 1:
            shown = ", ".join(f"{c}x{h}x{w}" for c, h, w in sizes[:3]) + (f" and {len(sizes) - 3} more" if len(sizes) > 3 else "")
            note = (f"Reference images: {n} images in {len(sizes)} sizes ({shown}); each goes to the extractor at its own size "
                    "and is resized once by the extractor's own resize (for Inception in clean mode: PIL bicubic to 299x299, "
                    "as clean-fid's make_custom_stats does).")
        get = items.load
    else:
        raise TypeError(f"source must be an image tensor, a folder, a .zip or .npz file or 'digits[:split]', got {type(source).__name__}")
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {n}")

    cache: Path | None = None
    if cache_dir is True:
        cache = default_cache_dir()
    elif cache_dir:
        cache = Path(cache_dir)
    path_ = cache / f"{ext.name}__{key}.npz" if cache is not None else None
    if path_ is not None and path_.is_file():
        try:
            ref = ReferenceStats.load(path_)
        except ValueError as err:  # truncated or not ours: recompute (the save below replaces it atomically)
            warnings.warn(f"the cached reference statistics are damaged, recomputing them: {err}", stacklevel=2)
        else:
            if ref.num_samples == n and ref.extractor == ext.name and ref.source == key:
                ref.note = note
                return ref
    if path_ is not None:
        check_replaceable(path_)  # a folder or a link where the cache goes: say so before extracting features
    features = _extract(n, batches, get, ext, progress, f"reference features ({key})")
    ref = ReferenceStats.from_features(features, ext.name, key)
    ref.note = note
    rank, _ = rank_world()
    if path_ is not None and rank == 0:
        ref.save(path_)
    return ref
