"""Training data and the per-sample random streams of distillation.

Every random draw of a training step (which data item, the noise, the interval, the guidance scale)
comes from a generator owned by one *sample*, seeded from ``(seed, step, global sample index)``.
A process of rank ``r`` owns the global indices ``r * B_local ... (r + 1) * B_local - 1`` of each
micro-batch, so its streams are derived from ``(seed, rank, step)``; and since a sample's stream
does not depend on which process draws it, a run on one process and a run on several with the same
global batch see the same samples and the same noise.  Nothing random is carried from one step to
the next, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fewstep._util import image_files, load_images, load_torch_file, seeded_generator, tree_map

__all__ = [
    "sample_generators",
    "randn",
    "rand",
    "randint",
    "DataSource",
    "TensorData",
    "MixtureData",
    "load_image_folder",
    "load_data_file",
]


def sample_generators(seed: int, step: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per global sample index, seeded from the key ``("distill-sample", seed,
    step, index)`` (:func:`fewstep._util.seeded_generator`: a hash, so no two keys share a
    stream by construction)."""
    return [seeded_generator("distill-sample", seed, step, i) for i in indices]


def randn(gens: Sequence[torch.Generator], shape: Sequence[int], device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *shape) standard normals, row ``b`` drawn from ``gens[b]``."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype) for g in gens]).to(device)


def rand(gens: Sequence[torch.Generator], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B,) uniforms on [0, 1) (CPU)."""
    return torch.cat([torch.rand(1, generator=g, dtype=dtype) for g in gens])


def randint(gens: Sequence[torch.Generator], high: int) -> torch.Tensor:
    """(B,) integers in [0, high) (CPU int64)."""
    return torch.cat([torch.randint(int(high), (1,), generator=g) for g in gens])


class DataSource(Protocol):
    """Anything that draws a batch from per-sample generators.

    ``sample(gens, device)`` returns ``(x0, cond)``: the clean data (B, ...) and the conditioning
    passed to teacher and student (tensors with B rows travel with their sample, also inside
    nested dicts).  Sources too large for memory are *streaming* sources instead
    (:mod:`fewstep.distill.stream`: ``streaming = True``, read by position, resumable)."""

    shape: tuple[int, ...]

    def sample(self, gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]: ...


class TensorData:
    """Items of a tensor (N, ...) drawn uniformly with replacement, with optional per-item
    conditioning (e.g. text-encoder states for LCD), held in memory: for small data.  Streaming
    image-text data and precomputed latent shards are :mod:`fewstep.distill.stream`.

    Args:
        data: (N, ...) clean training data (images or VAE latents, already scaled).
        cond: per-item conditioning: tensors with N rows, or nested dicts of them (SDXL's
            ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}``).
        dtype: the dtype the batch is returned in.
    """

    def __init__(self, data: torch.Tensor, cond: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 1:
            raise ValueError("data must be a tensor of shape (N, ...) with at least one item")
        self.data = data.detach().to(dtype)
        n = data.shape[0]

        def check(v: Any) -> torch.Tensor:
            if v.shape[0] != n:
                raise ValueError(f"every conditioning tensor must have one row per data item ({n}), got shape {tuple(v.shape)}")
            return v.detach()

        cond = dict(cond or {})
        bad = [k for k, v in cond.items() if not isinstance(v, (torch.Tensor, dict))]
        if bad:
            raise ValueError(f"conditioning {bad[0]!r} must be a tensor with one row per data item ({n}) or a dict of them")
        self.cond = tree_map(check, cond)
        self.shape = tuple(data.shape[1:])

    def sample(self, gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        idx = randint(gens, self.data.shape[0])
        return self.data[idx].to(device), tree_map(lambda v: v[idx].to(device), self.cond)


class MixtureData:
    """Exact samples of a :class:`fewstep.models.GaussianMixture`, reshaped to ``shape``: per sample
    a component ``k`` (inverse CDF of one uniform) and ``x = mu_k + U_k diag(sqrt(s_k)) z``."""

    def __init__(self, mixture: Any, shape: Sequence[int] | None = None, dtype: torch.dtype = torch.float32):
        self.mixture = mixture
        self.shape = tuple(shape) if shape is not None else (mixture.dim,)
        if int(np.prod(self.shape)) != mixture.dim:
            raise ValueError(f"shape {self.shape} does not hold the mixture's {mixture.dim} dimensions")
        self.dtype = dtype
        self._cdf = torch.cumsum(mixture.weights, 0)
        self._root = mixture.eigenvalues.sqrt()

    def sample(self, gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        m = self.mixture
        comp = torch.searchsorted(self._cdf, rand(gens), right=True).clamp(max=m.num_components - 1)
        z = randn(gens, (m.dim,), dtype=torch.float64)
        x = m.means[comp] + torch.einsum("bij,bj->bi", m.eigenvectors[comp], z * self._root[comp])
        return x.reshape(len(gens), *self.shape).to(device=device, dtype=self.dtype), {}


def load_image_folder(folder: Any, size: int, channels: int) -> torch.Tensor:
    """The images under a folder (searched recursively, sorted by relative path; the extensions of
    :data:`fewstep._util.IMAGE_EXTENSIONS`) as (N, C, size, size) float32 in [-1, 1], converted to
    grey (``channels=1``) or RGB and resized with bicubic filtering."""
    return load_images(image_files(folder), mode="L" if channels == 1 else "RGB", size=size)


_DATA_FIX = ("save the data as plain tensors: torch.save(images, path) with images (N, C, H, W) in [-1, 1], or a dict "
             "{'data': tensor, <conditioning name>: tensor, 'uncond': {<name>: tensor}}; or numpy.save(path, array) as .npy")


def load_data_file(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(data, cond, uncond)`` from a ``--data`` file of ``fewstep distill``, without running code
    from it: ``.npy`` with ``allow_pickle=False`` (no object arrays), ``.pt`` / ``.pth`` with
    ``torch.load(weights_only=True)`` (:func:`fewstep._util.load_torch_file`: tensors and plain
    containers only; a pickled payload is refused before it runs).  A ``.pt`` file holds a tensor
    (N, ...) or a dict with ``data`` (or ``latents``), conditioning tensors with N rows and
    ``uncond`` (a dict of tensors, LCD's unconditional inputs)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"--data {path} is not a readable .npy array of numbers ({str(err).splitlines()[0]}); {_DATA_FIX}") from None
        if array.dtype.kind not in "fiub":
            raise ValueError(f"--data {path} holds {array.dtype} values, not numbers; {_DATA_FIX}")
        return torch.from_numpy(np.ascontiguousarray(array)).float(), {}, {}
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"--data {path}: use a .pt/.pth/.npy file or a folder of images")
    obj = load_torch_file(path, what="training data (a tensor, or a dict of tensors)", fix=_DATA_FIX)
    if isinstance(obj, torch.Tensor):
        return obj.float(), {}, {}
    if isinstance(obj, dict) and ("data" in obj or "latents" in obj):
        data = obj.get("data", obj.get("latents"))
        uncond = obj.get("uncond") or {}
        cond = {k: v for k, v in obj.items() if k not in ("data", "latents", "uncond")}
        bad = [f"{k!r}" for k, v in [("data", data), *cond.items()] if not isinstance(v, torch.Tensor)]
        if not isinstance(uncond, dict) or not all(isinstance(v, torch.Tensor) for v in uncond.values()):
            bad.append("'uncond'")
        if bad:
            raise ValueError(f"--data {path}: {', '.join(bad)} must be tensors ('uncond' a dict of tensors); {_DATA_FIX}")
        return data.float(), {str(k): v for k, v in cond.items()}, {str(k): v for k, v in uncond.items()}
    raise ValueError(f"--data {path} must hold a tensor or a dict with 'data' (or 'latents'), conditioning tensors and 'uncond'")
