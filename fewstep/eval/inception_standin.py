"""A small TorchScript stand-in for clean-fid's ``inception-2015-12-05.pt``, for tests and
benchmarks on machines without the real weights.

It has the real file's interface, which is all fewstep and clean-fid touch:

* ``module(images, return_features=True)``: float images (B, 3, H, W) in [0, 255] at any size,
  resized inside to 299x299 and normalised to ``(x - 128) / 128``, to (B, 2048) features (clean-fid's
  ``legacy_tensorflow`` mode); without ``return_features`` the 1008 class probabilities, the
  softmax of ``module.output`` applied to the features (``no_output_bias=True``: its weight only,
  how StyleGAN2-ADA calls the real file for the Inception Score);
* ``module.layers.forward(x)``: normalised (B, 3, 299, 299) input to (B, 2048, 1, 1) (clean mode).

Its features are random projections of two strided convolutions: meaningless as a quality measure,
but deterministic and sensitive to every pixel, so equality of two feature pipelines on it is a
real check.  The real network's resize is TensorFlow's bilinear; here it is
``torch.nn.functional.interpolate(mode="bilinear")``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_inception_standin", "save_inception_standin"]


class _Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, stride=4)
        self.conv2 = nn.Conv2d(16, 32, 5, stride=4)
        self.proj = nn.Conv2d(32, 2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.proj(F.adaptive_avg_pool2d(h, 1)))


class _InceptionStandin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers.forward((x - 128) / 128).reshape(-1, 2048)
        if return_features:
            return features
        logits = F.linear(features, self.output.weight) if no_output_bias else self.output(features)
        return F.softmax(logits, dim=1)


def build_inception_standin(seed: int = 0) -> torch.jit.ScriptModule:
    """The scripted stand-in with weights drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    module = _InceptionStandin()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return torch.jit.script(module.eval())


def save_inception_standin(path: str | os.PathLike, seed: int = 0) -> str:
    """Save the stand-in to ``path`` (name it ``inception-2015-12-05.pt`` to stand in for the real file)."""
    torch.jit.save(build_inception_standin(seed), str(path))
    return str(path)
