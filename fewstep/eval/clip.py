"""CLIP image embeddings for CMMD (Jayasumana et al. 2024, "Rethinking FID", sec. 4), with the
embedding step of the authors' code (google-research ``cmmd/embedding.py``,
``ClipEmbeddingModel.embed``):

1. the image as 8-bit RGB scaled to ``[0, 1]`` (grey repeated to three channels);
2. ``torch.nn.functional.interpolate(mode="bicubic")`` to the model's input size (336 for their
   ``openai/clip-vit-large-patch14-336``; the size is read from the model's config);
3. CLIP's normalisation (``image_mean`` / ``image_std`` of the folder's
   ``preprocessor_config.json``, else OpenAI's values), no crop;
4. ``image_embeds`` of ``transformers.CLIPVisionModelWithProjection``, divided by their norm.

Their file loader can also centre-crop and PIL-resize images before this (``reshape_to``); that
is a property of how they read files, not of the metric, and is not applied here.  The distance is
:func:`fewstep.eval.cmmd.cmmd`.  Weights come from a local folder
(:func:`fewstep.eval.features.find_weights_folder`), never downloaded.
"""

from __future__ import annotations

import json
import os

import torch

from fewstep.eval.features import TransformersFeatures

__all__ = ["ClipFeatures", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipFeatures(TransformersFeatures):
    """Unit-norm CLIP image embeddings (module docstring).

    Args:
        path: the local weight folder (default ``$FEWSTEP_CLIP_PATH``).
        device, batch_size: where and in what batches the network runs.
    """

    kind, cls_name = "clip", "CLIPVisionModelWithProjection"

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str | None = None, batch_size: int = 32):
        super().__init__(path, device, batch_size)
        self.size = int(self.model.config.image_size)
        self.dim = int(self.model.config.projection_dim)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        proc = self.path / "preprocessor_config.json"
        if proc.is_file():
            cfg = json.loads(proc.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images to the network's normalised input (steps 1-3)."""
        u = torch.nn.functional.interpolate(u8.to(torch.float32) / 255, size=(self.size, self.size), mode="bicubic")
        return (u - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.model(pixel_values=x).image_embeds
        return e / e.norm(dim=-1, keepdim=True)
