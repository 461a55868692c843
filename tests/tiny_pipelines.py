"""Tiny Stable-Diffusion-shaped and SDXL-shaped components built from configs (random weights,
nothing downloaded), a CLIP tokenizer from a small vocabulary written here, and a folder of
image-caption files, for the distillation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "red", "blue", "green", "cat", "dog", "square", "circle", "on", "grass", "sky", "photo", "of"]


def tokenizer(folder: Path):
    """A ``CLIPTokenizer`` whose vocabulary is the start/end tokens, single letters and ``WORDS``
    (as whole words); no merges beyond the letters, so every word of WORDS is one token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = sorted({c for w in WORDS for c in w})
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for w in WORDS:  # merge the letters of each word left to right into the whole word
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merges.append(f"{a} {b}")
            parts = [a + b] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def text_encoder(vocab_size: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=12, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1).eval()


def unet(sdxl: bool = False, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8) if sdxl else {}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                cross_attention_dim=64 if sdxl else 32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4, **extra).eval()


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def pipeline(folder: Path, sdxl: bool = False):
    """A tiny pipeline (saved to ``folder`` with ``save_pretrained``) and the loaded object."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tok = tokenizer(folder / "_tok")
    parts = dict(vae=vae(), text_encoder=text_encoder(len(tok), projection=False, seed=1), tokenizer=tok, unet=unet(sdxl), scheduler=scheduler())
    if sdxl:
        tok2 = tokenizer(folder / "_tok2")
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder(len(tok2), projection=True, seed=2), tokenizer_2=tok2)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def image_caption_folder(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` images of two colours and sizes (some not square, to exercise resizing and cropping)
    with captions naming the colour."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    for i in range(n):
        name = list(colours)[i % 3]
        h, w = (20, 28) if i % 2 else (16, 16)
        img = np.clip(np.array(colours[name]) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of a {name} square")
    return folder
