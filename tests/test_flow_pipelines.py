"""FewstepScheduler end to end in flow-matching, video, image-to-image, EDM and consistency pipelines
built locally from tiny random components (issue 13): exact NFE, finite outputs, the native
scheduler's output with ``sampler="euler"`` on diffusers' own sigmas, and the pull door's tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
    UNet2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

import fewstep
from fewstep import FewstepScheduler
from fewstep.models import ClassifierFreeGuidance, DiffusersDenoiser
from fewstep.samplers.core import run_program

pytestmark = pytest.mark.usefixtures("one_thread")
B = 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Calls:
    """Counts a module's forward calls."""

    def __init__(self, module):
        self.n = 0
        self.hook = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.hook.remove()


# --- Stable Diffusion 3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                               pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    embeds = {"prompt_embeds": _randn(B, 5, 16, seed=1), "pooled_prompt_embeds": _randn(B, 8, seed=2),
              "negative_prompt_embeds": _randn(B, 5, 16, seed=3), "negative_pooled_prompt_embeds": _randn(B, 8, seed=4)}
    return pipe, embeds


def test_sd3_euler_on_diffusers_sigmas_equals_the_native_scheduler(sd3):
    pipe, embeds = sd3
    native = pipe.scheduler
    kw = dict(**embeds, guidance_scale=3.0, height=64, width=64, latents=_randn(B, 4, 8, 8, seed=5), output_type="latent")
    ref = pipe(num_inference_steps=6, **kw).images
    try:
        pipe.scheduler = FewstepScheduler.from_config(native.config, sampler="euler", spacing="diffusers")
        with Calls(pipe.transformer) as calls:
            out = pipe(num_inference_steps=6, **kw).images
    finally:
        pipe.scheduler = native
    assert calls.n == 6
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc_3", "heun", "dpmpp_2s"])
def test_sd3_pipeline_equals_pull_with_classifier_free_guidance(sd3, name):
    pipe, embeds = sd3
    native = pipe.scheduler
    lat = _randn(B, 4, 8, 8, seed=6)
    try:
        pipe.scheduler = FewstepScheduler.from_config(native.config, sampler=name)
        with Calls(pipe.transformer) as calls:
            push = pipe(**embeds, num_inference_steps=7, guidance_scale=3.0, height=64, width=64, latents=lat,
                        output_type="latent").images
    finally:
        pipe.scheduler = native
    assert calls.n == 7  # one batched cond + uncond call per evaluation
    den = ClassifierFreeGuidance(DiffusersDenoiser(pipe.transformer, native), 3.0,
                                 {"encoder_hidden_states": embeds["negative_prompt_embeds"],
                                  "pooled_projections": embeds["negative_pooled_prompt_embeds"]})
    with torch.no_grad():
        pull = fewstep.sample(den, lat, name, 7, cond={"encoder_hidden_states": embeds["prompt_embeds"],
                                                       "pooled_projections": embeds["pooled_prompt_embeds"]})
    assert bool(torch.isfinite(push).all())
    assert float((push - pull).abs().max()) < 1e-5 * float(pull.abs().max())  # guidance on x0 vs on u: float32 rounding


def test_sd3_img2img_strength_is_a_noise_level(sd3):
    """strength 0.6 of 5 steps starts where FlowMatchEuler's own grid is at index 2 (the transformer's
    first timestep is the native one), runs 3 evaluations of the sampler's own grid from there;
    strength * steps < 1 runs one step as the pipeline asks, strength 0 leaves none (an error saying so)."""
    pipe, embeds = sd3
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
    native = FlowMatchEulerDiscreteScheduler(shift=3.0)
    i2i = StableDiffusion3Img2ImgPipeline(**{**pipe.components, "vae": vae, "scheduler": FewstepScheduler.from_config(native.config)})
    i2i.set_progress_bar_config(disable=True)
    seen = []
    hook = i2i.transformer.register_forward_hook(lambda m, a, k, o: seen.append(float(k["timestep"][0])), with_kwargs=True)
    kw = dict(image=_randn(B, 4, 8, 8, seed=7), **embeds, guidance_scale=1.0, height=8, width=8, output_type="latent")
    try:
        out = i2i(strength=0.6, num_inference_steps=5, generator=torch.Generator().manual_seed(0), **kw).images
        native.set_timesteps(5)
        assert len(seen) == 3 and seen[0] == pytest.approx(float(native.timesteps[2]), rel=1e-6)
        assert seen[1:] == i2i.scheduler.timesteps[3:].tolist()  # the sampler's own (re-planned) grid after the start
        assert bool(torch.isfinite(out).all())
        seen.clear()
        i2i(strength=0.1, num_inference_steps=5, generator=torch.Generator().manual_seed(0), **kw)  # 5 * 0.1 < 1
        assert seen == [pytest.approx(float(native.timesteps[4]), rel=1e-6)]
        with pytest.raises(ValueError, match="strength \\* num_inference_steps < 1"):
            i2i(strength=0.0, num_inference_steps=5, **kw)
    finally:
        hook.remove()


# --- Flux (dynamic shifting, guidance-distilled) --------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    native = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                             base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=tr, scheduler=native, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun"])
def test_flux_pipeline_with_dynamic_shifting(flux, name):
    """FluxPipeline passes sigmas=linspace(1, 1/n, n) and mu: honoured (through the replaced scheduler's
    own time shift, resampled for Heun's step count); euler equals FlowMatchEuler; pull == push."""
    native = flux.scheduler
    kw = dict(prompt_embeds=_randn(B, 5, 16, seed=1), pooled_prompt_embeds=_randn(B, 8, seed=2), height=32, width=32,
              guidance_scale=3.5, output_type="latent", latents=_randn(B, 4, 16, seed=3), num_inference_steps=5)
    try:
        flux.scheduler = FewstepScheduler.from_config(native.config, sampler=name)
        with Calls(flux.transformer) as calls:
            push = flux(**kw).images
        program = flux.scheduler.program
    finally:
        flux.scheduler = native
    assert calls.n == 5 and program.nfe == 5
    if name == "euler":
        assert rel(push, flux(**kw).images) < 1e-5
    ids = flux._prepare_latent_image_ids(B, 2, 2, "cpu", torch.float32)
    den = DiffusersDenoiser(flux.transformer, native)
    cond = {"encoder_hidden_states": kw["prompt_embeds"], "pooled_projections": kw["pooled_prompt_embeds"],
            "txt_ids": torch.zeros(5, 3), "img_ids": ids, "guidance": 3.5}
    with torch.no_grad():
        pull, _ = run_program(program, den, program.initial_state(kw["latents"]), cond=cond)
    assert float((push - pull).abs().max()) <= 1e-6 * float(pull.abs().max())
    with pytest.raises(ValueError, match="guidance-distilled"):
        den(kw["latents"], 0.5, **{k: v for k, v in cond.items() if k != "guidance"})


# --- a video pipeline: Wan (UniPC with flow sigmas) ----------------------------------------------------------


def test_wan_video_pipeline():
    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1, rope_max_seq_len=32).eval()
    native = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=tr, vae=None, scheduler=native)
    pipe.set_progress_bar_config(disable=True)
    pe, npe, lat = _randn(B, 5, 16, seed=1), _randn(B, 5, 16, seed=2), _randn(B, 4, 2, 2, 2, seed=3)
    pipe.scheduler = FewstepScheduler.from_config(native.config, sampler="dpmpp_3m")
    with Calls(tr) as calls:
        push = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, guidance_scale=2.0, height=16, width=16, num_frames=5,
                    num_inference_steps=5, output_type="latent", latents=lat).frames
    assert calls.n == 2 * 5  # Wan calls the transformer once per branch
    den = ClassifierFreeGuidance(DiffusersDenoiser(tr, native), 2.0, {"encoder_hidden_states": npe})
    with torch.no_grad():
        pull = fewstep.sample(den, lat, "dpmpp_3m", 5, cond={"encoder_hidden_states": pe})
    assert bool(torch.isfinite(push).all())
    assert float((push - pull).abs().max()) < 1e-5 * float(pull.abs().max())


# --- EDM ---------------------------------------------------------------------------------------------------------


def test_edm_loop_euler_equals_edm_euler_scheduler():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()

    def loop(sch, x, n):
        sch.set_timesteps(n)
        x = x.clone()
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
        return x

    native = EDMEulerScheduler()
    x_T = _randn(2, 1, 8, 8, seed=1) * native.config.sigma_max
    ours = FewstepScheduler.from_config(native.config, sampler="euler", spacing="diffusers")
    assert rel(loop(ours, x_T, 6), loop(native, x_T, 6)) < 1e-5
    assert ours.init_noise_sigma == pytest.approx(80.0, rel=1e-6) and native.init_noise_sigma == pytest.approx((80.0**2 + 1) ** 0.5)


# --- Latent Consistency Models ------------------------------------------------------------------------------------


def test_latent_consistency_pipeline_with_lcm():
    """LatentConsistencyModelPipeline (original_inference_steps, `latents, denoised = step(...)`) with
    sampler="lcm" equals LCMScheduler: LCM's skipping-step timesteps, its boundary condition, its noise."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                attention_head_dim=2, time_cond_proj_dim=8).eval()
    native = LCMScheduler()
    pipe = LatentConsistencyModelPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=native,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=_randn(B, 5, 16, seed=1), num_inference_steps=4, height=64, width=64,
              latents=_randn(B, 4, 8, 8, seed=2), output_type="latent", guidance_scale=6.0, original_inference_steps=40)
    ref = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    native.set_timesteps(4, original_inference_steps=40)
    pipe.scheduler = FewstepScheduler.from_config(native.config, sampler="lcm")
    with Calls(unet) as calls:
        out = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    assert calls.n == 4 and pipe.scheduler.timesteps.tolist() == native.timesteps.tolist()
    assert rel(out, ref) < 1e-5


def test_step_protocols():
    """step(return_dict=False) is (prev_sample, denoised) like LCMScheduler's; the output carries
    denoised; per-call eta is ddim's eta / tcd's gamma, an error for samplers without one."""
    x = _randn(2, 3, seed=0)
    sch = FewstepScheduler(sampler="ddim")
    sch.set_timesteps(3)
    prev, denoised = sch.step(torch.zeros_like(x), sch.timesteps[0], x, return_dict=False)
    assert prev.shape == denoised.shape == x.shape
    out = sch.step(torch.zeros_like(x), sch.timesteps[1], prev)
    assert torch.equal(out.denoised, out.pred_original_sample)
    # eta reaches ddim's option: equal to configuring it
    a, b = FewstepScheduler(sampler="ddim"), FewstepScheduler(sampler="ddim", sampler_options={"eta": 0.7})
    res = []
    for sch, kw in ((a, {"eta": 0.7}), (b, {})):
        sch.set_timesteps(4)
        y, g = x.clone(), torch.Generator().manual_seed(1)
        for t in sch.timesteps:
            y = sch.step(torch.tanh(y), t, y, generator=g, **kw).prev_sample
        res.append(y)
    assert torch.equal(res[0], res[1])
    c = FewstepScheduler(sampler="dpmpp_2m")
    c.set_timesteps(3)
    c.step(torch.zeros_like(x), c.timesteps[0], x, eta=0.0)  # a pipeline's default eta=0 is no request
    c.set_timesteps(3)
    with pytest.raises(ValueError, match="no eta-like parameter"):
        c.step(torch.zeros_like(x), c.timesteps[0], x, eta=0.5)
    tcd = FewstepScheduler.from_config(__import__("diffusers").TCDScheduler(), sampler="tcd")
    assert tcd.config.final == "min"  # TCDScheduler's last jump lands at timestep 0
    tcd.set_timesteps(2)
    tcd.step(torch.zeros_like(x), tcd.timesteps[0], x, eta=0.6)
    assert tcd.program.options["gamma"] == 0.6
    assert np.isfinite(float(tcd.timesteps[0]))
