"""The examples run on locally saved pipelines (no download)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

ROOT = Path(__file__).resolve().parents[1]


def test_swap_sampler_on_a_saved_ddpm_pipeline(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "imgs"
    r = subprocess.run([sys.executable, str(ROOT / "examples/swap_sampler.py"), str(tmp_path / "pipe"), "--nfe", "5",
                        "--sampler", "dpmpp_2s", "--num-images", "2", "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dpmpp_2s_nfe5_0.png", "dpmpp_2s_nfe5_1.png"]
    r = subprocess.run([sys.executable, str(ROOT / "examples/swap_sampler.py"), str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "model_index.json" in r.stderr
