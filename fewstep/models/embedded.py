"""The embedded neural model: a small diffusers ``UNet2DModel`` trained on scikit-learn's 8x8 digits.

It is the neural counterpart of the exact digits mixture (:meth:`GaussianMixture.digits`): the same
data, the same scaling and the same train/test split, so a study can run on both.  The weights ship
inside the package in diffusers format (``fewstep/models/data/digits_unet/config.json`` and
``diffusion_pytorch_model.safetensors``) and are produced by ``python scripts/train_digits_unet.py``
(CPU, deterministic seed).  Nothing is downloaded.

Conventions (relied on by the distillation and evaluation code):

* images are ``(N, 1, 8, 8)`` float tensors in ``[-1, 1]``: exactly
  ``fewstep.models.mixture.digits_data(split)`` reshaped (:func:`digits_images`);
* the network predicts the noise ``eps`` (``prediction_type="epsilon"``) under DDPM's linear
  schedule (Ho et al. 2020: betas ``1e-4 .. 0.02``, 1000 training steps), :func:`digits_scheduler`;
* :func:`digits_unet` returns a fresh module on every call (callers may train it).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from fewstep.models.diffusers_models import DiffusersDenoiser

from fewstep.models.mixture import digits_data

__all__ = [
    "DIGITS_UNET_DIR",
    "digits_images",
    "digits_unet",
    "digits_scheduler",
    "digits_denoiser",
    "digits_pipeline",
    "digits_unet_config",
    "digits_scheduler_config",
]

#: Folder of the shipped weights, relative to ``fewstep/models``.
DIGITS_UNET_DIR = "data/digits_unet"
_CONFIG = "config.json"
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_TRAIN_SCRIPT = "scripts/train_digits_unet.py"


def digits_scheduler_config() -> dict[str, Any]:
    """The DDPM scheduler the digits UNet was trained with (diffusers ``DDPMScheduler`` arguments)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
    }


def digits_unet_config() -> dict[str, Any]:
    """Architecture of the digits UNet (``UNet2DModel`` keyword arguments); the training script
    builds the network from this, and the shipped ``config.json`` records it."""
    return {
        "sample_size": 8,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 16,
        "attention_head_dim": 16,
    }


def digits_images(split: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The digits as images, ``(N, 1, 8, 8)`` in ``[-1, 1]`` (``digits_data(split)`` reshaped);
    ``split`` is ``None``/``"all"`` (1797), ``"train"`` (1438) or ``"test"`` (359)."""
    return digits_data(split).reshape(-1, 1, 8, 8).to(dtype)


def _weights_dir() -> Path:
    """The installed folder of the shipped weights."""
    try:
        root = importlib.resources.files(__package__ or "fewstep.models")
        return Path(str(root.joinpath(DIGITS_UNET_DIR)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual importers
        return Path(__file__).resolve().parent / DIGITS_UNET_DIR


@functools.lru_cache(maxsize=1)
def _load_shipped() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    folder = _weights_dir()
    for name in (_CONFIG, _WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"the embedded digits UNet is missing {folder / name}; reinstall fewstep, or regenerate the "
                f"weights with `python {_TRAIN_SCRIPT}` (CPU, under 20 minutes)"
            )
    config = json.loads((folder / _CONFIG).read_text())
    return config, load_file(str(folder / _WEIGHTS))


def digits_unet(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "UNet2DModel":
    """A fresh ``diffusers.UNet2DModel`` with the shipped weights, in eval mode, on ``device``
    (default CPU) and in ``dtype`` (default float32, the shipped precision).

    Raises ``FileNotFoundError`` naming the missing file if the weights are absent."""
    from diffusers import UNet2DModel

    config, state = _load_shipped()
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = UNet2DModel.from_config(kwargs)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    model.eval()
    if device is not None:
        model = model.to(device=device)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model


def digits_scheduler() -> "DDPMScheduler":
    """``diffusers.DDPMScheduler`` of the digits UNet (linear betas 1e-4..0.02, 1000 steps, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**digits_scheduler_config())


def digits_denoiser(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiffusersDenoiser":
    """The digits UNet as a fewstep denoiser (:class:`fewstep.models.DiffusersDenoiser`, epsilon
    prediction) whose schedule is :func:`fewstep.schedules.from_diffusers` of
    :func:`digits_scheduler`; ``device`` and ``dtype`` as for :func:`digits_unet`."""
    from fewstep.models.diffusers_models import DiffusersDenoiser

    return DiffusersDenoiser(digits_unet(device, dtype), digits_scheduler())


def digits_pipeline() -> "DDPMPipeline":
    """``diffusers.DDPMPipeline`` of the digits UNet and its DDPM scheduler (images 8x8 grey, on
    the CPU); swap in a fewstep sampler with ``pipe.scheduler = FewstepScheduler.from_config(...)``."""
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=digits_unet(), scheduler=digits_scheduler())
