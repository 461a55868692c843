"""Stable-Diffusion-class distillation end to end on tiny pipelines built here: image-caption
files -> DataLoader workers (decode, resize, centre crop) -> the pipeline's VAE and text encoders
-> LCD (full UNet with guidance embedding, SD 1.5-shaped) and LCM-LoRA (SDXL-shaped: two text
encoders, pooled embedding, time ids) -> a student folder that diffusers loads
(``from_pretrained`` / ``load_lora_weights`` + ``fuse_lora``) and samples with ``LCMScheduler``
and with ``FewstepScheduler``, equal to ``fewstep.sample`` on the same noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fewstep
import tiny_pipelines as tp
from fewstep.distill import LCD, Distiller, DistillConfig, load_student
from fewstep.distill.encode import PipelineEncoder
from fewstep.distill.stream import ImageTextData, ImageTextFolder, LatentShards, precompute
from fewstep.models import DiffusersDenoiser


class Float32Noise(fewstep.samplers.core.NoiseSource):
    """Draws as diffusers' ``randn_tensor`` does for a float32 sample on the CPU."""

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.dtype)


def _cfg(out, **kw):
    return DistillConfig(**{"output_dir": out, "steps": 40, "batch_size": 4, "lr": 2e-4, "progress": False, "log_every": 5,
                            "checkpoint_every": 1000, "num_workers": 2, "cpu": True, **kw})


def _fixed_loss(obj, data, student, teacher, autocast=False):
    """The objective's loss on 4 fixed batches of 12 (fixed examples, noise, intervals, guidance
    scales), with the student as its own target: what training should lower."""
    from fewstep.distill import sample_generators
    from fewstep.distill.objective import Batch, Models

    total = 0.0
    for k in range(4):
        x0, cond = data.prepare(data.read(range(12), 0), sample_generators(99, k, range(12)), "cpu")
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            total += float(obj.loss(Models(student, student, teacher), Batch(x0, cond, sample_generators(99, k, range(12)), 0))[0])
    return total / 4


def _pipeline_latents(pipe, noise, nfe, **kw):
    with torch.no_grad():
        return pipe(prompt=["a photo of a red square"] * noise.shape[0], num_inference_steps=nfe, latents=noise.clone(), output_type="latent",
                    generator=torch.Generator().manual_seed(3), **kw).images


def test_tiny_sd15_lcd_from_image_caption_files(tmp_path, one_thread):
    """SD 1.5-shaped: LCD with a guidance embedding, 40 steps from 12 image-caption files (two
    DataLoader workers, on-the-fly VAE and CLIP encoding, the empty prompt as unconditional input).
    The Huber loss on fixed batches falls by 20% or more (measured: 27%); the saved UNet loads with
    ``from_pretrained`` into a ``StableDiffusionPipeline`` and, with ``LCMScheduler`` and with the
    saved ``FewstepScheduler``, gives the latents of ``fewstep.sample(student, noise, "lcm")`` at 1
    and 2 steps (relative 1e-5)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from fewstep import FewstepScheduler

    pipe = tp.pipeline(tmp_path / "sd")
    data = ImageTextData(ImageTextFolder(tp.image_caption_folder(tmp_path / "images")), PipelineEncoder.from_folder(tmp_path / "sd"))
    assert data.shape == (4, 8, 8)
    teacher = DiffusersDenoiser(pipe.unet, pipe.scheduler)
    obj = LCD(num_ddim_steps=10, guidance_range=(2.0, 6.0))  # uncond=None: the empty prompt, from the encoder
    d = Distiller(obj, data, teacher, guidance_embedding_dim=32, scheduler_config=dict(pipe.scheduler.config), config=_cfg(tmp_path / "run"))
    before = _fixed_loss(obj, data, d.student, teacher)
    run = d.train()
    after = _fixed_loss(obj, data, d.student, teacher)
    assert after < 0.8 * before, (before, after)
    assert torch.equal(obj.uncond["encoder_hidden_states"], data.unconditional()["encoder_hidden_states"])
    student = load_student(run.student_dir)
    meta = json.loads((run.student_dir / "fewstep_student.json").read_text())
    assert meta["exported"] == "sampling_ema" and meta["guidance"]["range"] == [2.0, 6.0]
    unet = UNet2DConditionModel.from_pretrained(run.student_dir / "unet")
    assert unet.config.time_cond_proj_dim == 32
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt_states = pipe.encode_prompt(["a photo of a red square"] * 2, "cpu", 1, False)[0]
    w = 4.0
    for nfe in (1, 2):
        ours = student.sample(noise, nfe, cond={"encoder_hidden_states": prompt_states, "guidance_scale": w},
                              generator=Float32Noise(torch.Generator().manual_seed(3)))
        lcm = StableDiffusionPipeline(**{**pipe.components, "unet": unet,
                                         "scheduler": LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=10)})
        lcm.set_progress_bar_config(disable=True)
        got = _pipeline_latents(lcm, noise, nfe, guidance_scale=w)
        assert float((got - ours).norm() / ours.norm()) < 1e-5, nfe
        push = StableDiffusionPipeline(**{**pipe.components, "unet": unet,
                                          "scheduler": FewstepScheduler.from_pretrained(run.student_dir, subfolder="scheduler")})
        push.set_progress_bar_config(disable=True)
        got = _pipeline_latents(push, noise, nfe, guidance_scale=w)
        assert float((got - ours).norm() / ours.norm()) < 1e-5, nfe


def test_tiny_sdxl_lcm_lora_from_image_caption_files(tmp_path, one_thread):
    """SDXL-shaped (two text encoders, ``text_time`` embedding with pooled text embeddings and
    time ids from each image's original size and crop): LCM-LoRA, 40 steps, bf16 autocast with
    the frozen base in bf16 and fp32 adapters.  The loss on fixed batches falls by 20% or more
    (measured: 31%);
    checkpoints hold
    the adapters only; ``pipe.load_lora_weights(student_folder)`` + ``pipe.fuse_lora()`` gives a
    UNet whose LCM sampling (``LCMScheduler`` and ``FewstepScheduler``) equals ``fewstep.sample``
    of ``load_student(folder, base=teacher UNet)`` at 1 and 2 steps (relative 1e-5)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from fewstep import FewstepScheduler

    pipe = tp.pipeline(tmp_path / "xl", sdxl=True)
    data = ImageTextData(ImageTextFolder(tp.image_caption_folder(tmp_path / "images")), PipelineEncoder.from_folder(tmp_path / "xl"))
    base = UNet2DConditionModel.from_pretrained(tmp_path / "xl" / "unet")
    teacher = DiffusersDenoiser(UNet2DConditionModel.from_pretrained(tmp_path / "xl" / "unet"), pipe.scheduler)
    obj = LCD(num_ddim_steps=10, guidance_embedding=False, target_ema=0.0, loss="l2")
    assert obj.guidance_range == (4.0, 16.0)  # the LCM-LoRA recipe's w' in [3, 15]
    uncond = data.unconditional()
    assert float(uncond["encoder_hidden_states"].abs().max()) == 0 and uncond["added_cond_kwargs"]["time_ids"] is None
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"])
    d = Distiller(obj, data, teacher, lora=lora, scheduler_config=dict(pipe.scheduler.config),
                  config=_cfg(tmp_path / "run", precision="bf16", lr=1e-3, checkpoint_every=20))
    before = _fixed_loss(obj, data, d.student, d.teacher, autocast=True)
    run = d.train()
    after = _fixed_loss(obj, data, d.student, d.teacher, autocast=True)
    assert after < 0.8 * before, (before, after)
    dtypes = {p.dtype for n, p in d.student.named_parameters() if "lora" not in n}
    assert dtypes == {torch.bfloat16} and {p.dtype for p in d.student.parameters() if p.requires_grad} == {torch.float32}
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert (ckpt / "lora.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file

    assert all("lora" in k for k in load_file(str(ckpt / "lora.safetensors")))
    assert (run.student_dir / "pytorch_lora_weights.safetensors").is_file() and not (run.student_dir / "unet").exists()
    student = load_student(run.student_dir, base=base)
    prompt = ["a photo of a red square"] * 2
    pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)  # what the pipeline passes for a 16x16 image
    cond = {"encoder_hidden_states": pe, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fused = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", use_safetensors=True, local_files_only=True)
    fused.load_lora_weights(run.student_dir)
    fused.fuse_lora()
    fused.set_progress_bar_config(disable=True)
    for nfe in (1, 2):
        ours = student.sample(noise, nfe, cond=cond, generator=Float32Noise(torch.Generator().manual_seed(3)))
        for sched in (LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=10),
                      FewstepScheduler.from_pretrained(run.student_dir, subfolder="scheduler")):
            fused.scheduler = sched
            got = _pipeline_latents(fused, noise, nfe, guidance_scale=1.0, height=16, width=16)
            assert float((got - ours).norm() / ours.norm()) < 1e-5, (nfe, type(sched).__name__)


def test_precomputed_latent_shards_replay_the_encoder(tmp_path, one_thread):
    """``precompute`` writes safetensors shards once; ``LatentShards`` reads back, by index, the
    encoder's output for each example (its VAE draw from ``(seed, index)``) with nested SDXL
    conditioning and the unconditional inputs (``None`` time ids kept), and trains."""
    pipe = tp.pipeline(tmp_path / "xl", sdxl=True)
    enc = PipelineEncoder.from_folder(tmp_path / "xl")
    data = ImageTextData(ImageTextFolder(tp.image_caption_folder(tmp_path / "images", n=7)), enc)
    precompute(data, tmp_path / "latents", shard_size=3, batch_size=2, seed=5)
    shards = LatentShards(tmp_path / "latents")
    assert shards.num_examples == 7 and shards.shape == data.shape and len(shards.files) == 3
    from fewstep._util import seeded_generator
    from fewstep.distill.stream import _collate

    for i in (0, 4, 6):
        raw = _collate([data.load(i, i, 5)])
        x, c = data.prepare(raw, [seeded_generator("distill-precompute", 5, i)], "cpu")
        got = shards.prepare({"tensors": {k: v[None] for k, v in shards.load(i, i, 0)["tensors"].items()}}, [], "cpu")
        assert torch.allclose(got[0], x, rtol=0, atol=1e-6)
        for k in ("text_embeds", "time_ids"):
            assert torch.allclose(got[1]["added_cond_kwargs"][k], c["added_cond_kwargs"][k], rtol=0, atol=1e-6)
    u = shards.unconditional()
    assert u["added_cond_kwargs"]["time_ids"] is None and torch.equal(u["encoder_hidden_states"], enc.unconditional()["encoder_hidden_states"])
    teacher = DiffusersDenoiser(pipe.unet, pipe.scheduler)
    run = Distiller(LCD(num_ddim_steps=10, guidance_embedding=False, target_ema=0.0), shards, teacher, tp.unet(sdxl=True),
                    config=_cfg(tmp_path / "run", steps=4, num_workers=0)).train()
    assert all(math.isfinite(v) for v in run.losses)
