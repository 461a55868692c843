"""Shared by the k-diffusion / ComfyUI equality tests: a smooth denoiser in sigma space, a noise
source that replays given draws, and the relative difference."""

from __future__ import annotations

import torch

from fewstep.samplers.core import NoiseSource

W = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / 3


def den(x, sigma):
    """A smooth k-diffusion denoiser in sigma space (sigma a (B,) tensor, or 0-d from fewstep)."""
    s = torch.as_tensor(sigma, dtype=x.dtype)
    s = s.reshape(-1, 1) if s.ndim else s
    return torch.tanh(x @ W) / (1 + s**2) + 0.1 * x * s**2 / (1 + s**2)


def rel(a, b):
    return float((a - b).norm() / b.norm())


class ListNoise(NoiseSource):
    """Hands out a fixed list of noise tensors, so both implementations see the same noise."""

    def __init__(self, noises):
        super().__init__()
        self.noises = list(noises)

    def randn_like(self, x):
        return self.noises.pop(0).to(x.dtype)
