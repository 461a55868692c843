"""Training data at scale: image-text pairs and precomputed latents read by index, decoded in
DataLoader workers, sharded over ranks, resumable at the exact position, never loaded whole.

Sources (anything with ``len()``, ``read(i)`` and ``fingerprint()``):

* :class:`ImageTextFolder`: ``name.png`` (any image extension) next to ``name.txt`` (its caption).
* :class:`TarShards`: webdataset-layout ``.tar`` shards (members ``<key>.<ext>``: an image and a
  ``.txt`` / ``.caption`` caption per key).  Read with the standard library's ``tarfile``: the
  members' offsets are indexed once (headers only), then each example is one seek and one read.
  The ``webdataset`` package is not used: it reads shards front to back and keeps no position,
  so a run could only resume by re-reading and skipping, and what each rank sees would depend on
  the number of workers; random access by index gives the exact position of the stream as one
  number and the same stream for any number of processes.
* :class:`HFImageText`: a map-style Hugging Face ``datasets.Dataset`` (memory-mapped Arrow files:
  nothing is held in memory).  A streaming ``IterableDataset`` has no random access and is refused
  with what to do instead.

**The stream.**  Example positions ``p = 0, 1, 2, ...`` run over epochs of ``N`` examples; epoch
``e`` visits the examples in the order of a permutation drawn from ``(seed, e)``.  Training step
``s`` consumes positions ``s B .. (s + 1) B - 1`` (``B`` the global batch), and the sample with
global index ``j`` in the step (the trainer's index: ``(micro * world + rank) * local + i``) is
position ``s B + j``.  So two ranks never read the same position, within an epoch no example is
read twice, the position after step ``s`` is ``s B`` (saved in the checkpoint with the source's
fingerprint), a resumed run reads exactly what an uninterrupted one would, and the stream does not
depend on the number of processes.  Decoding (PIL, resize of the shorter side with bilinear
filtering, centre crop, optional flip from a per-position hash) runs in ``num_workers`` DataLoader
worker processes.

:class:`ImageTextData` encodes each micro-batch on the training device with the teacher
pipeline's VAE and text encoders (:class:`fewstep.distill.encode.PipelineEncoder`);
:func:`precompute` writes those encodings once as safetensors shards, which :class:`LatentShards`
reads for later runs (memory-mapped slices).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep._util import IMAGE_EXTENSIONS, atomic_write_json, derived_seed, seeded_generator

__all__ = [
    "ImageTextFolder",
    "TarShards",
    "HFImageText",
    "ImageTextData",
    "LatentShards",
    "precompute",
    "decode_image",
    "LATENT_FORMAT",
]

LATENT_FORMAT = "fewstep-latents/1"
CAPTION_EXTENSIONS = (".txt", ".caption")


def _digest(parts: Sequence[str]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Sources: examples by index
# ---------------------------------------------------------------------------------------------


class ImageTextFolder:
    """Image files under ``folder`` (recursive, sorted) each with a caption file of the same
    stem (``a/cat.png`` + ``a/cat.txt``).  An image without a caption is an error naming it
    (``missing_caption="empty"`` trains it with the empty prompt instead)."""

    def __init__(self, folder: str | os.PathLike, missing_caption: str = "error"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder} is not a folder of image-caption pairs")
        if missing_caption not in ("error", "empty"):
            raise ValueError(f"missing_caption must be 'error' or 'empty', got {missing_caption!r}")
        images = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not images:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.folder}")
        self.items: list[tuple[Path, Path | None]] = []
        self._fingerprint: str | None = None
        lacking = []
        for img in images:
            cap = next((img.with_suffix(e) for e in CAPTION_EXTENSIONS if img.with_suffix(e).is_file()), None)
            if cap is None:
                lacking.append(str(img.relative_to(self.folder)))
            self.items.append((img, cap))
        if lacking and missing_caption == "error":
            shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
            raise ValueError(f"{self.folder}: {len(lacking)} image(s) have no caption file ({'/'.join(CAPTION_EXTENSIONS)} "
                             f"with the same name): {shown}; add them, or pass missing_caption='empty'")

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> tuple[bytes, str]:
        img, cap = self.items[i]
        return img.read_bytes(), (cap.read_text(encoding="utf-8").strip() if cap is not None else "")

    def fingerprint(self) -> str:
        """Names, sizes and modification times of every file, hashed once (a resumed run builds
        its source anew, so a change between runs is seen; checkpoints do not stat 10^6 files)."""
        if self._fingerprint is None:
            parts = []
            for img, cap in self.items:
                for p in (img, cap):
                    if p is not None:
                        st = p.stat()
                        parts.append(f"{p.relative_to(self.folder)}:{st.st_size}:{st.st_mtime_ns}")
            self._fingerprint = "folder:" + _digest(parts)
        return self._fingerprint


class TarShards:
    """Webdataset-layout tar shards read by index (see the module docstring).  ``shards``: tar
    files, or one folder (its ``*.tar`` files, sorted).  A key is a member's path up to the first
    dot of its file name (webdataset's rule); keys without an image or without a caption are an
    error naming the shard (``missing_caption="empty"``: the empty prompt)."""

    def __init__(self, shards: str | os.PathLike | Sequence[str | os.PathLike], missing_caption: str = "error"):
        if isinstance(shards, (str, os.PathLike)) and Path(shards).is_dir():
            files = sorted(Path(shards).glob("*.tar"))
        elif isinstance(shards, (str, os.PathLike)):
            files = [Path(shards)]
        else:
            files = [Path(s) for s in shards]
        if not files:
            raise ValueError(f"no .tar shards in {shards}")
        self.files = files
        rows = []  # (shard, image offset, image size, caption offset, caption size)
        for k, f in enumerate(files):
            try:
                with tarfile.open(f, mode="r:") as tar:  # uncompressed only: random access needs offsets
                    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for m in tar:
                        if not m.isfile():
                            continue
                        head, _, name = m.name.rpartition("/")
                        stem, dot, ext = name.partition(".")
                        if dot:
                            groups.setdefault(f"{head}/{stem}", {})[ext.lower()] = m
            except (tarfile.TarError, OSError) as err:
                raise ValueError(f"{f} is not a readable uncompressed tar shard ({err})") from None
            for key, members in groups.items():
                img = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
                cap = next((members[e[1:]] for e in CAPTION_EXTENSIONS if e[1:] in members), None)
                if img is None:
                    continue  # metadata-only keys (json, ...) carry no training example
                if cap is None and missing_caption == "error":
                    raise ValueError(f"{f}: {key} has an image but no caption ({'/'.join(CAPTION_EXTENSIONS)}); "
                                     "fix the shard, or pass missing_caption='empty'")
                rows.append((k, img.offset_data, img.size, cap.offset_data if cap else -1, cap.size if cap else 0))
        if not rows:
            raise ValueError(f"no image-caption pairs in {len(files)} shard(s)")
        self.index = np.asarray(rows, dtype=np.int64)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def _file(self, k: int) -> Any:
        if self._pid != os.getpid():  # a DataLoader worker: its own file handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = open(self.files[k], "rb")
        return self._handles[k]

    def read(self, i: int) -> tuple[bytes, str]:
        k, io_, isz, co, csz = (int(v) for v in self.index[i])
        f = self._file(k)
        f.seek(io_)
        image = f.read(isz)
        caption = ""
        if co >= 0:
            f.seek(co)
            caption = f.read(csz).decode("utf-8").strip()
        return image, caption

    def fingerprint(self) -> str:
        return "tar:" + _digest([f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.files] + [str(len(self))])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: no open files across processes
        return {**self.__dict__, "_handles": {}}


class HFImageText:
    """A map-style Hugging Face ``datasets.Dataset`` (or anything with ``len()`` and ``ds[i] ->
    dict``) of images (PIL images, ``{"bytes": ...}`` or raw bytes) and captions."""

    def __init__(self, dataset: Any, image_column: str = "image", caption_column: str = "text", fingerprint: str | None = None):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise ValueError(
                f"{type(dataset).__name__} has no random access (a streaming datasets.IterableDataset?): fewstep resumes a "
                "stream at an exact position by index; load the dataset without streaming=True (its Arrow files are "
                "memory-mapped, nothing is held in memory), or write it as tar shards (TarShards)"
            )
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self._fingerprint = fingerprint if fingerprint is not None else str(getattr(dataset, "_fingerprint", "")) or None
        if self._fingerprint is None:
            raise ValueError("pass fingerprint=... (a string naming this dataset's version): it has no _fingerprint, and "
                             "a resumed run must be able to tell that its data did not change")

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, i: int) -> tuple[Any, str]:
        row = self.dataset[int(i)]
        image = row[self.image_column]
        if isinstance(image, dict):
            image = image.get("bytes")
        return image, str(row[self.caption_column] or "")

    def fingerprint(self) -> str:
        return f"hf:{self._fingerprint}:{len(self)}"


# ---------------------------------------------------------------------------------------------
# Decoding (in DataLoader workers)
# ---------------------------------------------------------------------------------------------


def decode_image(raw: Any, resolution: int, center_crop: bool = True, flip: bool = False) -> dict[str, torch.Tensor]:
    """One example's pixels: RGB, shorter side resized to ``resolution`` (bilinear, as diffusers'
    LCM scripts), a centre crop (``center_crop=False``: the top-left crop) to ``resolution`` squared,
    optionally flipped, as (3, R, R) float32 in [-1, 1]; with SDXL's micro-conditioning inputs
    ``original_size`` (h, w before resizing) and ``crop_top_left`` (top, left of the crop)."""
    from PIL import Image

    img = raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(raw))
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BILINEAR)
    top, left = (int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))) if center_crop else (0, 0)
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    if flip:
        x = x.flip(-1)
    return {"pixels": x, "original_size": torch.tensor([h, w]), "crop_top_left": torch.tensor([top, left])}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], dict):
            out[k] = _collate(vals)
        else:
            out[k] = vals
    return out


# ---------------------------------------------------------------------------------------------
# The stream (positions -> examples), shared by image-text data and latent shards
# ---------------------------------------------------------------------------------------------


class _Positions(torch.utils.data.Dataset):
    """Map-style view of the stream: item ``p`` is the example at position ``p``."""

    def __init__(self, owner: "_IndexedStream", seed: int):
        self.owner, self.seed = owner, int(seed)
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, p: int) -> int:
        n = self.owner.num_examples
        epoch, k = divmod(int(p), n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=seeded_generator("distill-data", self.seed, epoch)))
        return int(self._perm[1][k])

    def __len__(self) -> int:  # the sampler yields the positions; the DataLoader never asks
        return 2**62

    def __getitem__(self, p: int) -> dict[str, Any]:
        i = self.index(p)
        return {**self.owner.load(i, p, self.seed), "example": torch.tensor(i), "position": torch.tensor(int(p))}


class _RankBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of positions, in training order, from ``start_step`` on."""

    def __init__(self, rank: int, world: int, local: int, grad_accum: int, start_step: int):
        self.rank, self.world, self.local, self.grad_accum, self.start = rank, world, local, grad_accum, int(start_step)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.local * self.world * self.grad_accum
        step = self.start
        while True:
            for micro in range(self.grad_accum):
                first = step * b + (micro * self.world + self.rank) * self.local
                yield list(range(first, first + self.local))
            step += 1

    def __len__(self) -> int:
        return 2**62


class _IndexedStream:
    """What :class:`ImageTextData` and :class:`LatentShards` share: the position arithmetic, the
    DataLoader, the checkpoint record (subclasses: ``num_examples``, ``load``, ``prepare``,
    ``fingerprint``, ``shape``)."""

    streaming = True
    num_examples: int
    shape: tuple[int, ...]

    def load(self, i: int, position: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, raw: dict[str, Any], gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def read(self, positions: Sequence[int], seed: int) -> dict[str, Any]:
        """The examples at ``positions``, decoded in this process (the preflight, tests)."""
        view = _Positions(self, seed)
        return _collate([view[int(p)] for p in positions])

    def open(self, *, rank: int, world: int, local: int, grad_accum: int, seed: int, start_step: int, num_workers: int = 2) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from ``start_step`` on, decoded by ``num_workers`` processes."""
        loader = torch.utils.data.DataLoader(
            _Positions(self, seed), batch_sampler=_RankBatches(rank, world, local, grad_accum, start_step),
            num_workers=num_workers, collate_fn=_collate, prefetch_factor=2 if num_workers else None,
            persistent_workers=False,
        )
        return iter(loader)

    def position(self, step: int, batch_size: int) -> dict[str, Any]:
        """The checkpoint's record of the stream after ``step`` steps of ``batch_size``."""
        p = int(step) * int(batch_size)
        return {"source": self.fingerprint(), "examples": self.num_examples, "position": p,
                "epoch": p // self.num_examples, "in_epoch": p % self.num_examples}

    def check_resume(self, saved: Any) -> None:
        """Refuse to resume on other data than the checkpoint's (the position would mean other examples)."""
        if not isinstance(saved, dict):
            raise ValueError("the checkpoint records no position in a data stream (it was trained on other data); resume it "
                             "with the data source it was trained on, or start a new run in another output folder")
        now = {"source": self.fingerprint(), "examples": self.num_examples}
        if saved.get("source") != now["source"] or saved.get("examples") != now["examples"]:
            raise ValueError(
                f"the training data changed since the checkpoint (it was {saved.get('source')!r} with {saved.get('examples')} "
                f"examples, now {now['source']!r} with {now['examples']}); its stream position would point at other "
                "examples: resume with the original data, or start a new run in another output folder"
            )


def _flip(seed: int, position: int) -> bool:
    return derived_seed("distill-flip", seed, position) % 2 == 1


class ImageTextData(_IndexedStream):
    """Image-text pairs encoded on the fly (see the module docstring).

    Args:
        source: :class:`ImageTextFolder`, :class:`TarShards`, :class:`HFImageText` (or any
            object with ``len()``, ``read(i) -> (image, caption)``, ``fingerprint()``).
        encoder: a :class:`fewstep.distill.encode.PipelineEncoder` (VAE and text encoders).
        resolution: pixel size of the square crops (default: the encoder's).
        center_crop: centre crops (else top-left).
        random_flip: flip horizontally with probability 1/2 (a hash of the position decides).
    """

    def __init__(self, source: Any, encoder: Any, resolution: int | None = None, center_crop: bool = True, random_flip: bool = False):
        for attr in ("read", "fingerprint", "__len__"):
            if not hasattr(source, attr):
                raise TypeError(f"source must have len(), read(i) and fingerprint() (ImageTextFolder, TarShards, HFImageText); "
                                f"{type(source).__name__} has no {attr}")
        self.source, self.encoder = source, encoder
        self.resolution = int(resolution if resolution is not None else encoder.resolution)
        if self.resolution < 8 or self.resolution % encoder.downsample:
            raise ValueError(f"resolution must be a multiple of the VAE's downsampling factor {encoder.downsample}, got {self.resolution}")
        self.center_crop, self.random_flip = bool(center_crop), bool(random_flip)
        self.num_examples = len(source)
        if self.num_examples < 1:
            raise ValueError("the data source holds no examples")
        self.shape = encoder.latent_shape(self.resolution)

    def load(self, i: int, position: int, seed: int) -> dict[str, Any]:
        image, caption = self.source.read(i)
        try:
            item = decode_image(image, self.resolution, self.center_crop, self.random_flip and _flip(seed, position))
        except Exception as err:  # PIL raises many types for damaged files
            raise ValueError(f"example {i} of {self.source.fingerprint()} is not a readable image ({type(err).__name__}: {err})") from None
        return {**item, "caption": caption}

    def prepare(self, raw: dict[str, Any], gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.encoder.encode(raw, gens, device)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers only decode: the encoder (possibly on a GPU) stays in the training process
        return {**self.__dict__, "encoder": None}

    def unconditional(self) -> dict[str, Any]:
        return self.encoder.unconditional()

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}:r{self.resolution}:c{int(self.center_crop)}f{int(self.random_flip)}"


# ---------------------------------------------------------------------------------------------
# Precomputed latent shards
# ---------------------------------------------------------------------------------------------


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if "." in k:
            raise ValueError(f"conditioning key {k!r} contains a dot, which the shard format uses to nest keys")
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        node = out
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def precompute(data: ImageTextData, folder: str | os.PathLike, *, shard_size: int = 1024, batch_size: int = 16,
               device: Any = "cpu", seed: int = 0, rank: int = 0, world: int = 1) -> Path:
    """Encode every example of ``data`` once (in the source's own order) and write
    ``shard-NNNNN.safetensors`` files of ``shard_size`` examples plus ``index.json`` and
    ``uncond.safetensors`` into ``folder``, for :class:`LatentShards`.  The VAE's latent is one
    draw of ``latent_dist`` per example (from a generator seeded by ``(seed, index)``), so the
    shards do not depend on batching or on the number of processes.  Under several processes call
    it on every rank with its ``rank`` and ``world``: rank ``r`` writes the shards
    ``k = r mod world``, and rank 0 writes the index once every shard file exists (it waits for
    them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = data.num_examples
    shards = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range(math.ceil(n / shard_size))]
    mine = [s for s in shards if s[0] % world == rank]
    keys: list[str] | None = None
    for k, lo, hi in mine:
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(lo, hi, batch_size):
            idx = list(range(start, min(hi, start + batch_size)))
            raw = _collate([{**data.load(i, i, seed), "example": torch.tensor(i)} for i in idx])
            gens = [seeded_generator("distill-precompute", seed, i) for i in idx]
            with torch.no_grad():
                x0, cond = data.prepare(raw, gens, device)
            parts.append({"latents": x0.float().cpu(), **{k2: v.float().cpu() for k2, v in _flatten(cond).items()}})
        tensors = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]}
        keys = sorted(tensors)
        tmp = folder / f".shard-{k:05d}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / f"shard-{k:05d}.safetensors")
    if rank == 0:
        import time

        deadline = time.time() + 24 * 3600
        while not all((folder / f"shard-{k:05d}.safetensors").is_file() for k, _, _ in shards):
            if time.time() > deadline:
                raise TimeoutError(f"other ranks did not write their shards into {folder}")
            time.sleep(1.0)
        uncond = data.unconditional()
        same = [k for k, v in _flatten(uncond).items() if v is None]
        save_file({k: v.float().cpu().contiguous() for k, v in _flatten(uncond).items() if v is not None}, str(folder / "uncond.safetensors"))
        if keys is None:
            from safetensors import safe_open

            with safe_open(str(folder / "shard-00000.safetensors"), framework="pt") as f:
                keys = sorted(f.keys())
        atomic_write_json(folder / "index.json", {
            "format": LATENT_FORMAT, "examples": n, "shape": list(data.shape), "keys": keys,
            "shards": [{"file": f"shard-{k:05d}.safetensors", "count": hi - lo} for k, lo, hi in shards],
            "uncond_same_as_cond": same, "source": data.fingerprint(), "seed": int(seed),
        }, indent=1)
    return folder


class LatentShards(_IndexedStream):
    """Latents and conditioning written by :func:`precompute`, read by index from memory-mapped
    safetensors shards (nothing is loaded whole).  ``dtype``: the dtype the batch is returned in."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        path = self.folder / "index.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != LATENT_FORMAT:
                raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {LATENT_FORMAT!r}")
            counts = [int(s["count"]) for s in meta["shards"]]
            files = [str(s["file"]) for s in meta["shards"]]
            self.shape = tuple(int(v) for v in meta["shape"])
            self.keys = [str(k) for k in meta["keys"]]
            same = [str(k) for k in meta.get("uncond_same_as_cond", [])]
            if "latents" not in self.keys or sum(counts) != int(meta["examples"]) or min(counts) < 1:
                raise ValueError("inconsistent counts or no 'latents'")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a fewstep latent-shard index ({err}); write the folder with "
                             "fewstep.distill.stream.precompute (fewstep distill --precompute)") from None
        for f in files:
            if Path(f).name != f or not (self.folder / f).is_file():
                raise ValueError(f"{path} names the shard {f!r}, which is not a file in {self.folder}")
        self.files, self.counts = files, counts
        self.starts = np.cumsum([0] + counts)
        self.num_examples = int(self.starts[-1])
        self.dtype = dtype
        self._meta_source = str(meta.get("source"))
        self._same = same
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _open(self, k: int) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.folder / self.files[k]), framework="pt")
        return self._handles[k]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def load(self, i: int, position: int, seed: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        j = i - int(self.starts[k])
        f = self._open(k)
        return {"tensors": {key: f.get_slice(key)[j : j + 1][0] for key in self.keys}}

    def prepare(self, raw: dict[str, Any], gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        flat = {k: v.to(device=device, dtype=self.dtype) for k, v in raw["tensors"].items()}
        x0 = flat.pop("latents")
        return x0, _unflatten(flat)

    def unconditional(self) -> dict[str, Any]:
        from safetensors.torch import load_file

        flat: dict[str, Any] = dict(load_file(str(self.folder / "uncond.safetensors")))
        flat.update({k: None for k in self._same})
        return _unflatten(flat)

    def fingerprint(self) -> str:
        parts = [f"{f}:{(self.folder / f).stat().st_size}" for f in self.files]
        return f"latents:{self._meta_source}:" + _digest(parts)
