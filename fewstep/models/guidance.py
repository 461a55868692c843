"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, "Classifier-Free
Diffusion Guidance", eq. 6)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["ClassifierFreeGuidance"]


def _cat(a: Any, b: Any, batch: int) -> Any:
    """``a`` (the unconditional inputs) and ``b`` (the conditional ones) stacked along the batch in
    that order, leaf by leaf through nested dicts such as SDXL's ``added_cond_kwargs``; a leaf of
    one row is expanded to the batch.  An unconditional leaf ``None`` means "the conditional
    value in both branches" (SDXL's negative ``time_ids`` are the positive ones)."""
    if a is None and isinstance(b, torch.Tensor):
        return torch.cat([b, b])
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape[1:] != b.shape[1:]:
            raise ValueError("conditional and unconditional inputs must be tensors of matching shape")
        a = a.expand(batch, *a.shape[1:]) if a.shape[0] == 1 else a
        b = b.expand(batch, *b.shape[1:]) if b.shape[0] == 1 else b
        return torch.cat([a, b.to(a.dtype) if b.dtype != a.dtype and a.is_floating_point() else b])
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise ValueError(f"nested conditioning {sorted(a)} and its unconditional counterpart "
                             f"{sorted(b) if isinstance(b, dict) else type(b).__name__} must have the same keys")
        return {k: _cat(a[k], b[k], batch) for k in a}
    if a != b:
        raise ValueError(f"non-tensor conditioning must be equal for both branches, got {a!r} and {b!r}")
    return a


def _same(a: Any, b: Any, key: str) -> Any:
    if a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)):
        return a
    raise ValueError(f"{key} has no batch dimension, so it must be the same for the conditional and unconditional branches")


class ClassifierFreeGuidance(torch.nn.Module):
    """``D_w(x, t) = D(x, t | uncond) + w (D(x, t | cond) - D(x, t | uncond))``.

    One batched forward computes both branches (the unconditional half first, as diffusers'
    pipelines do).  ``w = 1`` is the conditional model, ``w = 0`` the unconditional one: the
    convention of diffusers' ``guidance_scale``.  Guidance is applied to the data prediction; since
    every prediction type is affine in the network output at fixed ``(x, t)``, this equals guiding
    the network output.  ``uncond`` holds the unconditional inputs under the same keys as the
    conditional ``cond`` passed at call time.  The last unconditional prediction is kept in
    ``last_uncond`` for samplers that need it (CFG++).  Conditioning may be nested (SDXL's
    ``added_cond_kwargs = {"text_embeds": ..., "time_ids": ...}``, ControlNet inputs): ``uncond``
    mirrors its structure, and each tensor leaf is stacked with its counterpart.  Inputs the
    wrapped denoiser lists in its ``unbatched_cond`` (Flux's ``img_ids`` / ``txt_ids``, which have
    no batch dimension) are passed to the batched call as they are, and must be equal in both
    branches.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], guidance_scale: float | torch.Tensor, uncond: Mapping[str, Any]):
        super().__init__()
        self.denoiser = denoiser
        # A (B,) tensor gives one scale per sample (distillation draws w per sample).
        self.guidance_scale = guidance_scale if isinstance(guidance_scale, torch.Tensor) else float(guidance_scale)
        self.uncond = dict(uncond)
        self.schedule = getattr(denoiser, "schedule", None)
        self.last_uncond: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if set(cond) != set(self.uncond):
            raise ValueError(
                f"conditioning keys {sorted(cond)} do not match the unconditional keys {sorted(self.uncond)}"
            )
        flat = getattr(self.denoiser, "unbatched_cond", ())
        both = {k: _same(self.uncond[k], cond[k], k) if k in flat else _cat(self.uncond[k], cond[k], x.shape[0]) for k in cond}
        tt = t if t.ndim == 0 else torch.cat([t, t])
        d_u, d_c = self.denoiser(torch.cat([x, x]), tt, **both).chunk(2)
        self.last_uncond = d_u
        w = self.guidance_scale
        if isinstance(w, torch.Tensor) and w.ndim:
            w = w.to(d_u.device, d_u.dtype).reshape(-1, *([1] * (d_u.ndim - 1)))
        return d_u + w * (d_c - d_u)
