r"""Exponential moving averages of the student: the *target* EMA of consistency distillation and
the separate *sampling* EMA that is evaluated and exported.

Consistency models keep two averages with different jobs (Song et al. 2023, Sec. 5 and App. C;
Song & Dhariwal 2023, Sec. 3.2): the target network ``theta^-`` of the loss (``mu = 0.95`` in CD,
none in iCT) and an EMA of rate 0.9999 that is what gets sampled and scored.  The target lives
in the trainer as a network (it is called every step); the sampling EMA is only a set of fp32
shadow tensors of the *trainable* parameters (for a LoRA student: the adapters), updated after
every optimizer step with

.. math::  \theta_{ema} \leftarrow d_k\,\theta_{ema} + (1 - d_k)\,\theta, \qquad
           d_k = \min\Big(d, \frac{1 + k}{10 + k}\Big)\ (k \ge 1), \quad d_0 = 0,

``k`` the number of updates so far: diffusers' ``EMAModel`` rule (``use_ema_warmup=False``,
``update_after_step=0``; tested equal), so a short run is not dominated by its initial weights.  Saved as safetensors (``sampling_ema.safetensors``,
the update count in its metadata), never pickled.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from fewstep.distill.checkpoint import SAMPLING_EMA_FILE

__all__ = ["SamplingEMA", "SAMPLING_EMA_FILE", "ema_update"]


def ema_update(target: torch.nn.Module, online: torch.nn.Module, mu: float) -> None:
    """``theta^- <- mu theta^- + (1 - mu) theta`` over all parameters (the target network;
    Song et al. 2023, Algorithm 2)."""
    with torch.no_grad():
        for pt, ps in zip(target.parameters(), online.parameters()):
            pt.lerp_(ps.detach().to(pt.dtype), 1.0 - mu)


class SamplingEMA:
    """fp32 shadows of the trainable parameters of ``module`` (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.9999):
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"sampling_ema must be in (0, 1) (or None for no sampling EMA), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError("the student has no trainable parameters to average")

    def rate(self, k: int | None = None) -> float:
        """``d_k`` of the module docstring."""
        k = self.updates if k is None else int(k)
        return 0.0 if k <= 0 else min(self.decay, (1.0 + k) / (10.0 + k))

    def update(self, module: torch.nn.Module) -> None:
        d = self.rate()
        with torch.no_grad():
            for n, p in module.named_parameters():
                s = self.shadow.get(n)
                if s is not None:
                    s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)
        self.updates += 1

    def _params(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(module.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise ValueError(f"the sampling EMA holds parameters the network lacks: {missing[:3]}")
        return params

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``module`` with the averaged weights in place of its own for the duration of the block
        (validation, export); its own weights are put back afterwards."""
        params = self._params(module)
        kept = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, s in self.shadow.items():
                params[n].copy_(s.to(params[n].dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, v in kept.items():
                    params[n].copy_(v)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file({n: s.contiguous().cpu() for n, s in self.shadow.items()}, str(path),
                  metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        """Read a file written by :meth:`save` (safetensors: nothing is unpickled); its tensors
        must be exactly this EMA's."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if names != set(self.shadow):
                extra, lack = sorted(names - set(self.shadow))[:3], sorted(set(self.shadow) - names)[:3]
                raise ValueError(f"{path} does not hold this student's sampling EMA (unexpected {extra}, missing {lack}); "
                                 "resume with the same student and LoRA settings")
            loaded = {n: f.get_tensor(n) for n in names}
        for n, v in loaded.items():
            if v.shape != self.shadow[n].shape:
                raise ValueError(f"{path}: {n} has shape {tuple(v.shape)}, the student's is {tuple(self.shadow[n].shape)}")
            self.shadow[n] = v.to(device=device, dtype=torch.float32)
        try:
            self.updates = int(meta.get("updates", "0"))
        except ValueError:
            raise ValueError(f"{path}: its 'updates' metadata {meta.get('updates')!r} is not a count") from None
