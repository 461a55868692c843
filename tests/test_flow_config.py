"""No diffusers config silently misread (issue 13, item 4), and diffusers' own scheduler contract.

Every scheduler class diffusers exports is in fewstep's class table, and every key of its default
config in the key table: honoured, known to have no effect, or refused with a ValueError naming
it.  A key fewstep does not know is an error naming it; keyword arguments to ``from_config`` win
over the config.  The contract is checked as diffusers' common scheduler tests check it: a save /
load round trip, switching classes with ``from_config``, ``add_noise``, the dtype of ``timesteps``.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import diffusers
import diffusers.schedulers as diffusers_schedulers
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin

import fewstep
from fewstep import FewstepScheduler
from fewstep.diffusers_config import CLASSES, KEYS, read_config
from fewstep.models import DiffusersDenoiser
from fewstep.schedules import EDM, FlowMatching, VPDiscrete, VPSigma, from_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")


def _exported_scheduler_classes():
    out = []
    for name in sorted(dir(diffusers_schedulers)):
        if "Flax" in name or not name.endswith("Scheduler"):
            continue
        try:
            cls = getattr(diffusers_schedulers, name)
        except Exception:  # an optional dependency is missing: diffusers exports a dummy
            continue
        if inspect.isclass(cls) and issubclass(cls, ConfigMixin):
            out.append(cls)
    return out


@pytest.mark.parametrize("cls", _exported_scheduler_classes(), ids=lambda c: c.__name__)
def test_every_key_of_every_diffusers_scheduler_is_accounted_for(cls):
    name = cls.__name__
    assert name in CLASSES, f"{name} is not in fewstep.diffusers_config.CLASSES: add its family or the reason it is refused"
    family = CLASSES[name][0]
    if family == "refuse":  # some refused classes have required arguments: their config names the class
        with pytest.raises(ValueError, match=name):
            FewstepScheduler.from_config({"_class_name": name, "num_train_timesteps": 1000})
        with pytest.raises(ValueError, match=name):
            from_diffusers({"_class_name": name})
        return
    try:
        inst = cls()
    except (ImportError, OSError) as err:  # e.g. DPMSolverSDEScheduler without torchsde
        pytest.skip(f"{name} cannot be built here: {err}")
    keys = [k for k in inst.config if not k.startswith("_")]
    missing = [k for k in keys if k not in KEYS]
    assert not missing, f"{name}: keys {missing} are not in fewstep.diffusers_config.KEYS"
    assert not [k for k in keys if KEYS[k].kind == "refuse"], name
    sch = FewstepScheduler.from_config(inst)  # the object carries its class (its config in memory does not)
    assert sch.config.family in ("vp_discrete", "vp_sigma", "flow", "edm")
    assert sch.schedule.config() == from_diffusers(inst).config()
    sch.set_timesteps(4)
    assert len(sch.timesteps) == 4


def test_an_unknown_key_is_an_error_naming_it():
    cfg = dict(DDPMScheduler().config)
    cfg["snr_warp_future"] = 2.0
    with pytest.raises(ValueError, match="'snr_warp_future'"):
        FewstepScheduler.from_config(cfg)
    with pytest.raises(ValueError, match="'snr_warp_future'"):
        DiffusersDenoiser(torch.nn.Identity(), cfg)
    with pytest.raises(TypeError, match="unexpected keyword"):
        FewstepScheduler.from_config(DDPMScheduler().config, use_karas_sigmas=True)  # misspelt: never dropped
    with pytest.raises(ValueError, match="invert_sigmas=True"):
        FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True))


def test_grid_and_final_keys_are_followed_when_set_and_explicit_arguments_win():
    default = FewstepScheduler.from_config(DPMSolverMultistepScheduler().config)
    assert default.config.spacing is None  # nothing chosen: fewstep's own grid
    karras = FewstepScheduler.from_config(DPMSolverMultistepScheduler().config, use_karras_sigmas=True)
    assert karras.config.spacing == "diffusers"
    native = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    native.set_timesteps(8)
    karras.set_timesteps(8)
    # the same noise levels: diffusers rounds the network's timesteps, fewstep evaluates at the solver's sigma
    assert torch.allclose(karras.sigmas.double(), native.sigmas.double(), rtol=1e-5)
    assert FewstepScheduler.from_config(native.config, spacing="logsnr").config.spacing == "logsnr"
    trailing = FewstepScheduler.from_config(DDIMScheduler(timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                                          prediction_type="v_prediction"))
    trailing.set_timesteps(5)
    assert trailing.timesteps.dtype == torch.int64 and trailing.timesteps[0] == 999
    assert trailing.schedule.alpha(999.0) == 0.0
    assert FewstepScheduler.from_config(DDIMScheduler(set_alpha_to_one=False)).config.final == "min"
    assert FewstepScheduler.from_config(DDIMScheduler(set_alpha_to_one=False), final="zero").config.final == "zero"
    assert FewstepScheduler.from_config(DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")).config.final == "min"
    v = FewstepScheduler.from_config(DDPMScheduler().config, prediction_type="v_prediction")
    assert v.config.prediction_type == "v_prediction"
    clip = FewstepScheduler.from_config(DDPMScheduler(clip_sample=True, clip_sample_range=2.0))
    assert clip._options() == {"clip_denoised": 2.0}
    assert FewstepScheduler.from_config(DDPMScheduler().config)._options() == {}  # the class default: not chosen


def test_schedule_keys_are_honoured():
    cog = CogVideoXDDIMScheduler(rescale_betas_zero_snr=True, snr_shift_scale=1.0 / 3)
    sched = from_diffusers(cog)
    assert isinstance(sched, VPDiscrete)
    assert torch.equal(sched.alphas_cumprod, cog.alphas_cumprod.double())  # SNR shift, then zero SNR (float64, as diffusers)
    svd = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction", sigma_min=0.002,
                                 sigma_max=700.0, use_karras_sigmas=True)
    sch = FewstepScheduler.from_config(svd, sampler="euler")
    assert isinstance(sch.schedule, VPSigma) and sch.config.spacing == "diffusers"
    svd.set_timesteps(6)
    sch.set_timesteps(6)
    assert torch.allclose(sch.timesteps.double(), svd.timesteps.double(), rtol=1e-5)  # 0.25 ln(sigma)
    a, s = sch.schedule.alpha_sigma(3.0)
    assert math.isclose(s / a, 3.0) and math.isclose(a * a + s * s, 1.0)
    wan = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction")
    flow = FewstepScheduler.from_config(wan.config, sampler="unipc_2")
    assert isinstance(flow.schedule, FlowMatching) and flow.schedule.shift == 5.0 and flow._prediction_type == "flow_prediction"
    dyn = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="pass mu"):
        dyn.set_timesteps(4)
    dyn.set_timesteps(4, mu=math.log(3.0))
    assert dyn.program.schedule.shift == pytest.approx(3.0)  # exponential time shift: shift = e^mu
    edm = from_diffusers(EDMEulerScheduler(sigma_data=0.7, sigma_max=60.0))
    assert isinstance(edm, EDM) and (edm.sigma_data, edm.sigma_max, edm.precondition) == (0.7, 60.0, "edm")


def test_pipeline_sigmas_timesteps_and_strength():
    flow = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0), sampler="dpmpp_2s")
    flow.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # Flux-style sigmas, resampled to dpmpp_2s's 3 steps (2S, 1, to data)
    assert flow.num_inference_steps == 4 and len(flow.timesteps) == 4
    native = FlowMatchEulerDiscreteScheduler(shift=3.0)
    native.set_timesteps(sigmas=[1.0, 2.0 / 3.0, 1.0 / 3.0])
    assert torch.allclose(flow.program.grid.float(), native.sigmas, rtol=1e-6)
    own = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), sampler="euler", spacing="shifted")
    own.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=math.log(2.0))  # an explicit fewstep spacing wins over Flux's default sigmas
    assert own.program.grid.tolist() == fewstep.samplers.prepare("euler", 4, FlowMatching(shift=2.0)).grid.tolist()
    custom = FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0), sampler="euler")
    custom.set_timesteps(timesteps=[1000.0, 600.0, 200.0])  # evaluation times themselves (flow: 1000 t)
    assert custom.program.eval_times == [1.0, 0.6, 0.2]
    # image-to-image on a UNet config: strength 0.3 of 10 steps starts where DPM-Solver's grid does (~300)
    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(10)
    sch = FewstepScheduler.from_config(dpm.config, sampler="unipc_3")
    sch.set_timesteps(10)
    view = sch.timesteps[7:]
    sch.set_begin_index(7)
    assert float(view[0]) == float(dpm.timesteps[7]) == 300.0 and len(sch.program.eval_times) == 3


@pytest.mark.parametrize("make", [
    lambda: FewstepScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0), sampler="dpmpp_3m"),
    lambda: FewstepScheduler.from_config(EDMEulerScheduler(), sampler="unipc_2"),
    lambda: FewstepScheduler.from_config(DDPMScheduler(beta_schedule="scaled_linear"), sampler="deis_3", spacing="trailing"),
], ids=["flow", "edm", "vp"])
def test_scheduler_contract(tmp_path, make):
    sch = make()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(s):
        s.set_timesteps(5)
        y = x * s.init_noise_sigma
        for t in s.timesteps:
            y = s.step(torch.tanh(s.scale_model_input(y, t)), t, y).prev_sample
        return y

    # save / load round trip: the same config and the same tensors
    sch.save_config(tmp_path)
    back = FewstepScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {k: v for k, v in sch.config.items() if not k.startswith("_")}
    assert torch.equal(run(back), run(sch))
    # from_config switching: every compatible class reads this config as the same schedule, and back
    assert type(sch) in sch.compatibles and len(sch.compatibles) > 1
    for other in sch.compatibles[1:]:
        o = other.from_config(sch.config)
        assert from_diffusers(o).config() == sch.schedule.config(), other.__name__
        assert FewstepScheduler.from_config(o.config if other is not diffusers.TCDScheduler else o).schedule.config() == sch.schedule.config()
    # add_noise: alpha x0 + sigma noise at the model timesteps (flow: scale_noise, FlowMatchEuler's name)
    sch.set_timesteps(5)
    t = sch.timesteps[1:2]
    noise = torch.randn_like(x)
    tt = float(sch.schedule.time_from_model_timestep(float(t)))
    a, s = sch.schedule.alpha_sigma(tt)
    assert torch.allclose(sch.add_noise(x, noise, t), a * x + s * noise, atol=1e-6)
    assert torch.equal(sch.scale_noise(x, t, noise), sch.add_noise(x, noise, t))
    # timesteps: float32 model timesteps (int64 on diffusers' integer grids), one per evaluation, decreasing
    assert sch.timesteps.dtype in (torch.float32, torch.int64) and len(sch.timesteps) == 5
    assert bool((sch.timesteps[1:] <= sch.timesteps[:-1]).all()) or sch.config.family == "edm"
    assert len(sch.sigmas) == 6 and float(sch.sigmas[-1]) == 0.0
    assert sch.step(torch.zeros_like(x, dtype=torch.float16), sch.timesteps[0], x.half()).prev_sample.dtype == torch.float16


def test_flow_transformers_get_their_own_timestep_units():
    """SD3 receives 1000 t (a (B,) tensor, by keyword), Flux t itself: as their pipelines feed them."""
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=4, patch_size=2, in_channels=2, num_layers=1, attention_head_dim=4,
                               num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=8,
                               pooled_projection_dim=4, out_channels=2, pos_embed_max_size=8).eval()
    seen = []
    h = tr.register_forward_hook(lambda m, a, k, o: seen.append(k["timestep"]), with_kwargs=True)
    den = DiffusersDenoiser(tr, FlowMatchEulerDiscreteScheduler(shift=3.0))
    with torch.no_grad():
        den(torch.randn(3, 2, 4, 4), 0.25, encoder_hidden_states=torch.randn(3, 2, 8), pooled_projections=torch.randn(3, 4))
    h.remove()
    assert seen[0].shape == (3,) and seen[0].dtype == torch.float32 and float(seen[0][0]) == 250.0
    flux = DiffusersDenoiser(tr, FlowMatchEulerDiscreteScheduler(), timestep_scale=None)
    assert flux.timestep_scale == 1.0
    type_name = type("FluxTransformer2DModel", (torch.nn.Module,), {"forward": lambda self, hidden_states, timestep, **kw: hidden_states})
    assert DiffusersDenoiser(type_name(), FlowMatchEulerDiscreteScheduler()).timestep_scale == 1e-3
    assert read_config(FlowMatchEulerDiscreteScheduler()).prediction_type == "flow_prediction"
