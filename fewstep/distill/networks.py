"""A small network for vector data (the exact-mixture testbed), in diffusers format so students
built on it save and load like any diffusers model."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin

__all__ = ["MLPNet"]


class MLPNet(ModelMixin, ConfigMixin):
    """``net(x (B, dim), timestep) -> (B, dim)``: a residual SiLU MLP with a sinusoidal timestep
    embedding added to every hidden layer (``timestep`` a number, a 0-d or a (B,) tensor).

    ``timestep_scale`` multiplies the timestep before the embedding: continuous-time consistency
    students need a smooth time input (sCM, Lu & Song 2024, sec. 4.1: a small-scale time embedding,
    ``c_noise(t) = t``, since ``dF/dt`` through a high-frequency embedding of ``1000 t`` makes the
    tangent unstable); ``1e-3`` maps DDPM's 0..999 onto [0, 1]."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, dim: int = 64, hidden: int = 256, depth: int = 3, time_embed_dim: int = 64, timestep_scale: float = 1.0):
        super().__init__()
        self.inp = torch.nn.Linear(dim, hidden)
        self.time = torch.nn.Sequential(torch.nn.Linear(time_embed_dim, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = torch.nn.Linear(hidden, dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).flatten()
        if self.config.timestep_scale != 1.0:
            t = t * self.config.timestep_scale
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        emb = self.time(get_timestep_embedding(t, self.config.time_embed_dim).to(self.inp.weight.dtype))
        h = self.inp(sample.flatten(1).to(self.inp.weight.dtype))
        for lin in self.blocks:
            h = h + lin(torch.nn.functional.silu(h + emb))
        return self.out(torch.nn.functional.silu(h)).reshape(sample.shape)
