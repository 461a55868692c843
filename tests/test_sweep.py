"""Every registered sampler on every schedule family at small budgets: exactly the NFE asked and a
finite sample, or a clear error before any evaluation (issue 12).  Pull door for all; the push
door (FewstepScheduler in a diffusers-style loop) for the push-style samplers on DDPM-family
schedules."""

from __future__ import annotations

import pytest
import torch

import fewstep
from fewstep import FewstepScheduler
from fewstep.models.prediction import from_x0
from fewstep.schedules import EDM, FlowMatching, VPContinuous, from_diffusers

DIFFUSERS_CONFIGS = {
    "vp_linear": dict(beta_schedule="linear"),
    "vp_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "vp_cosine_discrete": dict(beta_schedule="squaredcos_cap_v2"),
    "vp_zero_snr": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
}
SCHEDULES = {
    **{k: (lambda c=c: from_diffusers(c)) for k, c in DIFFUSERS_CONFIGS.items()},
    "vp_continuous_linear": lambda: VPContinuous("linear"),
    "vp_continuous_cosine": lambda: VPContinuous("cosine"),
    "edm": lambda: EDM(),
    "flow": lambda: FlowMatching(shift=3.0),
}


class Counting:
    """The exact mixture's denoiser, counted; it also plays the guided model of CFG++ (an
    unconditional prediction in ``last_uncond``, guidance scale in [0, 1]) and CTM's ``g(x, t, s)``."""

    takes_target_time = True
    guidance_scale = 0.5

    def __init__(self, inner, schedule):
        self.inner, self.schedule, self.calls = inner, schedule, 0
        self.last_uncond = None

    def __call__(self, x, t, s=None):
        self.calls += 1
        d = self.inner(x, t)
        self.last_uncond = 0.9 * d
        return d


def _budgets(name):
    return sorted({fewstep.spec(name).min_nfe, 1, 2, 3, 10})




@pytest.fixture(scope="module")
def schedules(digits_mixture):
    return {k: (f(), digits_mixture) for k, f in SCHEDULES.items()}


@pytest.mark.parametrize("name", fewstep.available())
def test_every_sampler_on_every_schedule(schedules, name):
    noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    refused = []
    for sched_name, (sched, mix) in schedules.items():
        for nfe in _budgets(name):
            den = Counting(mix.denoiser(sched), sched)
            try:
                out, info = fewstep.sample(den, noise, name, nfe, generator=torch.Generator().manual_seed(1), return_info=True)
            except (ValueError, TypeError) as err:
                # a refusal comes before any evaluation and says why
                assert den.calls == 0, (sched_name, nfe, den.calls, str(err))
                assert len(str(err)) > 40 and "internal error" not in str(err), (sched_name, nfe, str(err))
                refused.append((sched_name, nfe, str(err)))
                continue
            assert den.calls == nfe == info.nfe, (sched_name, nfe, den.calls)
            assert out.shape == noise.shape and bool(torch.isfinite(out).all()), (sched_name, nfe)
    # below its minimum budget a sampler is refused; otherwise only the documented exclusions
    for sched_name, nfe, msg in refused:
        spec = fewstep.spec(name)
        allowed = nfe < spec.min_nfe or (spec.family == "time_shift" and "VP" in msg)
        assert allowed, f"{name} refused on {sched_name} at nfe={nfe}: {msg}"


PUSH = [n for n in fewstep.available() if fewstep.spec(n).push_style and not fewstep.spec(n).needs]


@pytest.mark.parametrize("sched_name", list(DIFFUSERS_CONFIGS))
@pytest.mark.parametrize("name", PUSH)
def test_push_door_on_ddpm_family_schedules(digits_mixture, name, sched_name):
    cfg = DIFFUSERS_CONFIGS[sched_name]
    prediction_type = "v_prediction" if cfg.get("rescale_betas_zero_snr") else "epsilon"
    for nfe in _budgets(name):
        if nfe < fewstep.spec(name).min_nfe:
            continue
        scheduler = FewstepScheduler(**cfg, prediction_type=prediction_type, sampler=name)
        den = digits_mixture.denoiser(scheduler.schedule)
        scheduler.set_timesteps(nfe)
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scheduler.init_noise_sigma
        calls = 0
        for i, t in enumerate(scheduler.timesteps):
            tt = float(scheduler.program.eval_times[i])
            a, s = scheduler.schedule.alpha_sigma(tt)
            out = from_x0(prediction_type, den(x, torch.tensor(tt, dtype=torch.float64)), x, a, s)
            calls += 1
            x = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        assert calls == nfe and bool(torch.isfinite(x).all()), (nfe, calls)
