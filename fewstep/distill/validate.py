"""Few-step quality of a student during and after training.

A :class:`QualityProbe` holds fixed noise and the references computed once: the teacher's ODE map
from that noise (the exact map on a Gaussian mixture, or the teacher itself at high NFE) and,
optionally, features of real data for a Fréchet distance (FID on digit features for the embedded
digits model, the Fréchet distance in data space on the exact mixture).  Evaluating a student at
1, 2 and 4 steps with its registry sampler gives, per NFE,

* ``rmse``: root-mean-square distance to the teacher's ODE map from the same noise;
* ``fd``: Fréchet distance of the samples' features to the reference features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import fewstep
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.schedules import NoiseSchedule

__all__ = ["QualityProbe", "sample_consistency", "ValidationImages"]


def sample_consistency(student: Callable[..., torch.Tensor], noise: torch.Tensor, sampler: str, nfe: int, schedule: NoiseSchedule, options: Mapping[str, Any] | None = None, cond: Mapping[str, Any] | None = None, seed: int = 0) -> torch.Tensor:
    """``fewstep.sample`` of a consistency student with its registry sampler (stochastic samplers
    draw from one generator per sample, seeded from ``seed`` and the sample index)."""
    opts = dict(options or {})
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(noise.shape[0])]
    with torch.no_grad():
        if hasattr(student, "generate"):  # BOOT: a one-step generator of noise, not a registry sampler's denoiser
            return student.generate(noise, nfe, cond=cond, **opts)
        return fewstep.sample(student, noise, sampler, nfe, schedule=schedule, cond=cond, generator=gens, **opts)


@dataclass
class QualityProbe:
    """Fixed noise and references for comparing students and teachers.

    Args:
        noise: (N, ...) standard normal noise.
        schedule: the teacher's schedule.
        reference: (N, ...) the teacher's ODE map from ``noise`` (``None``: no RMSE).
        features: ``features(samples) -> (N, F)`` for the Fréchet distance (``None``: flatten).
        reference_features: (M, F) features of real data (``None``: no Fréchet distance).
        cond: conditioning of the teacher's calls (and of the student's, unless ``student_cond``).
        student_cond: conditioning of the student's calls (an LCD student also takes
            ``guidance_scale``; ``None``: ``cond``).
    """

    noise: torch.Tensor
    schedule: NoiseSchedule
    reference: torch.Tensor | None = None
    features: Callable[[torch.Tensor], torch.Tensor] | None = None
    reference_features: torch.Tensor | None = None
    cond: Mapping[str, Any] | None = None
    student_cond: Mapping[str, Any] | None = None

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        x = samples.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(x).all()):
            return {"rmse": math.inf, "fd": math.inf}
        if self.reference is not None:
            out["rmse"] = float(torch.sqrt(torch.mean((x - self.reference.to(torch.float64)) ** 2)))
        if self.reference_features is not None:
            f = self.features(samples.detach().float()) if self.features is not None else x.flatten(1)
            out["fd"] = frechet_distance_from_features(f.to(torch.float64), self.reference_features.to(torch.float64))
        return out

    def student(self, student: Callable[..., torch.Tensor], sampler: str, nfes: Sequence[int] = (1, 2, 4), options: Mapping[str, Any] | None = None) -> dict[int, dict[str, float]]:
        """Scores of a consistency student at each NFE with its sampler."""
        dev = _device_of(student)
        noise = self.noise.to(dev, torch.float32)
        cond = self.student_cond if self.student_cond is not None else self.cond
        cond = _to(cond, dev)
        return {k: self.score(sample_consistency(student, noise, sampler, k, self.schedule, options, cond)) for k in nfes}

    def teacher(self, teacher: Callable[..., torch.Tensor], sampler: str = "dpmpp_2m", nfes: Sequence[int] = (10, 50),
                options: Mapping[str, Any] | None = None) -> dict[int, dict[str, float]]:
        """Scores of the teacher at each NFE with a diffusion sampler (and its options)."""
        dev = _device_of(teacher)
        noise = self.noise.to(dev, torch.float32)
        with torch.no_grad():
            return {k: self.score(fewstep.sample(teacher, noise, sampler, k, schedule=self.schedule, cond=_to(self.cond, dev),
                                                 **dict(options or {}))) for k in nfes}

    def flat(self, scores: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
        """``{"rmse@1": ..., "fd@1": ...}`` for logs."""
        return {f"{m}@{k}": v for k, row in scores.items() for m, v in row.items()}


def _device_of(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        for p in inner.parameters():
            return p.device
    return torch.device("cpu")


def _to(cond: Any, device: torch.device) -> Any:
    from fewstep._util import tree_map

    return None if cond is None else tree_map(lambda v: v.to(device), dict(cond))


class ValidationImages:
    """Validation images of a latent student: fixed noise per prompt, the student's sampler at
    each NFE, VAE-decoded (``z / scaling_factor + shift_factor``) and saved as one PNG grid per
    call (``folder/step-<N>.png``: a row per NFE, a column per prompt).

    Args:
        encoder: the :class:`fewstep.distill.encode.PipelineEncoder` of the teacher pipeline.
        prompts: the validation prompts.
        folder: where the grids go.
        sampler, options: the student's registry sampler and its options.
        nfes: step counts, one row each.
        guidance_scale: ``w`` for students with a guidance embedding (``None``: none).
        seed: the noise's seed.
    """

    def __init__(self, encoder: Any, prompts: Sequence[str], folder: Any, sampler: str, options: Mapping[str, Any] | None = None,
                 nfes: Sequence[int] = (1, 2, 4), guidance_scale: float | None = None, seed: int = 0):
        from pathlib import Path

        if not prompts:
            raise ValueError("give at least one validation prompt")
        self.encoder, self.prompts, self.folder = encoder, list(prompts), Path(folder)
        self.sampler, self.options, self.nfes = sampler, dict(options or {}), tuple(nfes)
        self.guidance_scale, self.seed = guidance_scale, int(seed)

    def __call__(self, student: Any, step: int) -> dict[str, float]:
        import numpy as np
        from PIL import Image

        dev = _device_of(student)
        enc = self.encoder.to(dev)
        cond = enc.text(self.prompts)
        if self.guidance_scale is not None:
            cond["guidance_scale"] = float(self.guidance_scale)
        shape = enc.latent_shape(enc.resolution)
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((len(self.prompts), *shape), generator=g).to(dev)
        rows = []
        with torch.no_grad():
            for k in self.nfes:
                z = sample_consistency(student, noise, self.sampler, k, student.schedule, self.options, cond, self.seed)
                x = enc.vae.decode(z.float() / enc.scaling_factor + enc.shift_factor).sample
                rows.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, cols*W)
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(grid.permute(1, 2, 0).numpy())).save(self.folder / f"step-{int(step):07d}.png")
        return {"validation_images": float(len(self.prompts) * len(self.nfes))}
