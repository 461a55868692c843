"""Small helpers shared across subpackages: name suggestions, seeded generators, image files,
fingerprints of models, atomic file writes, and loading files from others without running code."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'a', 'b'?)"`` for the choices closest to ``name``, or ``""``."""
    found = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""


# ---------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------


def derived_seed(*key: int | str) -> int:
    """A 64-bit seed derived from ``key`` (e.g. ``("fid", seed, index)``) by a cryptographic hash.

    Every key gives its own well-mixed seed: the words are joined with their count and separators
    before hashing, so keys that differ in any word, or in their number of words
    (``(1, 2)``, ``(1, 2, 0)``, ``(12,)``), never share a seed by construction (only by a 2^-64
    hash accident).  Callers put a tag first so that the streams of different purposes are
    unrelated."""
    words = [str(k) if isinstance(k, str) else str(int(k)) for k in key]
    text = f"{len(words)}:" + "\x1f".join(words)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=b"fewstep-seed").digest(), "little")


def seeded_generator(*key: int | str, device: Any = "cpu") -> "torch.Generator":
    """A ``torch.Generator`` on ``device`` seeded with :func:`derived_seed` of ``key``."""
    import torch

    return torch.Generator(device=device).manual_seed(derived_seed(*key))


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files (:data:`IMAGE_EXTENSIONS`) under ``folder``, searched recursively and sorted by
    relative path; an empty or missing folder is a ``ValueError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def load_images(files: Sequence[Path], mode: str | None = None, size: int | None = None) -> "torch.Tensor":
    """Image files to a float32 tensor (N, C, H, W) in [-1, 1].

    ``mode=None`` keeps 8-bit grey images as one channel and converts everything else to RGB;
    ``"L"`` or ``"RGB"`` converts every image.  ``size`` resizes every image to ``size x size``
    (bicubic, PIL); without it all images must already share one size."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert(mode) if mode is not None else (im if im.mode == "L" else im.convert("RGB"))
            if size is not None:
                im = im.resize((int(size), int(size)), Image.BICUBIC)
            a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[:, :, None] if a.ndim == 2 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images must share one size and mode; found {sorted(shapes)}; resize them first")
    u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return u8.to(torch.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------

_PLAIN = (bool, int, float, str)  # None is left out: it is also what caches hold before first use


def module_fingerprint(module: "torch.nn.Module") -> str:
    """A hex digest of what ``module`` computes with: every tensor of its ``state_dict`` (name,
    dtype, shape and bytes) and, for every submodule, its class and its plain settings (numbers,
    strings and dataclasses held as attributes, such as a guidance scale or a prediction type).
    Tensors held outside the state dict (caches such as a guided denoiser's last prediction) are
    left out, and callables that are not modules count by their class only, so give models that
    differ only there distinct names yourself."""
    import torch

    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, name, value)
        else:
            h.update(f"{name}={value!r}\n".encode())
    for prefix, m in module.named_modules():
        h.update(f"[{prefix}:{type(m).__module__}.{type(m).__qualname__}]\n".encode())
        for key, value in sorted(vars(m).items()):
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
                h.update(f"{key}={value!r}\n".encode())
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                h.update(f"{key}={value!r}\n".encode())
            elif callable(value) and not isinstance(value, torch.nn.Module):
                h.update(f"{key}:{type(value).__module__}.{type(value).__qualname__}\n".encode())
    return h.hexdigest()


def _hash_tensor(h: Any, name: str, t: "torch.Tensor") -> None:
    import torch

    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, so never while threads write


def default_permissions(folder: bool = False) -> int:
    """The mode ``open`` / ``mkdir`` would give a new file (``0o666``) or folder (``0o777``) under
    this process's umask; ``tempfile`` creates private ones, which a rename would keep."""
    return (0o777 if folder else 0o666) & ~_UMASK


def check_replaceable(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is absent or a regular file; a ``ValueError`` saying what is
    there otherwise (a folder, a symbolic link, a device...): fewstep replaces only regular files."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link; fewstep writes files only over regular files (never through a link): "
            "remove the link or choose another path"
        )
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ValueError(f"{path} is {kind}; fewstep writes files only over regular files: choose another path, or remove it")
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a
    part: a temporary file with a unique name (``tempfile.mkstemp``) in the target's folder,
    flushed to disk, then renamed over ``path``.  Concurrent writers (threads or processes) never
    share a temporary file, so the last rename wins and the file is always one writer's whole
    output.  The target must be absent or a regular file (:func:`check_replaceable`); the new file
    gets the usual permissions (``0o666`` less the umask)."""
    path = check_replaceable(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_permissions())
        check_replaceable(path)  # again just before the rename: a folder or a link may have appeared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """:func:`atomic_write_bytes` of ``json.dumps(obj, **dumps)`` and a final newline."""
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """``numpy.savez`` to ``path``, atomically (:func:`atomic_write_bytes`)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Files from others: nothing fewstep loads runs code
# ---------------------------------------------------------------------------------------------

#: File endings of pickled weights (``torch.save`` and friends): loading one may run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _numpy_globals() -> list[Any]:
    """What a pickled NumPy array needs (RNG states hold them): the array and dtype constructors
    and ``codecs.encode`` for the raw bytes.  None of them runs code from the file; accelerate
    allows the same list when it reads its RNG states with ``weights_only=True``."""
    import codecs

    import numpy as np

    core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core  # 1.x has a stub _core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and not n.startswith("_")]
    return found


def load_torch_file(
    path: str | os.PathLike,
    *,
    what: str,
    fix: str,
    numpy: bool = False,
    check_only: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` for a file someone else may have made.

    ``weights_only`` restricts unpickling to tensors and plain containers, so a crafted file
    cannot run code (a ``__reduce__`` payload is refused before it is called).  Every failure is a
    ``ValueError`` that names the file, says what it should have been (``what``) and what to do
    (``fix``), instead of torch's advice to retry with ``weights_only=False``.  ``numpy=True``
    also admits pickled NumPy arrays (RNG states); ``check_only=True`` verifies a ``torch.save``
    zip archive without reading its tensor data (memory-mapped) and returns nothing useful.
    Needs torch >= 2.6: older ``weights_only`` loading could be made to run code (CVE-2025-32434)."""
    import torch

    path = Path(path)
    if _torch_version() < (2, 6):
        raise ValueError(
            f"{path}: reading {what} safely needs torch >= 2.6 (in older torch, torch.load(weights_only=True) can be "
            f"made to run code from the file, CVE-2025-32434); upgrade torch, or {fix}"
        )
    if not path.is_file():
        raise ValueError(f"{path} is missing or not a regular file ({what} was expected there); {fix}")
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if check_only:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a torch.save zip archive ({what} was expected); {fix}")
        kwargs["mmap"] = True
    allowed = _numpy_globals() if numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        culprit = f" (it refers to {found.group(1)})" if found else ""
        raise ValueError(
            f"{path} is not {what}: it holds pickled objects other than tensors, numbers and plain containers{culprit}, "
            f"which could run code when loaded, so fewstep refuses it (nothing from it was run); {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            zipfile.BadZipFile, MemoryError, RecursionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable torch file ({what} was expected: {first}); {fix}") from None


def require_safetensors(folder: str | os.PathLike, what: str) -> Path:
    """Refuse a diffusers model folder whose weights exist only as a pickle.

    diffusers falls back to ``diffusion_pytorch_model.bin`` when no ``.safetensors`` file is
    there; fewstep loads models with ``use_safetensors=True`` and calls this first, so a pickled
    ``.bin`` gets one message saying how to convert it (where the file is trusted) instead of
    diffusers' file-not-found error.  ``what`` names the folder's role ("the teacher's UNet")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} is not a folder")
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files):
        return folder
    pickled = sorted(p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES) or p.name.endswith(".bin.index.json"))
    cls = "DiffusersModel"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        cls = str(json.loads((folder / "config.json").read_text()).get("_class_name") or cls)
    if pickled:
        raise ValueError(
            f"{what} {folder} holds its weights only as {', '.join(pickled)}: a pickle, which can run code when loaded, "
            "so fewstep does not load it. Convert it to safetensors on a machine where you trust the file, e.g. "
            f"diffusers.{cls}.from_pretrained({str(folder)!r}, use_safetensors=False).save_pretrained({str(folder)!r}, "
            "safe_serialization=True), or ask its author for .safetensors weights"
        )
    raise ValueError(
        f"{what} {folder} has no weights (.safetensors) next to its config; save the model there with "
        "model.save_pretrained(folder) (safetensors is diffusers' default)"
    )


# ---------------------------------------------------------------------------------------------
# Nested conditioning
# ---------------------------------------------------------------------------------------------


def tree_map(fn: Any, tree: Any, *rest: Any) -> Any:
    """``fn`` applied to every tensor leaf of a nested structure of dicts (``added_cond_kwargs``,
    ControlNet inputs, ...), lists and tuples; other leaves (numbers, strings, None) are kept
    as they are.  With ``rest``, structures of the same shape are walked together and ``fn``
    receives one leaf of each (a mismatch of keys or lengths is a ``ValueError``)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    if isinstance(tree, dict):
        for r in rest:
            if not isinstance(r, dict) or set(r) != set(tree):
                raise ValueError(f"conditioning structures differ: keys {sorted(tree)} vs {sorted(r) if isinstance(r, dict) else type(r).__name__}")
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        for r in rest:
            if not isinstance(r, (list, tuple)) or len(r) != len(tree):
                raise ValueError("conditioning structures differ in length")
        return type(tree)(tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree))
    return tree


def tree_leaves(tree: Any) -> list[Any]:
    """The tensor leaves of a nested structure (see :func:`tree_map`), in a fixed order."""
    out: list[Any] = []
    tree_map(lambda v: out.append(v), tree)
    return out
