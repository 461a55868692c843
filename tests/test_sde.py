"""Stochastic samplers with Brownian-tree noise (issue 15): strong convergence on the exact digits
mixture, the same image at different step counts, and their deterministic limits.

**Strong order.**  With one Brownian path (``BrownianNoise``, k-diffusion's tree semantics in
``sigma / alpha``), every sampler's output converges to the SDE solution driven by that path as the
steps grow.  The ancestral samplers at ``eta = 1`` (Euler, DPM-2, DPM++ 2S), DPM++ SDE, SDE-DPM++
2M / 3M and RES ancestral all discretise the same reverse SDE, ``dy = 2 (y - D) / rho d rho +
sqrt(2 rho) dW_rho`` in EDM's ``y = x / alpha``: each step's noise is ``rho_{i+1} sqrt(1 - rho_{i+1}^2 /
rho_i^2)`` times the normalised increment of ``W`` over the step.  So one fine reference serves
them all (SDE-DPM++(3M) at 1025 steps of a uniform log-SNR grid); ER-SDE (another SDE of its family)
and Heun with churn (its noise depends on ``S_churn / N``) have their own.  The coarse grids (33 to
257 steps) are nested in the fine one, so the tree is queried once per level.  The error is the
median over 8 samples of the per-sample RMS error: a coarse path sometimes ends in another mixture
component than the fine one, an O(1) error with probability O(h), which makes the RMS over samples
converge at order 1/2 however good the solver is (measured), while the median shows the order of
the scheme (1, the strong order of these schemes for additive noise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep
from fewstep.schedules import VPContinuous

pytest.importorskip("torchsde", reason="the Brownian tree needs torchsde (fewstep[sde], in the dev extra)")
from fewstep.samplers import BrownianNoise  # noqa: E402

STEPS = [33, 65, 129, 257]
SAME_SDE = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
            "res_multistep_ancestral"]
OWN_REFERENCE = {"er_sde": {}, "heun": {"s_churn": 10.0, "s_tmax": 50.0}}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Small tensors: torch's intra-op threads only add contention (10-50x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def path(digits_mixture, _single_thread):
    """The model, noise, one Brownian path (all runs share its values) and the reference solution."""
    sched = VPContinuous("linear", t_min=1e-3)
    den = digits_mixture.denoiser(sched)
    noise = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    src = BrownianNoise(7, tol=1e-9)  # fine resolution: the finest steps near sigma/alpha = 0.01 are 1e-4 long
    ref = fewstep.sample(den, noise, "dpmpp_3m_sde", steps=1025, spacing="logsnr", generator=src)
    return den, noise, src, ref


def _strong_errors(path, name, ref=None, **opts):
    den, noise, src, shared = path
    if ref is None:
        ref = shared
    errs = []
    for n in STEPS:
        out = fewstep.sample(den, noise, name, steps=n, spacing="logsnr", generator=src, **opts)
        errs.append(float(((out - ref) ** 2).mean(1).sqrt().median()))
    return errs


def _slope(errs):
    return -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]


@pytest.mark.parametrize("name", SAME_SDE + list(OWN_REFERENCE))
def test_strong_order_with_brownian_tree(path, name):
    spec = fewstep.spec(name)
    assert spec.stochastic or name in OWN_REFERENCE
    opts = OWN_REFERENCE.get(name, {})
    ref = None
    if name in OWN_REFERENCE:
        den, noise, src, _ = path
        ref = fewstep.sample(den, noise, name, steps=1025, spacing="logsnr", generator=src, **opts)
    errs = _strong_errors(path, name, ref, **opts)
    order = spec.order if spec.stochastic else 1  # heun's declared order is the ODE's; with churn it is an SDE solver
    assert abs(_slope(errs) - order) < 0.35, f"{name}: strong order {_slope(errs):.2f}, declared {order}, errors {errs}"
    assert errs[-1] < 0.03


def test_same_image_at_different_step_counts(path):
    """One Brownian path: 33 and 65 steps give nearly the same samples (the SDE solution on that
    path); independent noise per step gives unrelated samples."""
    den, noise, src, _ = path
    a = fewstep.sample(den, noise, "dpmpp_2m_sde", steps=33, spacing="logsnr", generator=src)
    b = fewstep.sample(den, noise, "dpmpp_2m_sde", steps=65, spacing="logsnr", generator=BrownianNoise(7, tol=1e-9))
    c = fewstep.sample(den, noise, "dpmpp_2m_sde", steps=65, spacing="logsnr", generator=torch.Generator().manual_seed(7))
    near, far = float((a - b).pow(2).mean(1).sqrt().median()), float((a - c).pow(2).mean(1).sqrt().median())
    assert near < 0.05 < 0.2 < far, (near, far)
    again = fewstep.sample(den, noise, "dpmpp_2m_sde", steps=33, spacing="logsnr", generator=BrownianNoise(7, tol=1e-9))
    assert torch.allclose(again, a, rtol=0, atol=1e-12)  # a fresh source with the same seed is the same path


def test_ipndm_v_on_equal_steps(digits_mixture):
    """On a grid of equal steps in sigma/alpha iPNDM-v's variable-step coefficients of order 2 and 3
    are iPNDM's constant ones; its fourth-order form is the authors' (57, -65, 43, -11)/24, not
    Adams-Bashforth's (55, -59, 37, -9)/24 (see fewstep/samplers/ipndm.py)."""
    from fewstep.samplers.ipndm import ipndm_v_coefficients
    from fewstep.schedules import EDM

    assert ipndm_v_coefficients([-1.0, -1.0]) == (1.5, -0.5)
    assert all(abs(a - b) < 1e-15 for a, b in zip(ipndm_v_coefficients([-1.0] * 3), (23 / 12, -16 / 12, 5 / 12)))
    assert all(abs(a - b) < 1e-15 for a, b in zip(ipndm_v_coefficients([-1.0] * 4), (57 / 24, -65 / 24, 43 / 24, -11 / 24)))
    den = digits_mixture.denoiser(EDM())
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = fewstep.sample(den, noise, "ipndm", 12, spacing="time_uniform", max_order=3)
    y = fewstep.sample(den, noise, "ipndm_v", 12, spacing="time_uniform", max_order=3)
    assert float((x - y).abs().max()) < 1e-9 * float(y.abs().max())


def test_brownian_noise_checks(digits_mixture, ddpm_schedule):
    den = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(3, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="got 2 seeds for a batch of 3"):
        fewstep.sample(den, noise, "euler_ancestral", 5, generator=BrownianNoise([1, 2]))
    with pytest.raises(ValueError, match="outside the tree's interval"):
        fewstep.sample(den, noise, "euler_ancestral", 5, generator=BrownianNoise(1, sigma_min=0.5, sigma_max=1.0))


# (stochastic sampler with eta = 0 or a deterministic noise scale, the deterministic sampler it is)
LIMITS = [
    ("euler_ancestral", {"eta": 0.0}, "euler", {}),
    ("dpm_2_ancestral", {"eta": 0.0}, "dpm_2", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, "dpmpp_2s", {}),
    ("dpmpp_sde", {"eta": 0.0}, "dpmpp_2s", {}),
    ("dpmpp_2m_sde", {"eta": 0.0}, "dpmpp_2m", {}),
    ("res_multistep_ancestral", {"eta": 0.0}, "res_multistep", {}),
    ("res_multistep", {}, "dpmpp_2m", {"solver_type": "heun", "lower_order_final": False}),
    ("gradient_estimation", {"ge_gamma": 1.0}, "ddim", {}),
    ("lms", {"order": 1}, "euler", {}),
    ("er_sde", {"noise_scale_fn": "ode", "max_stage": 1}, "ddim", {}),
]


# At a zero-SNR start (flow's t = 1 too) the two-stage ancestral samplers begin with Euler steps, as
# Heun does, while dpmpp_2s places its first midpoint in time: different plans by design, so those
# pairs are compared on the other schedules only.
CASES = [(*lim, s) for lim in LIMITS for s in ("vp", "edm", "flow", "zero_snr")
         if not (lim[2] == "dpmpp_2s" and s in ("flow", "zero_snr"))]


@pytest.mark.parametrize("a, a_opts, b, b_opts, sched_name", CASES, ids=[f"{c[0]}={c[2]}-{c[4]}" for c in CASES])
def test_reductions(digits_mixture, a, a_opts, b, b_opts, sched_name):
    """Each new sampler reduces to the sampler it generalises, on every schedule family (and a
    zero-SNR start), to float64 rounding."""
    from fewstep.schedules import EDM, FlowMatching, from_diffusers

    sched = {"vp": lambda: VPContinuous("linear"), "edm": lambda: EDM(), "flow": lambda: FlowMatching(shift=3.0),
             "zero_snr": lambda: from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                     rescale_betas_zero_snr=True))}[sched_name]()
    den = digits_mixture.denoiser(sched)
    noise = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spacing = "time_uniform"
    x = fewstep.sample(den, noise, a, 9, spacing=spacing, generator=torch.Generator().manual_seed(1), **a_opts)
    y = fewstep.sample(den, noise, b, 9, spacing=spacing, **b_opts)
    assert float((x - y).abs().max()) < 1e-9 * float(y.abs().max()), (a, b)
