"""The samplers ComfyUI has and k-diffusion has not, with ComfyUI's numbers (issue 15).

ComfyUI (GPL-3.0) is read, not copied: each reference below is the update rule of ComfyUI's
``comfy/k_diffusion/sampling.py`` (master, 2025) written out independently in its variance-exploding
form ``x = x0 + sigma eps`` with a denoiser ``D(x, sigma)``, where ComfyUI's model-sampling factors
are 1 (``alpha = 1``, ``lambda = -log sigma``).  fewstep runs the registry sampler on an EDM schedule
whose grid is the same sigmas, and through ``fewstep.k_diffusion``; float64, relative difference
under 1e-5 (measured ~1e-15).  On rectified-flow models ComfyUI's exponential integrators use the
flow's own log-SNR and alpha; one of them is checked on a FlowMatching schedule too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
import fewstep.k_diffusion as K
from fewstep.schedules import EDM, FlowMatching
from k_helpers import W, ListNoise, den, rel  # noqa: E402  (tests/k_helpers.py)

TOL = 1e-5
def karras(n, lo=0.002, hi=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


# --- the references ----------------------------------------------------------------------------


def ref_ipndm(x, sig, variable, max_order=4):
    """ComfyUI's sample_ipndm / sample_ipndm_v: Adams-Bashforth in sigma on d = (x - D) / sigma with
    the constant coefficients, or the diff-sampler authors' variable-step ones; x = D onto sigma = 0."""
    hist = []
    for i in range(len(sig) - 1):
        s, t = float(sig[i]), float(sig[i + 1])
        d = (x - den(x, s)) / s
        order = min(max_order, i + 1)
        if t == 0:
            x = den(x, s)
        elif order == 1:
            x = x + (t - s) * d
        elif not variable:
            c = {2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[order]
            x = x + (t - s) * sum(ci * di for ci, di in zip(c, [d, *hist[::-1]])) / {2: 2, 3: 12, 4: 24}[order]
        else:
            hn, h1 = t - s, s - float(sig[i - 1])
            if order == 2:
                c = [(2 + hn / h1) / 2, -(hn / h1) / 2]
            else:
                h2 = float(sig[i - 1]) - float(sig[i - 2])
                t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
                if order == 3:
                    c = [(2 + hn / h1) / 2 + t1, -(hn / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
                else:
                    h3 = float(sig[i - 2]) - float(sig[i - 3])
                    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
                        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
                    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
                    c = [(2 + hn / h1) / 2 + t1 + t2, -(hn / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
                         t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2, -t2 * q * h1 / h2]
            x = x + (t - s) * sum(ci * di for ci, di in zip(c, [d, *hist[::-1]]))
        hist = (hist + [d])[-(max_order - 1):] if max_order > 1 else []
    return x


def ref_res(x, sig, eta, noises):
    """ComfyUI's res_multistep(_ancestral): an ancestral split, then (first step / sigma_down = 0)
    Euler, else x = e^{-h} x + h (b1 D + b2 D_old) with c2 from the previous sigma_down."""
    phi1 = lambda z: math.expm1(z) / z  # noqa: E731
    phi2 = lambda z: (phi1(z) - 1) / z  # noqa: E731
    old_d, old_down = None, None
    for i in range(len(sig) - 1):
        s, t = float(sig[i]), float(sig[i + 1])
        d_ = den(x, s)
        up = min(t, eta * (t**2 * (s**2 - t**2) / s**2) ** 0.5) if eta else 0.0
        down = (t**2 - up**2) ** 0.5
        if down == 0 or old_d is None:
            x = x + (x - d_) / s * (down - s)
        else:
            h = -math.log(down) + math.log(s)
            c2 = (-math.log(float(sig[i - 1])) + math.log(old_down)) / h
            b1, b2 = phi1(-h) - phi2(-h) / c2, phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * d_ + b2 * old_d)
        if t > 0 and up:
            x = x + noises.pop(0) * up
        old_d, old_down = d_, down
    return x


def ref_gradient_estimation(x, sig, gamma=2.0):
    """ComfyUI's sample_gradient_estimation: Euler with d_bar = d + (gamma - 1)(d - d_old) from the
    second step on; x = D onto sigma = 0."""
    old = None
    for i in range(len(sig) - 1):
        s, t = float(sig[i]), float(sig[i + 1])
        d_ = den(x, s)
        d = (x - d_) / s
        if t == 0:
            x = d_
        else:
            x = x + d * (t - s)
            if i >= 1:
                x = x + (gamma - 1) * (d - old) * (t - s)
        old = d
    return x


def ref_er_sde(x, sig, noises, points=200, max_stage=3, s_noise=1.0):
    """ComfyUI's sample_er_sde on a VE model (er_lambda = sigma): stage 1-3 Taylor terms with the
    noise scaler x (e^{x^0.3} + 10) and 200-point left Riemann sums for the integrals."""
    phi = lambda v: v * (np.exp(v**0.3) + 10.0)  # noqa: E731
    lam = [float(v) for v in sig]
    old_d = old_dd = None
    for i in range(len(sig) - 1):
        s, t = lam[i], lam[i + 1]
        d_ = den(x, s)
        stage = min(max_stage, i + 1)
        if t == 0:
            x = d_
        else:
            r = phi(t) / phi(s)
            x = r * x + (1 - r) * d_
            if stage >= 2:
                step = (s - t) / points
                pos = t + np.arange(points) * step
                s1 = float(np.sum(1 / phi(pos)) * step)
                dd = (d_ - old_d) / (s - lam[i - 1])
                x = x + (t - s + s1 * phi(t)) * dd
                if stage >= 3:
                    s2 = float(np.sum((pos - s) / phi(pos)) * step)
                    ddd = (dd - old_dd) / ((s - lam[i - 2]) / 2)
                    x = x + ((t - s) ** 2 / 2 + s2 * phi(t)) * ddd
                old_dd = dd
            x = x + noises.pop(0) * s_noise * math.sqrt(max(t**2 - s**2 * r**2, 0.0))
        old_d = d_
    return x


def ref_lms_comfy(x, sig, order=4):
    """ComfyUI's sample_lms: k-diffusion's LMS, but the step onto sigma = 0 is x = D."""
    from scipy import integrate

    ds = []
    s_np = sig.numpy()
    for i in range(len(sig) - 1):
        d_ = den(x, float(sig[i]))
        ds = (ds + [(x - d_) / float(sig[i])])[-order:]
        if float(sig[i + 1]) == 0:
            x = d_
            continue
        k = min(i + 1, order)

        def basis(tau, j):
            return math.prod((tau - s_np[i - m]) / (s_np[i - j] - s_np[i - m]) for m in range(k) if m != j)

        c = [integrate.quad(basis, s_np[i], s_np[i + 1], args=(j,), epsrel=1e-12)[0] for j in range(k)]
        x = x + sum(cj * dj for cj, dj in zip(c, reversed(ds)))
    return x


def _noises(n):
    return [torch.randn(5, 8, generator=torch.Generator().manual_seed(200 + i), dtype=torch.float64) for i in range(n)]


# (test id, registry name, reference, options)
CASES = [
    ("ipndm", "ipndm", lambda x, s, z: ref_ipndm(x, s, False), {}),
    ("ipndm-order3", "ipndm", lambda x, s, z: ref_ipndm(x, s, False, 3), {"max_order": 3}),
    ("ipndm_v", "ipndm_v", lambda x, s, z: ref_ipndm(x, s, True), {}),
    ("ipndm_v-order2", "ipndm_v", lambda x, s, z: ref_ipndm(x, s, True, 2), {"max_order": 2}),
    ("res_multistep", "res_multistep", lambda x, s, z: ref_res(x, s, 0.0, z), {}),
    ("res_multistep_ancestral", "res_multistep_ancestral", lambda x, s, z: ref_res(x, s, 1.0, z), {}),
    ("res_multistep_ancestral-eta0.5", "res_multistep_ancestral", lambda x, s, z: ref_res(x, s, 0.5, z), {"eta": 0.5}),
    ("gradient_estimation", "gradient_estimation", lambda x, s, z: ref_gradient_estimation(x, s), {}),
    ("gradient_estimation-gamma1.7", "gradient_estimation", lambda x, s, z: ref_gradient_estimation(x, s, 1.7), {"ge_gamma": 1.7}),
    ("er_sde", "er_sde", lambda x, s, z: ref_er_sde(x, s, z), {"integration_points": 200}),
    ("er_sde-stage2", "er_sde", lambda x, s, z: ref_er_sde(x, s, z, max_stage=2, s_noise=0.5),
     {"integration_points": 200, "max_stage": 2, "s_noise": 0.5}),
    ("lms-comfyui", "lms", lambda x, s, z: ref_lms_comfy(x, s), {}),
]


@pytest.mark.parametrize("steps", [3, 12])
@pytest.mark.parametrize("name, ref_fn, opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_registry_and_api_equal_comfyui(name, ref_fn, opts, steps):
    sig = karras(steps)
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = ref_fn(noise * sig[0], sig, _noises(steps))
    out = fewstep.sample(den, noise, name, steps=steps, schedule=EDM(0.002, 80.0), spacing=sig, generator=ListNoise(_noises(steps)), **opts)
    assert rel(out, ref) < TOL
    z = iter(_noises(steps))
    api_opts = {k: v for k, v in opts.items() if k != "integration_points"}  # the API takes ComfyUI's 200 points itself
    if name == "lms":
        api_opts["denoise_final"] = True  # the API follows k-diffusion 0.1.1's LMS; ComfyUI's denoises
    api = getattr(K, f"sample_{name}")(den, noise * sig[0], sig, noise_sampler=lambda a, b: next(z), **api_opts)
    assert rel(api, ref) < TOL


def test_er_sde_exact_integrals_differ_from_riemann_sums_by_their_error():
    """The default integrates ER-SDE's coefficients exactly; ComfyUI's 200-point left Riemann sums
    (the authors' code: 100) differ by their O(1/200) error, small against the sample."""
    from fewstep.samplers.er_sde import er_integrals

    exact = er_integrals("sde_5", 0.5, 1.5, None)
    for n, tol in ((200, 2e-2), (2000, 2e-3), (20000, 2e-4)):
        approx = er_integrals("sde_5", 0.5, 1.5, n)
        assert all(abs(a - e) < tol * abs(e) for a, e in zip(approx, exact)), (n, approx, exact)
    sig = karras(12)
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = fewstep.sample(den, noise, "er_sde", steps=12, schedule=EDM(0.002, 80.0), spacing=sig, generator=ListNoise(_noises(12)))
    b = fewstep.sample(den, noise, "er_sde", steps=12, schedule=EDM(0.002, 80.0), spacing=sig, generator=ListNoise(_noises(12)),
                       integration_points=200)
    assert 0 < rel(a, b) < 1e-2


def ref_dpmpp_2m_sde_flow(x, sig, noises, eta=1.0):
    """ComfyUI's sample_dpmpp_2m_sde on a rectified-flow (CONST) model: lambda = log((1 - sigma) / sigma),
    alpha_t = 1 - sigma_t, midpoint form; x = D onto sigma = 0."""
    old, h_last = None, None
    for i in range(len(sig) - 1):
        s, t = float(sig[i]), float(sig[i + 1])
        d_ = den_flow(x, s)
        if t == 0:
            x = d_
        else:
            h = math.log((1 - t) / t) - math.log((1 - s) / s)
            he = h * (eta + 1)
            x = t / s * math.exp(-h * eta) * x + (1 - t) * -math.expm1(-he) * d_
            if old is not None:
                x = x + 0.5 * (1 - t) * -math.expm1(-he) * (h_last / h) ** -1 * (d_ - old)
            x = x + noises.pop(0) * t * math.sqrt(-math.expm1(-2 * h * eta))
            h_last = h
        old = d_
    return x


def den_flow(x, t):
    t = float(t)
    return torch.tanh(x @ W) * (1 - t) + 0.2 * x * t


def test_exponential_integrator_on_flow_equals_comfyui_const():
    """On a rectified-flow model ComfyUI runs DPM++ 2M SDE in the flow's own log-SNR (its CONST
    model sampling), which is fewstep's exponential integrator on FlowMatching: the same numbers."""
    sched = FlowMatching(shift=1.0)
    grid = torch.cat([torch.linspace(0.97, 0.02, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    noise = torch.randn(5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = ref_dpmpp_2m_sde_flow(noise * 0.97, grid, _noises(9))
    out = fewstep.sample(lambda x, t: den_flow(x, t), noise, "dpmpp_2m_sde", steps=9, schedule=sched, spacing=grid,
                         generator=ListNoise(_noises(9)), lower_order_final=False)
    assert rel(out, ref) < TOL
