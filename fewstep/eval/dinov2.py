"""Fréchet distance in DINOv2 feature space (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics and their unfair treatment of diffusion models", sec. 4: FD_DINOv2 with
ViT-L/14), with the preprocessing of the authors' code, dgm-eval (``dgm_eval/models/dinov2.py``,
default ``clean_resize=False``):

1. the image as 8-bit RGB (grey repeated to three channels, as ``PIL.Image.convert("RGB")``);
2. ``torchvision.transforms.Resize((224, 224), BICUBIC)`` on the PIL image, i.e. PIL's own
   bicubic resize (antialiased when shrinking), to exactly 224 x 224 (no crop, aspect not kept);
3. ``ToTensor`` (``/ 255``) and ``Normalize`` with the ImageNet mean and standard deviation;
4. the class token after the final layer norm (``x_norm_clstoken`` of the hub model, which is
   ``pooler_output`` of ``transformers.Dinov2Model``): 1024 numbers for ViT-L/14.

The network comes from a local ``transformers`` folder (``Dinov2Model.save_pretrained``, e.g. of
``facebook/dinov2-large``): :func:`fewstep.eval.features.find_weights_folder`, never downloaded.
dgm-eval loads the hub checkpoint through ``torch.hub``; ``transformers`` holds the same weights, and
both interpolate the patch position embeddings from the 518-pixel training grid to 224 bicubically
(not compared here: that would need the real weights).

torch-fidelity 0.4's ``dinov2-vit-l-14`` extractor differs: it resizes with a TensorFlow-1 style
bilinear interpolation of the uint8 tensor and loads only through ``torch.hub``; fewstep follows
dgm-eval, whose numbers the DINOv2 FD literature reports.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fewstep.eval.features import TransformersFeatures

__all__ = ["DinoV2Features", "IMAGENET_MEAN", "IMAGENET_STD", "DINOV2_SIZE", "pil_bicubic"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_SIZE = 224


def pil_bicubic(u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) to float (B, 3, size, size) in [0, 1] through PIL's bicubic resize of
    each RGB image (what torchvision's ``Resize`` does to a PIL image), then ``/ 255``."""
    from PIL import Image

    out = []
    for img in u8.permute(0, 2, 3, 1).numpy():
        im = Image.fromarray(np.ascontiguousarray(img), mode="RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(torch.float32) / 255


class DinoV2Features(TransformersFeatures):
    """DINOv2 class-token features with dgm-eval's preprocessing (module docstring).

    Args:
        path: the local weight folder (default ``$FEWSTEP_DINOV2_PATH``).
        device, batch_size: where and in what batches the network runs.
    """

    kind, cls_name = "dinov2", "Dinov2Model"

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str | None = None, batch_size: int = 64):
        super().__init__(path, device, batch_size)
        self.dim = int(self.model.config.hidden_size)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def preprocess(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 RGB images to the network's normalised 224 x 224 input (steps 2-3)."""
        return (pil_bicubic(u8, DINOV2_SIZE) - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).pooler_output
