"""The distillation trainer: bad input fails before any step, precision and checkpointing paths,
LoRA students, and students that reload (pull style and into a diffusers pipeline)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import fewstep
from fewstep.distill import CD, LCD, Distiller, DistillConfig, MixtureData, MLPNet, TensorData, load_student
from fewstep.models import DiffusersDenoiser, digits_data


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4)


@pytest.fixture(scope="module")
def digits_images():
    return digits_data("train").reshape(-1, 1, 8, 8).float()


def unet_teacher(prediction_type: str = "epsilon") -> DiffusersDenoiser:
    return DiffusersDenoiser(tiny_unet().eval(), DDPMScheduler(prediction_type=prediction_type))


def cfg(tmp_path, **kw) -> DistillConfig:
    return DistillConfig(**{"output_dir": tmp_path / "out", "steps": 3, "batch_size": 4, "progress": False, "checkpoint_every": 100, **kw})


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_input_fails_clearly_before_any_training_step(tmp_path, digits_images, digits_mixture, ddpm_schedule):
    data = TensorData(digits_images)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):  # teacher / prediction-type mismatch
        Distiller(CD(), data, unet_teacher("epsilon"), prediction_type="v_prediction", config=cfg(tmp_path))
    with pytest.raises(ValueError, match="flow_prediction"):  # a prediction type the schedule cannot have
        Distiller(CD(), data, unet_teacher(), tiny_unet(), prediction_type="flow_prediction", config=cfg(tmp_path))
    with pytest.raises(ValueError, match="distils a teacher"):  # an objective that needs a teacher, without one
        Distiller(CD(), data, None, tiny_unet(), prediction_type="epsilon", schedule=ddpm_schedule, config=cfg(tmp_path))
    with pytest.raises(ValueError, match="unconditional inputs"):  # LCD without uncond= and data that builds none
        Distiller(LCD(), data, unet_teacher(), tiny_unet(), config=cfg(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):  # an output folder that cannot be created
        Distiller(CD(), data, unet_teacher(), config=cfg(tmp_path, output_dir=blocker / "out"))
    with pytest.raises(ValueError, match="divisible"):
        Distiller(CD(), data, unet_teacher(), config=cfg(tmp_path, batch_size=3, grad_accum=2)).train()
    # A student whose shape does not match the data: caught by the preflight loss, before step 1.
    d = Distiller(CD(), MixtureData(digits_mixture), digits_mixture.denoiser(ddpm_schedule), MLPNet(dim=32),
                  prediction_type="sample", config=cfg(tmp_path, output_dir=tmp_path / "shape"))
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        d.train()
    assert not (tmp_path / "shape" / "checkpoints").exists() and not (tmp_path / "shape" / "metrics.jsonl").exists()
    with pytest.raises(TypeError, match="no option"):  # a misspelt teacher-step option
        CD(teacher_sampler="ddim", teacher_options={"etaa": 0.0})


def test_the_objective_is_bound_once(tmp_path, digits_mixture, ddpm_schedule, monkeypatch):
    obj = CD(num_intervals=4, teacher_sampler="ddim")
    calls = []
    bind = obj.bind
    monkeypatch.setattr(obj, "bind", lambda *a: (calls.append(a), bind(*a))[1])
    d = Distiller(obj, MixtureData(digits_mixture), digits_mixture.denoiser(ddpm_schedule), MLPNet(dim=64),
                  prediction_type="sample", config=cfg(tmp_path))
    assert calls == [(ddpm_schedule, (64,), 3)] and d.student.boundary == obj.boundary()


def test_image_folders_load_the_same_way_for_training_and_reference_statistics(tmp_path):
    """One helper: distillation data and reference statistics read the same files (recursively,
    sorted by path, the same extensions), in the same [-1, 1] scaling."""
    from PIL import Image

    from fewstep.distill.data import load_image_folder
    from fewstep.eval.reference import image_files, load_images

    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.tif", "sub/c.bmp", "sub/d.png", "notes.txt"]
    for name in names[:-1]:
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    files = image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == names[:-1]
    train = load_image_folder(tmp_path, 8, 1)
    assert train.shape == (4, 1, 8, 8) and torch.equal(train, load_images(files))
    assert float(train.min()) >= -1.0 and float(train.max()) <= 1.0
    assert load_image_folder(tmp_path, 4, 3).shape == (4, 3, 4, 4)  # converted to RGB and resized


# -- precision, checkpointing, attention ------------------------------------------------------------


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path, digits_images):
    teacher = unet_teacher()
    d = Distiller(CD(num_intervals=4, teacher_sampler="ddim"), TensorData(digits_images), teacher,
                  config=cfg(tmp_path, precision="bf16", steps=2, gradient_checkpointing=True, attention="sdpa"))
    start = {k: v.clone() for k, v in d.student.state_dict().items()}
    run = d.train()
    assert run.attention == "sdpa" and all(torch.isfinite(torch.tensor(run.losses)))
    state = d.student.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())  # fp32 master weights
    assert any(not torch.equal(start[k], state[k]) for k in state)  # and they were updated
    assert next(teacher.model.parameters()).dtype == torch.bfloat16  # frozen teacher stored in bf16


def test_gradient_checkpointing_gives_the_same_gradients(digits_images, ddpm_schedule):
    """Same loss and gradients (1e-6 relative) with and without gradient checkpointing."""
    from fewstep.distill import ConsistencyStudent, sample_generators
    from fewstep.distill.objective import Batch, Models

    teacher = unet_teacher()
    obj = CD(num_intervals=4, teacher_sampler="ddim")
    obj.bind(teacher.schedule, (1, 8, 8), 10)
    gens = sample_generators(0, 0, range(4))
    x0, cond = TensorData(digits_images).sample(gens, "cpu")
    grads = []
    for ckpt in (False, True):
        net = tiny_unet(1).train()
        if ckpt:
            net.enable_gradient_checkpointing()
        st = ConsistencyStudent(net, teacher.schedule, "epsilon", obj.boundary())
        loss, _ = obj.loss(Models(st, st, teacher), Batch(x0, cond, sample_generators(0, 0, range(4)), 0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert float((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-6


# -- LoRA ---------------------------------------------------------------------------------------------


def test_lcd_lora_student_trains_adapters_only(tmp_path):
    """LCM-LoRA: the student is the teacher's own UNet2DConditionModel with LoRA adapters, the
    teacher the same network with the adapters off.  At start (LoRA B = 0) both agree exactly;
    training changes only adapter weights; the saved adapter (diffusers LoRA format), loaded onto the base and fused, is the student."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4)
    teacher = DiffusersDenoiser(unet, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = copy.deepcopy(unet)  # the teacher's network before adapters: the base a LoRA student loads onto
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(32, 4, 8, 8, generator=g) * 0.5, {"encoder_hidden_states": torch.randn(32, 2, 16, generator=g)})
    obj = LCD(uncond={"encoder_hidden_states": torch.zeros(1, 2, 16)}, num_ddim_steps=10, guidance_embedding=False, target_ema=0.0)
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    d = Distiller(obj, data, teacher, lora=lora, config=cfg(tmp_path, steps=4, lr=1e-2, sampling_ema=None))
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 2, 16, generator=g)
    t = torch.tensor([500.0, 20.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(d.teacher(x, t, encoder_hidden_states=ehs), d.student.denoiser(x, t, encoder_hidden_states=ehs))
    trainable = {n for n, p in d.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    run = d.train()
    after = d.student.network.state_dict()
    changed = [k for k in after if "lora" in k and not torch.equal(after[k], torch.zeros_like(after[k]))]
    assert changed
    for k, v in base.items():  # the base weights are untouched (peft renames them .base_layer.)
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], v), k
    loaded = load_student(run.student_dir, base=plain)  # the adapter file, loaded by diffusers onto the base and fused
    assert not any("lora" in k for k in loaded.denoiser.network.state_dict())
    with torch.no_grad():
        ref = d.student(x, t, encoder_hidden_states=ehs)
        got = loaded.denoiser(x, t, encoder_hidden_states=ehs)
    assert float((ref - got).abs().max()) < 1e-5  # fused adapters = adapters applied


# -- reload ---------------------------------------------------------------------------------------------


def test_saved_student_reloads_into_a_pipeline_and_samples_with_its_sampler(tmp_path, digits_images):
    teacher = unet_teacher()
    sched_cfg = dict(teacher_config := DDPMScheduler().config)
    run = Distiller(CD(num_intervals=4, teacher_sampler="ddim"), TensorData(digits_images), teacher,
                    scheduler_config=teacher_config, config=cfg(tmp_path, steps=3)).train()
    meta = json.loads((run.student_dir / "fewstep_student.json").read_text())
    assert meta["objective"] == "cd" and meta["sampler"] == "cm_multistep" and meta["prediction_type"] == "epsilon"
    assert meta["boundary"] == {"boundary_time": -1.0, "scale": 10.0, "sigma_data": 0.5}
    assert meta["schedule"]["type"] == "vp_discrete" and meta["teacher_step"]["sampler"] == "ddim"
    loaded = load_student(run.student_dir)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # Pull style: the recorded sampler with the recorded options, nothing repeated by the user.
    with torch.no_grad():
        for nfe in (1, 2, 4):
            g1 = [torch.Generator().manual_seed(i) for i in range(3)]
            g2 = [torch.Generator().manual_seed(i) for i in range(3)]
            ours = loaded.sample(noise, nfe, generator=g1)
            ref = fewstep.sample(run_student := loaded.denoiser, noise, "cm_multistep", nfe, generator=g2)
            assert torch.equal(ours, ref)
    # The reloaded weights are the trained ones: same consistency function as in memory.
    t = torch.tensor([999.0, 300.0, 5.0], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(noise, t), run_student(noise, t))
    # Push style: a diffusers pipeline with the saved UNet and the saved FewstepScheduler config.
    from fewstep import FewstepScheduler

    scheduler = FewstepScheduler.from_pretrained(run.student_dir, subfolder="scheduler")
    assert scheduler.config.sampler == "cm_multistep" and sched_cfg["beta_schedule"] == scheduler.config.beta_schedule
    assert scheduler.config.boundary_condition == meta["boundary"]
    pipe = DDPMPipeline(unet=UNet2DModel.from_pretrained(run.student_dir / "unet"), scheduler=scheduler)
    for nfe in (1, 2, 4):
        images = pipe(batch_size=3, num_inference_steps=nfe, generator=torch.Generator().manual_seed(0), output_type="np").images
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the pipeline draws its noise first, then re-noises from the same generator
            x = loaded.sample(torch.randn(3, 1, 8, 8, generator=g), nfe, generator=g)
        expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        # the scheduler applies the student's boundary condition: the same tensors as pull style
        assert abs(images - expected).max() == 0.0


def test_metrics_csv_always_and_trackers_when_installed(tmp_path, monkeypatch, digits_mixture, ddpm_schedule):
    """metrics.csv and metrics.jsonl hold the same rows; a tracker that is installed (W&B here, in
    its disabled mode: no network, no files) receives them through accelerate; one that is not
    installed is refused before anything runs."""
    import csv
    import importlib.util

    cfg_kw = dict(steps=4, log_every=2)
    if importlib.util.find_spec("wandb") is not None:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        cfg_kw["log_with"] = ("wandb",)
    d = Distiller(CD(num_intervals=4, teacher_sampler="ddim"), MixtureData(digits_mixture), digits_mixture.denoiser(ddpm_schedule),
                  MLPNet(dim=64, hidden=32, depth=1), prediction_type="sample", config=cfg(tmp_path, **cfg_kw))
    d.train()
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    js = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in js] == [2, 4]
    assert all(abs(float(a["loss"]) - b["loss"]) < 1e-12 for a, b in zip(rows, js))
    missing = next((t for t in ("tensorboard", "wandb") if importlib.util.find_spec(t) is None), None)
    if missing is not None:
        with pytest.raises(ValueError, match=f"log_with={missing!r} needs the {missing} package"):
            DistillConfig(log_with=(missing,)).check()
