"""Turn the ``--model`` of ``fewstep report`` into a denoiser, a sample shape and an identity.

* ``"embedded"``: the shipped digits UNet (:mod:`fewstep.models.embedded`), shape (1, 8, 8);
* a folder holding a pixel-space diffusers pipeline (``model_index.json``; loaded with
  ``local_files_only``, nothing is downloaded, and ``use_safetensors=True``: a component whose
  weights exist only as a pickled ``.bin`` is refused with how to convert it, never unpickled),
  shape from its UNet's config.  Latent pipelines
  (a ``vae`` in ``model_index.json``) are refused: their samples are latents, which the report
  would have to decode through the VAE before extracting features;
* ``"module:attribute"``: a denoiser (callable ``D(x, t)`` with a ``.schedule``), or a
  zero-argument callable returning one; the shape comes from its ``sample_shape`` attribute or the
  ``shape`` argument.  Its ``model_id`` carries a fingerprint of the weights when it is an
  ``nn.Module`` (:func:`fewstep._util.module_fingerprint`), so a run folder is not reused after
  the weights change; other callables are named by ``module:attribute`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep._util import PICKLE_SUFFIXES, module_fingerprint, require_safetensors
from fewstep.eval.features import import_object

__all__ = ["ResolvedModel", "resolve_model"]


@dataclass
class ResolvedModel:
    denoiser: Any
    shape: tuple[int, ...]
    model_id: str  # names the model in a run folder's manifest (changes when the weights change)
    description: str
    default_reference: str | None = None  # reference source used when none is given


def _files_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _refuse_latent_pipeline(folder: Path) -> None:
    """A pipeline with a VAE samples latents; the report extracts features from images."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder / 'model_index.json'} is not readable JSON ({err})") from None
    if isinstance(index, dict) and index.get("vae") is not None:
        raise ValueError(
            f"{folder} is a latent diffusion pipeline ({index.get('_class_name', 'with a vae')}): its samples are VAE "
            "latents, not images, and fewstep report does not decode them. Evaluate it in Python with "
            "fewstep.eval.fid.fid_per_nfe(DiffusersDenoiser.from_pipeline(pipe), ...) and a feature extractor that "
            "decodes the latents with the pipeline's VAE (vae.decode(z / vae.config.scaling_factor)) before "
            "extracting features"
        )


def _require_safetensors_pipeline(folder: Path) -> None:
    """Every component folder of a pipeline that holds weights holds them as safetensors."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sub.iterdir() if f.is_file()]
        if any(f.name.endswith(".safetensors") or f.name.lower().endswith(PICKLE_SUFFIXES) for f in files):
            require_safetensors(sub, f"the pipeline component {sub.name!r}:")


def _shape(shape: Any, origin: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        out = ()
    if not out or any(s < 1 for s in out):
        raise ValueError(f"{origin} must be the shape of one sample, e.g. (3, 32, 32), got {shape!r}")
    return out


def resolve_model(
    spec: str | Any = "embedded",
    *,
    shape: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ResolvedModel:
    """See the module docstring."""
    if isinstance(spec, str) and spec.strip().lower() == "embedded":
        from fewstep.models import embedded

        den = embedded.digits_denoiser(device, dtype)
        weights = embedded._weights_dir()
        fp = _files_fingerprint([p for p in weights.iterdir() if p.is_file()])
        return ResolvedModel(den, (1, 8, 8), f"embedded-digits-unet-{fp}",
                             "the embedded digits UNet (fewstep.models.embedded, DDPM linear schedule, epsilon)", "digits:test")
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        folder = Path(spec)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} is not a saved diffusers pipeline (no model_index.json); save one with pipeline.save_pretrained(folder)")
        _refuse_latent_pipeline(folder)
        _require_safetensors_pipeline(folder)
        from diffusers import DiffusionPipeline

        from fewstep.models.diffusers_models import DiffusersDenoiser

        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype or torch.float32)
        den = DiffusersDenoiser.from_pipeline(pipe)
        net = den.model.to(device) if device is not None else den.model
        den.model = net
        cfg = net.config
        if shape is None:
            size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
            shape = (cfg.in_channels, *size)
        fp = _files_fingerprint([p for p in folder.rglob("*") if p.is_file()])
        return ResolvedModel(den, _shape(shape, "the sample shape"), f"diffusers-{folder.resolve().name}-{fp}",
                             f"diffusers pipeline {folder} ({type(net).__name__})")
    if isinstance(spec, str) and ":" in spec:
        obj = import_object(spec.strip())
        if not hasattr(obj, "schedule") and callable(obj):
            obj = obj()
        if not callable(obj) or getattr(obj, "schedule", None) is None:
            raise ValueError(
                f"{spec!r} must name a denoiser D(x, t) with a .schedule (e.g. a fewstep.models.DiffusersDenoiser), "
                "or a zero-argument callable returning one"
            )
        if shape is None:
            shape = getattr(obj, "sample_shape", None)
        if shape is None:
            raise ValueError(f"give the sample shape of {spec!r} (--shape C,H,W), or set a sample_shape attribute on it")
        model_id = f"callable-{spec.strip()}"
        if isinstance(obj, torch.nn.Module):
            model_id += f"-{module_fingerprint(obj)[:12]}"
        return ResolvedModel(obj, _shape(shape, "the sample shape"), model_id, f"{spec} (Python)")
    raise ValueError(
        f"unknown model {spec!r}: use 'embedded', a folder holding a saved diffusers pipeline, or 'module:attribute' "
        "naming a denoiser"
    )
