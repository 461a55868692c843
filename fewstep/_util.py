"""Small helpers shared across subpackages: name suggestions, seeded generators, image files and
fingerprints of models."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
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
