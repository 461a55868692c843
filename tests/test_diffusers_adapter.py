"""FewstepScheduler: the push front door gives the same tensors as fewstep.sample, and runs in
diffusers pipelines built locally from small random components."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

import fewstep
from fewstep import FewstepScheduler
from fewstep.models import ClassifierFreeGuidance, DiffusersDenoiser

ALL_PUSH = [n for n in fewstep.available() if fewstep.spec(n).push_style]


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize("name", ALL_PUSH)
def test_ddpm_pipeline_equals_pull(unet, name):
    ddpm = DDPMScheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=ddpm)
    pipe.scheduler = FewstepScheduler.from_config(ddpm.config, sampler=name)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        push = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=7, output_type="np").images
    finally:
        hook.remove()
    assert len(calls) == 7 == len(pipe.scheduler.timesteps)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((2, 1, 8, 8), generator=g)  # what DDPMPipeline draws first
    with torch.no_grad():
        x = fewstep.sample(DiffusersDenoiser(unet, ddpm), noise, name, 7, generator=g)
    pull = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert (abs(pull - push)).max() == 0.0  # the same tensors


def test_manual_loop_float64_equals_pull_and_follows_a_changed_sample(unet):
    ddpm = DDPMScheduler()
    sch = FewstepScheduler.from_config(ddpm.config, sampler="dpmpp_3m")
    den = DiffusersDenoiser(unet.double(), ddpm)
    noise = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sch.set_timesteps(6)
        x = noise * sch.init_noise_sigma
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
        pull = fewstep.sample(den, noise, "dpmpp_3m", 6)
        assert torch.allclose(x, pull, rtol=0, atol=1e-12)
        # a pipeline that edits the sample between steps (inpainting) is followed, not ignored
        sch.set_timesteps(6)
        x = noise.clone()
        for i, t in enumerate(sch.timesteps):
            if i == 3:
                x = x.clone()
                x[:, :, :4] = 0.0
            x = sch.step(unet(x, t).sample, t, x).prev_sample
    assert not torch.allclose(x, pull)
    unet.float()


def test_ddim_pipeline_with_fewstep_scheduler(unet):
    ddpm = DDPMScheduler()
    pipe = DDIMPipeline(unet=unet, scheduler=ddpm)
    pipe.scheduler = FewstepScheduler.from_config(ddpm.config, sampler="deis_3")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 8, 8, 1)
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # what DDIMPipeline draws
    with torch.no_grad():
        x = fewstep.sample(DiffusersDenoiser(unet, ddpm), noise, "deis_3", 5)
    pull = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(pull - out).max() == 0.0  # the same tensors
    with pytest.raises(ValueError, match="sampler_options"):
        pipe(batch_size=1, num_inference_steps=5, eta=0.5, output_type="np")


def _tiny_sd(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[c] = 2 + i
        vocab[c + "</w>"] = 28 + i
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab) + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1)
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4, attention_head_dim=2,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3s", "dpmpp_2m_sde", "unipc_2"])
def test_stable_diffusion_pipeline_with_guidance_equals_pull(tmp_path, name):
    pipe = _tiny_sd(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler=name)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        push = pipe("abc", num_inference_steps=6, guidance_scale=4.0, num_images_per_prompt=2, height=8, width=8,
                    latents=latents, output_type="latent", generator=torch.Generator().manual_seed(5)).images
    finally:
        hook.remove()
    assert calls == [4] * 6  # one batched cond+uncond forward per evaluation, 2 images per prompt
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("abc", "cpu", 2, True)
        den = ClassifierFreeGuidance(DiffusersDenoiser(pipe.unet, pipe.scheduler), 4.0, {"encoder_hidden_states": uncond})
        pull = fewstep.sample(den, latents, name, 6, cond={"encoder_hidden_states": cond},
                              generator=torch.Generator().manual_seed(5))
    # guidance on x0 vs on eps: the same affine map, up to float32 rounding
    assert float((push - pull).abs().max()) < 1e-4 * float(pull.abs().max())


def test_scheduler_config_round_trip_and_errors(tmp_path):
    sch = FewstepScheduler(sampler="ddim", sampler_options={"eta": 0.3}, spacing="logsnr", prediction_type="v_prediction")
    sch.save_pretrained(tmp_path)
    back = FewstepScheduler.from_pretrained(tmp_path)
    assert back.config.sampler == "ddim" and back.config.sampler_options == {"eta": 0.3}
    assert back.config.prediction_type == "v_prediction" and back.config.spacing == "logsnr"
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        FewstepScheduler(sampler="dpmpp2m")
    with pytest.raises(TypeError, match="has no option 'etaa'"):
        FewstepScheduler(sampler="ddim", sampler_options={"etaa": 1.0})
    with pytest.raises(ValueError, match="set_timesteps"):
        sch.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    sch.set_timesteps(4)
    assert len(sch.timesteps) == 4
    with pytest.raises(ValueError, match="planned at"):
        sch.step(torch.zeros(1, 2), 123, torch.zeros(1, 2))
    sch.set_timesteps(timesteps=[999, 600, 300, 100])
    assert sch.timesteps.tolist() == [999, 600, 300, 100]
    with pytest.raises(ValueError, match="custom timesteps"):
        FewstepScheduler(sampler="dpmpp_2s").set_timesteps(timesteps=[999, 600, 300, 100])


def test_zero_snr_v_prediction_through_the_scheduler(unet):
    ddpm = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    pipe = DDPMPipeline(unet=unet, scheduler=ddpm)
    for name in ALL_PUSH:
        pipe.scheduler = FewstepScheduler.from_config(ddpm.config, sampler=name, spacing="trailing")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=1, num_inference_steps=5, output_type="np").images
        assert pipe.scheduler.timesteps[0] == 999
        assert bool(torch.isfinite(torch.from_numpy(out)).all())


def test_steps_offset_reaches_the_leading_spacing():
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(5)
    sch = FewstepScheduler(spacing="leading", steps_offset=1)
    sch.set_timesteps(5)
    assert sch.timesteps.tolist() == ref.timesteps.tolist()


def test_flow_and_edm_configs_are_read_not_replaced():
    """Flow and EDM configs give their own schedule (issue 13), never a DDPM schedule in their place."""
    from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

    from fewstep.schedules import EDM, FlowMatching

    flow = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert isinstance(flow.schedule, FlowMatching) and flow.schedule.shift == 3.0
    edm = FewstepScheduler.from_config(EDMEulerScheduler().config)
    assert isinstance(edm.schedule, EDM) and edm.schedule.precondition == "edm"


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc_3"])
def test_image_to_image_starts_part_way(unet, name):
    """set_begin_index (diffusers' img2img `strength`) starts where the replaced scheduler's own grid is at
    that index (a noise level, issue 13) and re-plans the rest as a run of its own, in place in the
    timesteps the pipeline sliced; on a diffusers grid (trailing) it is the rest of that grid."""
    from fewstep.samplers.core import run_program

    ddpm = DDPMScheduler()
    sch = FewstepScheduler.from_config(ddpm.config, sampler=name)
    sch.set_timesteps(6)
    view = sch.timesteps[2:]  # what the pipeline holds
    sch.set_begin_index(2)
    ddpm.set_timesteps(6)
    assert float(view[0]) == float(ddpm.timesteps[2]) and sch.num_inference_steps == 4  # DDPM's own start
    assert view.tolist() == sch.timesteps[2:].tolist() == torch.tensor(sch.program.eval_times).float().tolist()
    x_start = sch.add_noise(torch.zeros(2, 1, 8, 8), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), view[:1])
    with torch.no_grad():
        x = x_start.clone()
        for t in view:
            x = sch.step(unet(x, t).sample, t, x).prev_sample
        program = fewstep.samplers.prepare(name, 4, sch.schedule, t_start=float(ddpm.timesteps[2]))
        ref, _ = run_program(program, DiffusersDenoiser(unet, ddpm), x_start.clone())
    assert torch.equal(x, ref)
    trailing = FewstepScheduler.from_config(ddpm.config, sampler=name, spacing="trailing")
    trailing.set_timesteps(6)
    full = trailing.timesteps.clone()
    trailing.set_begin_index(2)
    assert trailing.timesteps[2:].tolist() == full[2:].tolist()
    with pytest.raises(ValueError, match="cannot start part-way"):
        s2 = FewstepScheduler.from_config(ddpm.config, sampler="dpmpp_2s")
        s2.set_timesteps(6)
        s2.set_begin_index(2)


def _pipeline_and_pull(unet, scheduler, pull_sampler, num_inference_steps, **pull):
    """(push images, pull images, network calls) of DDPMPipeline with ``scheduler`` against
    ``fewstep.sample`` on the same noise."""
    ddpm = DDPMScheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=ddpm)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = unet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        push = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=num_inference_steps, output_type="np").images
    finally:
        hook.remove()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((2, 1, 8, 8), generator=g)
    with torch.no_grad():
        x = fewstep.sample(DiffusersDenoiser(unet, ddpm), noise, pull_sampler, generator=g, **pull)
    return push, (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), len(calls)


def test_budget_in_solver_steps_through_a_pipeline(unet):
    """``budget="steps"``: ``num_inference_steps`` counts solver steps (k-diffusion's count), so 5
    Heun steps to clean data are 9 evaluations, the same tensors as ``fewstep.sample(steps=5)``."""
    sch = FewstepScheduler.from_config(DDPMScheduler().config, sampler="heun", budget="steps")
    push, pull, calls = _pipeline_and_pull(unet, sch, "heun", 5, steps=5)
    assert calls == 9 == len(sch.timesteps)
    assert abs(push - pull).max() == 0.0
    nfe_sch = FewstepScheduler.from_config(DDPMScheduler().config, sampler="heun")
    nfe_sch.set_timesteps(9)
    assert torch.equal(nfe_sch.timesteps, sch.timesteps)
    with pytest.raises(ValueError, match="budget must be"):
        FewstepScheduler(sampler="heun", budget="evals")


@pytest.mark.parametrize("name, base, spacing", [("dpmpp_2m_karras", "dpmpp_2m", "karras"), ("euler_a", "euler_ancestral", None)])
def test_combined_and_alias_names_through_a_pipeline(unet, name, base, spacing):
    """A sampler-and-spacing name (``dpmpp_2m_karras``) and an alias (``euler_a``) give in a pipeline
    what the sampler they name gives through the pull door."""
    sch = FewstepScheduler.from_config(DDPMScheduler().config, sampler=name)
    push, pull, calls = _pipeline_and_pull(unet, sch, base, 6, nfe=6, **({"spacing": spacing} if spacing else {}))
    assert calls == 6
    assert abs(push - pull).max() == 0.0
