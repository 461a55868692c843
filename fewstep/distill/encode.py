"""The teacher pipeline's encoders: VAE latents and text conditioning for latent consistency
distillation, SD 1.5-style (one CLIP text encoder) and SDXL-style (two text encoders, pooled
embedding and micro-conditioning ``time_ids``).

* **Latents.**  ``z = (sample(latent_dist) - shift_factor) * scaling_factor`` with the VAE
  config's ``scaling_factor`` and ``shift_factor`` (``None``: 0), the sample drawn from each
  example's own generator (so the result does not depend on batching or on the number of
  processes), the VAE in float32 (diffusers' LCM scripts keep it there: fp16 VAEs overflow).
* **SD 1.5.**  ``encoder_hidden_states = text_encoder(tokenizer(caption, padding="max_length",
  truncation))[0]``; the unconditional input is the empty prompt's states (diffusers'
  ``train_lcm_distill_sd_wds.py``).
* **SDXL.**  The penultimate hidden states of both encoders, concatenated on the feature axis,
  as ``encoder_hidden_states``; ``added_cond_kwargs = {"text_embeds": pooled output of the second
  encoder (CLIPTextModelWithProjection), "time_ids": original size + crop top-left + target
  size}`` (``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``).  The
  unconditional input is zeros for both embeddings (``force_zeros_for_empty_prompt``, as the SDXL
  pipeline and ``train_lcm_distill_lora_sdxl.py``) with the sample's own ``time_ids`` (``None``
  in the unconditional structure: :class:`fewstep.models.ClassifierFreeGuidance` then takes the
  conditional value for both branches).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["PipelineEncoder"]


class PipelineEncoder:
    """VAE and text encoders of a Stable Diffusion (one text encoder) or SDXL (two) pipeline.

    Args:
        vae: an ``AutoencoderKL``.
        tokenizers, text_encoders: one each (SD 1.5) or two (SDXL, the second with projection).
        resolution: the default pixel resolution (default: the VAE's ``sample_size``).
        text_dtype: dtype of the text encoders (e.g. bf16 on GPUs; the VAE stays float32).
        encode_batch: images per VAE call.
    """

    def __init__(self, vae: Any, tokenizers: Sequence[Any], text_encoders: Sequence[Any], *, resolution: int | None = None,
                 text_dtype: torch.dtype = torch.float32, encode_batch: int = 8):
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ValueError(f"give one tokenizer and text encoder (SD 1.5) or two of each (SDXL), got {len(tokenizers)} and {len(text_encoders)}")
        self.vae = vae.eval().requires_grad_(False).to(torch.float32)
        self.tokenizers = list(tokenizers)
        self.text_encoders = [t.eval().requires_grad_(False).to(text_dtype) for t in text_encoders]
        self.kind = "sdxl" if len(text_encoders) == 2 else "sd"
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        size = resolution if resolution is not None else cfg.sample_size
        self.resolution = int(size if isinstance(size, int) else size[0])
        self.encode_batch = int(encode_batch)
        self._uncond: dict[str, Any] | None = None

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "PipelineEncoder":
        """From a loaded diffusers pipeline (``vae``, ``tokenizer``/``text_encoder`` and, for
        SDXL, ``tokenizer_2``/``text_encoder_2``)."""
        toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
        encs = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
        return cls(pipe.vae, toks, encs, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, **kwargs: Any) -> "PipelineEncoder":
        """From a local pipeline folder (``vae/``, ``tokenizer/``, ``text_encoder/`` and
        optionally ``tokenizer_2/``, ``text_encoder_2/``), safetensors weights only."""
        try:
            import transformers
        except ImportError:
            raise ImportError("image-text distillation needs transformers for the text encoders: pip install 'fewstep[text]'") from None
        from diffusers import AutoencoderKL

        from fewstep._util import require_safetensors

        folder = Path(folder)
        require_safetensors(folder / "vae", "the teacher's VAE folder")
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True)
        toks, encs = [], []
        for sub in ("", "_2"):
            if not (folder / f"text_encoder{sub}").is_dir():
                continue
            enc_dir = folder / f"text_encoder{sub}"
            require_safetensors(enc_dir, f"the teacher's text_encoder{sub} folder")
            arch = _read_architecture(enc_dir)
            enc_cls = getattr(transformers, arch, None)
            if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection") or enc_cls is None:
                raise ValueError(f"{enc_dir}: text encoder class {arch!r} is not supported (CLIPTextModel, CLIPTextModelWithProjection)")
            encs.append(enc_cls.from_pretrained(enc_dir, use_safetensors=True, local_files_only=True))
            toks.append(transformers.CLIPTokenizer.from_pretrained(folder / f"tokenizer{sub}", local_files_only=True))
        if not encs:
            raise ValueError(f"{folder} has no text_encoder/ folder: a text-to-image pipeline is needed for image-text data")
        return cls(vae, toks, encs, **kwargs)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    def to(self, device: Any) -> "PipelineEncoder":
        self.vae.to(device)
        for t in self.text_encoders:
            t.to(device)
        return self

    # -- images ------------------------------------------------------------------------------------
    def latents(self, pixels: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """``(sample(latent_dist) - shift_factor) * scaling_factor`` of (B, 3, H, W) pixels in
        [-1, 1]; sample ``b``'s draw from ``gens[b]``."""
        dev = next(self.vae.parameters()).device
        out = []
        with torch.no_grad():
            for lo in range(0, pixels.shape[0], self.encode_batch):
                dist = self.vae.encode(pixels[lo : lo + self.encode_batch].to(dev, torch.float32)).latent_dist
                noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens[lo : lo + self.encode_batch]]).to(dev)
                out.append(dist.mean + dist.std * noise)
        return (torch.cat(out) - self.shift_factor) * self.scaling_factor

    # -- text ----------------------------------------------------------------------------------------
    def _tokens(self, tok: Any, captions: Sequence[str], device: Any) -> torch.Tensor:
        return tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)

    def text(self, captions: Sequence[str], original_size: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
             target_size: int | None = None) -> dict[str, Any]:
        """The UNet's conditioning for ``captions`` (module docstring)."""
        dev = next(self.text_encoders[0].parameters()).device
        with torch.no_grad():
            if self.kind == "sd":
                return {"encoder_hidden_states": self.text_encoders[0](self._tokens(self.tokenizers[0], captions, dev))[0].float()}
            states = []
            pooled = None
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                out = enc(self._tokens(tok, captions, dev), output_hidden_states=True)
                pooled = out[0]
                states.append(out.hidden_states[-2])
        n = len(captions)
        size = int(target_size if target_size is not None else self.resolution)
        if original_size is None:
            original_size = torch.tensor([[size, size]] * n)
        if crop_top_left is None:
            crop_top_left = torch.zeros(n, 2, dtype=torch.long)
        time_ids = torch.cat([original_size.reshape(n, 2), crop_top_left.reshape(n, 2), torch.tensor([[size, size]] * n)], dim=1)
        return {"encoder_hidden_states": torch.cat(states, dim=-1).float(),
                "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": time_ids.to(dev, torch.float32)}}

    def unconditional(self) -> dict[str, Any]:
        """The recipe's unconditional inputs (one row): SD 1.5 the empty prompt; SDXL zeros and the
        sample's own ``time_ids`` (``None``)."""
        if self._uncond is None:
            c = self.text([""])
            if self.kind == "sdxl":
                c = {"encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"]),
                     "added_cond_kwargs": {"text_embeds": torch.zeros_like(c["added_cond_kwargs"]["text_embeds"]), "time_ids": None}}
            self._uncond = {k: (v.cpu() if isinstance(v, torch.Tensor) else {k2: (v2.cpu() if v2 is not None else None) for k2, v2 in v.items()})
                            for k, v in c.items()}
        return self._uncond

    def encode(self, raw: dict[str, Any], gens: Sequence[torch.Generator], device: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(latents, cond)`` on ``device`` for a collated batch of decoded examples."""
        self.to(device)
        x0 = self.latents(raw["pixels"], gens)
        cond = self.text(raw["caption"], raw.get("original_size"), raw.get("crop_top_left"), raw["pixels"].shape[-1])
        return x0.to(device), cond


def _read_architecture(folder: Path) -> str:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return str((cfg.get("architectures") or ["CLIPTextModel"])[0])
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{folder}/config.json is not a readable text-encoder config ({err})") from None
