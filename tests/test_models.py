"""DiffusersDenoiser: what the network predicts when the scheduler config does not say."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from fewstep.models import DiffusersDenoiser
from fewstep.schedules import EDM, FlowMatching, from_diffusers


class Const(torch.nn.Module):
    """A network whose output is a fixed multiple of its input: ``out = 0.5 x``."""

    def forward(self, x, timestep, **_):
        return 0.5 * x


class Lin(torch.nn.Linear):
    """A linear network that ignores the timestep."""

    def forward(self, x, timestep, **_):
        return super().forward(x)


def test_flow_matching_config_means_flow_prediction():
    # diffusers' flow schedulers (SD3, Flux) have no prediction_type: the network predicts the velocity
    cfg = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert "prediction_type" not in cfg
    den = DiffusersDenoiser(Const(), cfg)
    assert isinstance(den.schedule, FlowMatching) and den.prediction_type == "flow_prediction"
    x, t = torch.randn(2, 4, dtype=torch.float64), 0.3
    assert torch.allclose(den(x, t), x - t * 0.5 * x, rtol=0, atol=1e-12)  # x0 = x - sigma u, sigma = t
    assert DiffusersDenoiser(Const(), schedule=FlowMatching()).prediction_type == "flow_prediction"


def test_ddpm_family_config_defaults_to_epsilon_and_an_explicit_type_wins():
    cfg = dict(DDPMScheduler().config)
    cfg.pop("prediction_type")
    assert DiffusersDenoiser(Const(), cfg).prediction_type == "epsilon"  # diffusers' own default
    cfg.pop("beta_schedule")
    cfg["trained_betas"] = DDPMScheduler().betas.tolist()
    assert DiffusersDenoiser(Const(), cfg).prediction_type == "epsilon"
    assert DiffusersDenoiser(Const(), DDPMScheduler(prediction_type="v_prediction")).prediction_type == "v_prediction"
    flow = FlowMatchEulerDiscreteScheduler().config
    assert DiffusersDenoiser(Const(), flow, prediction_type="sample").prediction_type == "sample"


def test_no_way_to_tell_is_an_error_asking_for_prediction_type():
    vp = from_diffusers(DDPMScheduler())
    for kwargs in ({"schedule": EDM()}, {"schedule": vp}, {"scheduler": {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}}):
        with pytest.raises(ValueError, match="pass prediction_type="):
            DiffusersDenoiser(Const(), **kwargs)
    assert DiffusersDenoiser(Const(), schedule=vp, prediction_type="epsilon").prediction_type == "epsilon"


def test_module_fingerprint_follows_weights_and_settings_not_caches():
    from fewstep._util import module_fingerprint
    from fewstep.models import ClassifierFreeGuidance

    sched = DDPMScheduler()
    lin = Lin(4, 4).double()
    den = DiffusersDenoiser(lin, sched)
    fp = module_fingerprint(den)
    assert module_fingerprint(DiffusersDenoiser(lin, sched)) == fp  # another object, same model
    assert module_fingerprint(DiffusersDenoiser(lin, sched, prediction_type="sample")) != fp
    with torch.no_grad():
        lin.weight[0, 0] += 1e-6
    assert module_fingerprint(den) != fp
    cfg = ClassifierFreeGuidance(den, 3.0, {})
    before = module_fingerprint(cfg)
    cfg(torch.randn(2, 4, dtype=torch.float64), torch.tensor(500.0, dtype=torch.float64))  # fills last_uncond
    assert cfg.last_uncond is not None and module_fingerprint(cfg) == before
    assert module_fingerprint(ClassifierFreeGuidance(den, 4.0, {})) != before
