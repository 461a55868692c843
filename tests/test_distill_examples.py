"""The distillation examples and `fewstep distill` run end to end on tiny local models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV_THREADS = {"OMP_NUM_THREADS": "1"}


def _run(cmd):
    import os

    import fewstep

    root = str(Path(fewstep.__file__).resolve().parents[1])  # the fewstep under test, not another installed copy
    env = {**os.environ, **ENV_THREADS, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _tiny_pipeline(folder: Path) -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)


def test_distill_a_saved_diffusers_pipeline(tmp_path):
    _tiny_pipeline(tmp_path / "pipe")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(images / f"{i}.png")
    out = _run([sys.executable, str(ROOT / "examples/distill_diffusers_checkpoint.py"), str(tmp_path / "pipe"), "--data", str(images),
                "--steps", "2", "--batch-size", "4", "--teacher-sampler", "ddim", "--num-intervals", "4", "--cpu",
                "--out", str(tmp_path / "run")])
    assert "student (cm_multistep) saved" in out
    assert (tmp_path / "run" / "student" / "unet" / "config.json").is_file()


def test_lcd_example_runs(tmp_path):
    out = _run([sys.executable, str(ROOT / "examples/lcd_unet2dcondition.py"), "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "lcd")])
    assert "lcm, 4 step(s)" in out and "guidance embedding: 64" in out


def test_fewstep_distill_cli_on_a_teacher_folder(tmp_path, capsys):
    """`fewstep distill --teacher FOLDER --data FILE`: trains, prints the quality table (student at
    1/2/4 steps, teacher at 10/50 NFE) and writes quality.json next to the student."""
    from fewstep.cli import main

    _tiny_pipeline(tmp_path / "pipe")
    torch.save(torch.rand(16, 1, 8, 8) * 2 - 1, tmp_path / "data.pt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["distill", "--teacher", str(tmp_path / "pipe"), "--data", str(tmp_path / "data.pt"), "--objective", "mcd",
                     "--num-intervals", "4", "--segments", "2", "--steps", "2", "--batch-size", "4", "--probe-samples", "8",
                     "--out", str(tmp_path / "run"), "--quiet"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads((tmp_path / "run" / "quality.json").read_text())
    assert [(r["model"].split(" ")[0], r["nfe"]) for r in rows] == [("student", 1), ("student", 2), ("student", 4), ("teacher", 10), ("teacher", 50)]
    assert "RMSE to teacher ODE map" in out.out and "student (mcd, mcd)" in out.out
    assert main(["distill", "--teacher", str(tmp_path / "pipe")]) == 2 and "--data" in capsys.readouterr().err


def test_fewstep_distill_default_is_the_embedded_digits_teacher(tmp_path, capsys):
    """No model arguments: the embedded digits UNet, FID on digit features (here 2 steps and 16
    probe samples; the full default run is recorded in benchmarks/RESULTS.md)."""
    from fewstep.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["distill", "--steps", "2", "--probe-samples", "16", "--validate-every", "0", "--out", str(tmp_path / "d"), "--quiet"])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert code == 0 and "FID (digit features)" in out and "teacher (dpmpp_2m)" in out
    meta = json.loads((tmp_path / "d" / "student" / "fewstep_student.json").read_text())
    assert meta["objective"] == "cd" and meta["sampler"] == "cm_multistep"


def test_fewstep_distill_lcd_and_lcm_lora_on_text_to_image_pipelines(tmp_path, capsys):
    """`fewstep distill --objective lcd` on a tiny SD-shaped pipeline folder and image-caption
    files: exits 0 (the quality probe uses the guided teacher at the guidance scale), writes the
    validation grid; `--precompute` writes latent shards that a second run trains on; `--lora` on
    an SDXL-shaped pipeline writes the adapter in diffusers' LoRA format."""
    import tiny_pipelines as tp
    from PIL import Image

    from fewstep.cli import main

    tp.pipeline(tmp_path / "sd")
    tp.pipeline(tmp_path / "xl", sdxl=True)
    images = tp.image_caption_folder(tmp_path / "images", n=8)
    common = ["--objective", "lcd", "--num-intervals", "10", "--steps", "2", "--batch-size", "2", "--probe-samples", "4", "--quiet",
              "--num-workers", "0"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["distill", "--teacher", str(tmp_path / "sd"), "--data", str(images), *common, "--guidance-range", "2,6",
                     "--validation-prompts", "a photo of a red square", "a blue circle", "--out", str(tmp_path / "run")])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "teacher (dpmpp_2m, w=4)" in out.out and "student (lcd, lcm)" in out.out
        grid = Image.open(tmp_path / "run" / "validation" / "step-0000002.png")
        assert grid.size == (2 * 16, 3 * 16)  # a column per prompt, a row per NFE (1, 2, 4)
        assert main(["distill", "--teacher", str(tmp_path / "sd"), "--data", str(images), *common,
                     "--precompute", str(tmp_path / "latents"), "--out", str(tmp_path / "unused")]) == 0
        assert (tmp_path / "latents" / "index.json").is_file() and not (tmp_path / "unused").exists()
        assert main(["distill", "--teacher", str(tmp_path / "sd"), "--data", str(tmp_path / "latents"), *common,
                     "--out", str(tmp_path / "run2")]) == 0
        code = main(["distill", "--teacher", str(tmp_path / "xl"), "--data", str(images), *common, "--lora", "--lora-rank", "4",
                     "--out", str(tmp_path / "lora")])
        out = capsys.readouterr()
        assert code == 0, out.err
    finally:
        torch.set_num_threads(n)
    assert (tmp_path / "lora" / "student" / "pytorch_lora_weights.safetensors").is_file()
    meta = json.loads((tmp_path / "lora" / "student" / "fewstep_student.json").read_text())
    assert meta["guidance"]["range"] == [4.0, 16.0] and meta["guidance"]["embedding"] is False


def _example(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_sd15_and_sdxl_lora_examples_run_on_tiny_pipelines(tmp_path, one_thread, capsys):
    """examples/lcm_sd15.py (with --precompute, then training on the latent shards) and
    examples/lcm_lora_sdxl.py on tiny local pipeline folders and image-caption files (in-process:
    a new interpreter per example would spend its time importing)."""
    import tiny_pipelines as tp

    tp.pipeline(tmp_path / "sd")
    tp.pipeline(tmp_path / "xl", sdxl=True)
    images = tp.image_caption_folder(tmp_path / "images", n=6)
    small = ["--steps", "2", "--batch-size", "2", "--num-ddim-steps", "10", "--num-workers", "0", "--cpu"]
    sd15, sdxl = _example("lcm_sd15"), _example("lcm_lora_sdxl")
    assert sd15([str(tmp_path / "sd"), "--data", str(images), "--precompute", str(tmp_path / "lat"), *small]) == 0
    assert sd15([str(tmp_path / "sd"), "--data", str(tmp_path / "lat"), *small, "--out", str(tmp_path / "sd-run")]) == 0
    assert "student saved" in capsys.readouterr().out and (tmp_path / "sd-run" / "validation" / "step-0000002.png").is_file()
    assert sdxl([str(tmp_path / "xl"), "--data", str(images), *small, "--lora-rank", "4", "--out", str(tmp_path / "xl-run")]) == 0
    assert "LoRA saved" in capsys.readouterr().out and (tmp_path / "xl-run" / "student" / "pytorch_lora_weights.safetensors").is_file()


def test_fewstep_distill_lcd_on_a_tensor_dict_exits_0_with_the_guided_probe(tmp_path, one_thread, capsys):
    """`--objective lcd --data FILE.pt` (latents, text states and 'uncond'): trains, saves and exits
    0; the probe's teacher is the guided one at the middle of the guidance range (formerly: rc 2)."""
    import tiny_pipelines as tp

    from fewstep.cli import main

    tp.pipeline(tmp_path / "sd")
    torch.save({"latents": torch.randn(8, 4, 8, 8), "encoder_hidden_states": torch.randn(8, 12, 32),
                "uncond": {"encoder_hidden_states": torch.zeros(1, 12, 32)}}, tmp_path / "d.pt")
    code = main(["distill", "--objective", "lcd", "--teacher", str(tmp_path / "sd"), "--data", str(tmp_path / "d.pt"), "--num-intervals", "10",
                 "--steps", "2", "--batch-size", "2", "--probe-samples", "4", "--out", str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "teacher (dpmpp_2m, w=11)" in out.out  # (6 + 16) / 2
    rows = json.loads((tmp_path / "run" / "quality.json").read_text())
    assert len(rows) == 5 and all(r["rmse"] == r["rmse"] for r in rows)  # finite numbers, no NaN


def test_fewstep_distill_slct_and_immiscible_ict(tmp_path, capsys):
    """`--objective slct --slct-without diffusion` and `--objective ict --immiscible fp16` on a
    teacher folder: both train, and the student's metadata records the ingredients and the
    assignment (sLCT's OT coupling with the squared cost; iCT's fp16 assignment with the L2 cost)."""
    from fewstep.cli import main

    _tiny_pipeline(tmp_path / "pipe")
    torch.save(torch.rand(16, 1, 8, 8) * 2 - 1, tmp_path / "data.pt")
    common = ["distill", "--teacher", str(tmp_path / "pipe"), "--data", str(tmp_path / "data.pt"), "--steps", "2",
              "--batch-size", "4", "--probe-samples", "4", "--quiet"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--objective", "slct", "--slct-without", "diffusion", "--out", str(tmp_path / "s")]) == 0
        assert main([*common, "--objective", "ict", "--immiscible", "fp16", "--out", str(tmp_path / "i")]) == 0
    finally:
        torch.set_num_threads(n)
    s = json.loads((tmp_path / "s" / "student" / "fewstep_student.json").read_text())
    i = json.loads((tmp_path / "i" / "student" / "fewstep_student.json").read_text())
    assert s["objective"] == "slct" and s["loss"] == "cauchy" and s["diffusion_loss"]["weight"] == 0.0
    assert s["noise_assignment"] == {"method": "exact", "cost": "sqeuclidean", "block_size": None}
    assert i["objective"] == "ict" and i["noise_assignment"] == {"method": "fp16", "cost": "l2", "block_size": None}
    assert "student (slct, cm_multistep)" in capsys.readouterr().out
