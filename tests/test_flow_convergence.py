"""The exact mixture in flow-matching form, convergence order of every deterministic solver on it,
and every deterministic sampler on VP, EDM and flow schedules with its exact NFE (issue 13, item 6).

Convergence: the digits mixture under rectified flow (alpha = 1 - t, sigma = t) on a uniform
log-SNR grid over the log-SNR range of ``tests/test_convergence.py`` (lambda from -5.0 at
t = 0.9935 to 4.6 at t_min = 0.0105), every option at its registry default and the default
``end="zero"`` (the last step lands on clean data from t_min).
The exact answer of that procedure is the closed-form denoiser at the exact ODE state at t_min, as
in ``tests/test_convergence.py`` (VP); the slope of log RMSE against log NFE is fitted over NFE
128-432 (192-648 for fourth-order methods and gradient estimation's late start) and must be within 0.35 of the declared order.  The
log-SNR range is the VP test's, so the asymptotic regime starts at the same NFE; what differs is
every coefficient, computed from the flow schedule's own alpha, sigma and lambda (in ``x / sigma``
and lambda the probability-flow ODE is the same for every schedule, so the errors match the VP
test's to rounding: a check of the flow schedule's own maths).  The mixture's tiny matrix
products run faster on one thread, so the module runs with one (restored after).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
from fewstep.models import GaussianMixture
from fewstep.models.mixture import MixtureVelocity
from fewstep.samplers.core import run_program
from fewstep.schedules import EDM, FlowMatching, VPContinuous, from_diffusers

from conftest import CountingDenoiser

# the same log-SNR range as tests/test_convergence.py (so the same errors): its samplers, NFE ranges
# (gradient estimation's late start included) and slope fit
from test_convergence import DETERMINISTIC, _slope, budgets
_VP = VPContinuous("linear", t_min=1e-3)  # the log-SNR range of tests/test_convergence.py
T_START = 1.0 / (1.0 + math.exp(float(_VP.lambda_(_VP.t_max))))
T_MIN = 1.0 / (1.0 + math.exp(float(_VP.lambda_(_VP.t_min))))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flow_setting(digits_mixture):
    sched = FlowMatching(t_min=T_MIN)
    noise = torch.randn(32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_start = noise * sched.sigma(T_START)  # the VP test's x / sigma at the first time
    at_min = digits_mixture.ode_solve(x_start, sched, T_START, sched.t_min)
    den = digits_mixture.denoiser(sched)
    return sched, den, x_start, den(at_min, torch.tensor(sched.t_min, dtype=torch.float64))


def _errors(setting, name, nfes):
    sched, den, x_start, ref = setting
    errs = []
    for n in nfes:
        program = fewstep.samplers.prepare(name, n, sched, spacing="logsnr", t_start=T_START)
        out, _ = run_program(program, den, x_start)
        errs.append(float(torch.sqrt(torch.mean((out - ref) ** 2))))
    return errs


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_convergence_order_on_the_flow_mixture(flow_setting, name):
    order = fewstep.spec(name).order
    nfes = budgets(name)
    errs = _errors(flow_setting, name, nfes)
    slope = _slope(nfes, errs)
    assert abs(slope - order) < 0.35, f"{name}: fitted order {slope:.2f} on the flow mixture, declared {order}, errors {errs}"


def test_flow_form_of_the_mixture(digits_mixture):
    """u = (x - D)/t is the velocity of the exact flow ODE (central difference of the scipy solution),
    the ODE starts from the noise itself at t = 1 (sigma = 1, zero SNR), and MixtureVelocity is the
    same field in diffusers' timestep units; shift does not change the process."""
    x1 = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, h = 0.4, 1e-4
    xt = digits_mixture.flow_ode_solve(x1, 1.0, t)
    fd = (digits_mixture.flow_ode_solve(xt, t, t + h) - digits_mixture.flow_ode_solve(xt, t, t - h)) / (2 * h)
    u = digits_mixture.flow_velocity(xt, t)
    assert float((fd - u).abs().max()) < 1e-6 * float(u.abs().max())
    assert torch.allclose(digits_mixture.flow_velocity(x1, 1.0), x1 - digits_mixture.mean, rtol=0, atol=1e-12)
    net = MixtureVelocity(digits_mixture)
    assert torch.equal(net(xt, torch.tensor(400.0)), u)
    d3 = digits_mixture.flow_denoiser(shift=3.0)
    assert torch.equal(d3(xt, t), digits_mixture.flow_denoiser()(xt, t))
    assert torch.allclose(xt - t * u, d3(xt, t), rtol=0, atol=1e-12)  # x0 = x - t u (flow_prediction)
    with pytest.raises(ValueError, match=r"flow time t must be in \(0, 1\]"):
        digits_mixture.flow_velocity(xt, 0.0)


SCHEDULES = {
    "vp_zero_snr": lambda: from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                           "rescale_betas_zero_snr": True}),
    "edm": lambda: EDM(0.002, 80.0, precondition="edm"),
    "flow_sigma_1": lambda: FlowMatching(shift=3.0),
}


@pytest.mark.parametrize("family", sorted(SCHEDULES))
def test_every_deterministic_sampler_on_every_family(family):
    """Every deterministic solver of the registry on a zero-terminal-SNR VP schedule (start at
    alpha = 0), on EDM and on flow matching from sigma = 1 (alpha = 0): exactly the NFE asked, every
    call counted, a finite result.  (The time-shift samplers re-time VP samples and are VP-only by
    design; CFG++ needs a guided model.)"""
    sched = SCHEDULES[family]()
    mix = GaussianMixture([0.5, 0.5], [[1.0, -1.0], [-1.0, 0.5]], [np.eye(2) * 0.1, np.eye(2) * 0.2])
    names = [
        n for n in fewstep.available(model_kind="diffusion")
        if not fewstep.spec(n).stochastic and "uncond" not in fewstep.spec(n).needs and fewstep.spec(n).family != "time_shift"
    ]
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in names:
        for nfe in sorted({max(fewstep.spec(name).min_nfe, 2), 5}):
            den = CountingDenoiser(mix.denoiser(sched))
            out, info = fewstep.sample(den, noise, name, nfe, return_info=True)
            assert den.calls == info.nfe == nfe, (name, nfe)
            assert bool(torch.isfinite(out).all()), (family, name, nfe)
            start = info.grid[0]
            assert start == sched.t_max  # the grid starts at the schedule's noisiest time (zero SNR for two of them)
