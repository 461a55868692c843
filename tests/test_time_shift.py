"""Time-Shift samplers (Li et al. 2024): each variant against a transcription of the authors' update
written here from the paper and their code, the reduction to the base solvers, VP only, and where
the selected times fall (not pinned at the window's edges by the noise of one sample's variance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fewstep
import fewstep.samplers.time_shift as time_shift
from fewstep import FewstepScheduler
from fewstep.samplers.time_shift import shifted_times
from fewstep.schedules import EDM, FlowMatching, VPContinuous

SCHED = VPContinuous("linear")
B0, B1 = 0.1, 20.0  # SCHED's beta_min, beta_max


# --- the VP-linear schedule in closed form (Song et al. 2021), independent of fewstep.schedules ---
def _alpha(t: float) -> float:
    return math.exp(-0.25 * t * t * (B1 - B0) - 0.5 * t * B0)


def _sigma(t: float) -> float:
    return math.sqrt(1.0 - _alpha(t) ** 2)


def _lam(t: float) -> float:
    return math.log(_alpha(t) / _sigma(t))


def _t_of_sigma2(s2: float) -> float:
    """The time with sigma^2 = s2: alpha^2 = 1 - s2, -log alpha = a t^2 + b t."""
    a, b, L = 0.25 * (B1 - B0), 0.5 * B0, -0.5 * math.log(1.0 - s2)
    return (-b + math.sqrt(b * b + 4 * a * L)) / (2 * a)


def _select(x: torch.Tensor, t: float, lo: float, hi: float, width: float, m: float, selection: str) -> list[float]:
    """The selection of the module docstring, written out: the authors' argmin of
    |Var(x) - v(tau)| over [lo, hi], v = m + (1 - m) sigma^2 (m = 0: their 1 - alpha_bar), after
    shrinking Var(x) towards v(t) by kappa = dv^2 / (dv^2 + 24 v(t)^2 / (d - 1))."""
    d = x[0].numel()
    out = []
    for s2 in x.reshape(x.shape[0], -1).var(dim=1).tolist():
        u = (s2 - m) / (1 - m)
        if selection == "shrunk":
            dv = (1 - m) * (_sigma(hi) ** 2 - _sigma(lo) ** 2) / (hi - lo) * width
            vt = m + (1 - m) * _sigma(t) ** 2
            u = _sigma(t) ** 2 + dv * dv / (dv * dv + 24 * vt * vt / (d - 1)) * (u - _sigma(t) ** 2)
        out.append(min(max(_t_of_sigma2(min(max(u, 1e-12), 1 - 1e-12)), lo), hi))
    return out


class ToyNet:
    """Exact denoiser of Gaussian data N(0, c I) (linear in x), recording the times it is given."""

    def __init__(self, c: float = 0.6):
        self.c, self.times = c, []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        self.times.append(t.clone())
        ts = t.reshape(-1).tolist() if t.ndim else [float(t)] * x.shape[0]
        k = torch.tensor([_alpha(s) * self.c / (_alpha(s) ** 2 * self.c + _sigma(s) ** 2) for s in ts], dtype=x.dtype)
        return k[:, None] * x

    def eps(self, x: torch.Tensor, ts: list[float]) -> torch.Tensor:
        """The network's noise prediction at per-sample times ``ts``."""
        d = self(x, torch.tensor(ts, dtype=torch.float64))
        a = torch.tensor([_alpha(s) for s in ts], dtype=x.dtype)[:, None]
        s = torch.tensor([_sigma(s) for s in ts], dtype=x.dtype)[:, None]
        return (x - a * d) / s


GRID = [1.0, 0.8, 0.62, 0.46, 0.3, 0.15, 1e-3]  # every gap > 3 x the half window: no gap clipping
OPTS = {"window": 0.1, "cutoff": 0.2}  # half window 0.05 in time units; times > 0.2 are shifted
HALF, WIDTH, CUT = 0.05, 0.1, 0.2


def _noise(b: int = 4, d: int = 256) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _window(i: int) -> tuple[float, float]:
    return max(GRID[i] - HALF, SCHED.t_min), min(GRID[i] + HALF, SCHED.t_max)


def _ddim_reference(x: torch.Tensor, m: float, selection: str) -> torch.Tensor:
    """Paper, Algorithm 3 on DDIM (Song et al. 2021, eq. 12): from the second step, a state of nominal
    time t above the cutoff is evaluated at the time t_s matched to its variance, and the step
    x' = alpha' x0 + sigma' eps is taken with x0, eps of the network at t_s (lines 4-6)."""
    net = ToyNet()
    for i in range(len(GRID) - 1):
        t = GRID[i]
        ts = _select(x, t, *_window(i), WIDTH, m, selection) if i >= 1 and t > CUT else [t] * x.shape[0]
        eps = net.eps(x, ts)
        a = torch.tensor([_alpha(s) for s in ts], dtype=x.dtype)[:, None]
        s = torch.tensor([_sigma(s) for s in ts], dtype=x.dtype)[:, None]
        x0 = (x - s * eps) / a
        x = _alpha(GRID[i + 1]) * x0 + _sigma(GRID[i + 1]) * eps
    return x


def _dpm_reference(x: torch.Tensor, order: int, m: float, selection: str) -> torch.Tensor:
    """The authors' multistep DPM-Solver (TS-DPM ``sampler/dpm_solver_utils.py``, ``sample`` and the
    ``predict_x0`` branches of ``multistep_dpm_solver_{first,second,third}_update``, ``solver_type=
    'dpm_solver'``) with the time-shift rule: after ``order - 1`` warm-up steps a state's time is its
    selected time for everything that follows -- the network's input, the next step's start and the
    history's times (``t_prev_list``).  Here the selection is made on the state (the paper's line
    9); lower-order final steps below 15 steps, as there."""
    net = ToyNet()
    n = len(GRID) - 1
    b = x.shape[0]
    out = []
    for j in range(b):  # per sample: every sample has its own history of times
        xj = x[j : j + 1]
        times, preds = [], []
        for i in range(n):
            t = GRID[i]
            ts = _select(xj, t, *_window(i), WIDTH, m, selection)[0] if i >= order and t > CUT else t
            times.append(ts)
            preds.append(net(xj, torch.tensor(ts, dtype=torch.float64)))
            k = min(order, i + 1, n - i)
            s, tn = times[-1], GRID[i + 1]
            h = _lam(tn) - _lam(s)
            phi = math.expm1(-h)  # exp(-h) - 1
            m0 = preds[-1]
            base = (_sigma(tn) / _sigma(s)) * xj - _alpha(tn) * phi * m0
            if k == 1:
                xj = base
            elif k == 2:
                r0 = (_lam(s) - _lam(times[-2])) / h
                d1 = (m0 - preds[-2]) / r0
                xj = base - 0.5 * _alpha(tn) * phi * d1
            else:
                r0 = (_lam(s) - _lam(times[-2])) / h
                r1 = (_lam(times[-2]) - _lam(times[-3])) / h
                d10 = (m0 - preds[-2]) / r0
                d11 = (preds[-2] - preds[-3]) / r1
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                xj = base + _alpha(tn) * (phi / h + 1.0) * d1 - _alpha(tn) * ((phi + h) / h**2 - 0.5) * d2
        out.append(xj)
    return torch.cat(out)


def _deis_reference(x: torch.Tensor, m: float, selection: str) -> torch.Tensor:
    """The authors' tAB-DEIS with ``ab_order=2`` (TS-DPM ``sampler/deis_sampler.py`` ``eps_fn`` and
    ``sampler/deis/{sampler,multistep,vpsde}.py``): x' = psi x + sum_j C_j eps_j with
    psi = alpha'/alpha and C_j = int_t^t' (alpha'/alpha(tau)) (-dlog alpha/dtau) / sigma(tau)
    l_j(tau) dtau, the Lagrange basis l_j on the nominal times of the last 3 steps (fewer while
    warming up, no lower-order final steps); every evaluation above the cutoff, the first included,
    gets the network at the time matched to its state's variance in a window on its own time."""
    net = ToyNet()
    gl_x, gl_w = np.polynomial.legendre.leggauss(200)
    eps_hist: list[torch.Tensor] = []
    for i in range(len(GRID) - 1):
        t, tn = GRID[i], GRID[i + 1]
        ts = _select(x, t, *_window(i), WIDTH, m, selection) if t > CUT else [t] * x.shape[0]
        eps_hist = [net.eps(x, ts), *eps_hist[:2]]
        nodes = GRID[max(0, i - 2) : i + 1][::-1]  # t_i, t_{i-1}, t_{i-2}
        tau = 0.5 * (tn - t) * gl_x + 0.5 * (tn + t)
        al = np.exp(-0.25 * tau**2 * (B1 - B0) - 0.5 * tau * B0)
        integrand = (_alpha(tn) / al) * (0.5 * tau * (B1 - B0) + 0.5 * B0) / np.sqrt(1 - al**2)
        new = (_alpha(tn) / _alpha(t)) * x
        for j, e in enumerate(eps_hist[: len(nodes)]):
            lj = np.prod([(tau - nodes[q]) / (nodes[j] - nodes[q]) for q in range(len(nodes)) if q != j], axis=0)
            new = new + float(0.5 * (tn - t) * np.sum(gl_w * integrand * lj)) * e
        x = new
    return x


@pytest.mark.parametrize("selection", ["shrunk", "argmin"])
@pytest.mark.parametrize("m", [0.0, 0.6])
def test_ddim_is_the_papers_algorithm(selection, m):
    x = _noise()
    net = ToyNet()
    out = fewstep.sample(net, x, "ts_ddim", 6, schedule=SCHED, spacing=GRID, selection=selection, data_variance=m, **OPTS)
    assert torch.allclose(out, _ddim_reference(x, m, selection), rtol=0, atol=1e-9)
    assert net.times[0].ndim == 0 and all(t.shape == (4,) for t in net.times[1:5]) and net.times[5].ndim == 0
    if selection == "argmin":
        assert float((net.times[2] - 0.62).abs().max()) > 0.01  # it did shift


@pytest.mark.parametrize("selection", ["shrunk", "argmin"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_is_the_authors_update(selection, order):
    x = _noise()
    net = ToyNet()
    name = f"ts_dpmpp_{order}m"
    extra = {"d2_weight": 0.5} if order == 3 else {}  # the authors' DPM_Solver class weights D2 as the reference
    out = fewstep.sample(net, x, name, 6, schedule=SCHED, spacing=GRID, selection=selection, data_variance=0.3, **OPTS, **extra)
    assert torch.allclose(out, _dpm_reference(x, order, 0.3, selection), rtol=0, atol=1e-9)
    assert all(t.ndim == 0 for t in net.times[:order])  # the warm-up keeps its times
    assert net.times[order].shape == (4,)


@pytest.mark.parametrize("selection", ["shrunk", "argmin"])
def test_deis_is_the_authors_update(selection):
    x = _noise()
    net = ToyNet()
    out = fewstep.sample(net, x, "ts_deis_3", 6, schedule=SCHED, spacing=GRID, selection=selection, lower_order_final=False, **OPTS)
    assert torch.allclose(out, _deis_reference(x, 0.0, selection), rtol=0, atol=1e-9)
    assert net.times[0].shape == (4,)  # DEIS shifts from the first evaluation on
    if selection == "argmin":
        assert float((net.times[0] - 1.0).abs().max()) > 0.01


@pytest.mark.parametrize("base", ["ddim", "dpmpp_2m", "dpmpp_3m", "deis_3"])
def test_without_shift_it_is_the_base_solver(digits_mixture, ddpm_schedule, base):
    den = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = fewstep.sample(den, noise, base, 7)
    for opts in ({"cutoff": 1.0}, {"window": 0.0}):
        assert torch.equal(fewstep.sample(den, noise, "ts_" + base, 7, **opts), ref)
    assert not torch.equal(fewstep.sample(den, noise, "ts_" + base, 7), ref)
    assert float((fewstep.sample(den, noise, "ts_" + base, 7, selection="argmin") - ref).abs().max()) > 1e-3


def _data_variance(mix) -> float:
    """E over the data of one sample's unbiased variance over its entries: (tr M - 1'M1/d)/(d-1), M = E[x x']."""
    mu, d = mix.mean, mix.dim
    second = mix.covariance + torch.outer(mu, mu)
    return float((torch.trace(second) - second.sum() / d) / (d - 1))


def _at_moved_edge(ts: torch.Tensor, t: float, lo: float, hi: float) -> torch.Tensor:
    tol = 0.01 * (hi - lo)
    return ((ts - t).abs() > tol) & (((ts - lo).abs() <= tol) | ((ts - hi).abs() <= tol))


@pytest.mark.parametrize("name", ["ts_ddim", "ts_dpmpp_2m", "ts_dpmpp_3m", "ts_deis_3"])
def test_selections_are_not_pinned_at_the_window_edges(digits_mixture, ddpm_schedule, monkeypatch, name):
    """Sampling the exact digits mixture (64 entries, DDPM linear schedule, NFE 10): the authors'
    argmin puts most selections on a window edge (the noise of one sample's variance, 18%, exceeds
    the window's range of sigma^2); the default selection puts none there (bound: 2%)."""
    seen = []

    def spy(*args, **kw):
        ts = shifted_times(*args, **kw)
        seen.append((args[2], args[3], args[4], ts))
        return ts

    monkeypatch.setattr(time_shift, "shifted_times", spy)
    den = digits_mixture.denoiser(ddpm_schedule)
    noise = torch.randn(256, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = {"window": 0.03, "cutoff": 0.3}  # the authors' DPM-Solver setting, so every variant shifts several times
    fraction = {}
    for selection in ("argmin", "shrunk"):
        seen.clear()
        fewstep.sample(den, noise, name, 10, selection=selection, **opts)
        assert len(seen) >= 2
        fraction[selection] = float(torch.cat([_at_moved_edge(ts, t, lo, hi) for t, lo, hi, ts in seen]).double().mean())
    assert fraction["argmin"] > 0.75
    assert fraction["shrunk"] < 0.02


@pytest.mark.parametrize("tiles", [1, 64])
def test_samples_of_the_marginal_keep_their_time(digits_mixture, ddpm_schedule, tiles):
    """Samples drawn exactly from the marginal at t (the digits mixture, and 64 independent digits side
    by side: 4096 entries), window +-15 timesteps: with the data's variance in the reference, the
    selected time stays within 0.5 (mean) and 12 (every sample) timesteps of t and never on an edge;
    the authors' argmin puts over half of them on an edge even with 4096 entries."""
    m = _data_variance(digits_mixture)
    g = torch.Generator().manual_seed(3)
    for t in (800.0, 640.0, 490.0, 360.0):
        x0 = digits_mixture.sample(1000 * tiles, g).reshape(1000, 64 * tiles)
        a, s = ddpm_schedule.alpha_sigma(t)
        x = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        ts = shifted_times(ddpm_schedule, x, t, t - 15, t + 15, 30.0, data_variance=m)
        assert abs(float((ts - t).mean())) < 0.5 and float((ts - t).abs().max()) < 12
        assert not bool(_at_moved_edge(ts, t, t - 15, t + 15).any())
        argmin = shifted_times(ddpm_schedule, x, t, t - 15, t + 15, 30.0, data_variance=m, selection="argmin")
        assert float(_at_moved_edge(argmin, t, t - 15, t + 15).double().mean()) > 0.5
        if tiles == 1:  # the authors' reference (no data term) is biased upwards but, on 64 entries, within 8 steps
            ts0 = shifted_times(ddpm_schedule, x, t, t - 15, t + 15, 30.0)
            assert float((ts0 - t).abs().max()) < 8 and not bool(_at_moved_edge(ts0, t, t - 15, t + 15).any())


def test_exposure_bias_is_removed_on_an_exact_model():
    """Data = a point mass at 0 (D = 0, so x_t = sigma_t z; data_variance 0 is exact) and a start 2%
    too wide (an exposure bias of the first step).  DDIM only rescales, so the bias persists; the
    time-shift sampler evaluates the second step at the time matched to the sample's variance
    (4096 entries and a wide window: kappa = 0.9993, nearly the exact match), which re-couples sample
    and time: the output has the variance of its time to 1e-4."""
    z = torch.randn(5, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)  # unit sample variance per sample
    grid = [1.0, 0.35, 0.25, 0.12]
    seen = []

    def point_mass(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    out = fewstep.sample(point_mass, 1.02 * z, "ts_ddim", 3, schedule=SCHED, spacing=grid, window=1.0, cutoff=0.3)
    s1, s_end = _sigma(0.35) / _sigma(1.0), _sigma(0.12)
    lo, hi = 0.35 - 0.1 / 3, 0.35 + 0.65 / 3  # the window, kept within a third of the gaps
    assert seen[1].shape == (5,)  # one time per sample
    expected = _select(1.02 * s1 * z, 0.35, lo, hi, 1.0, 0.0, "shrunk")
    assert torch.allclose(seen[1], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)
    assert abs(expected[0] - _t_of_sigma2((1.02 * s1) ** 2)) < 2e-4  # close to the exact match
    assert float(seen[2]) == 0.25  # below the cutoff: the nominal time
    assert torch.allclose(out.var(1) / s_end**2, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-4)
    ddim = fewstep.sample(point_mass, 1.02 * z, "ddim", 3, schedule=SCHED, spacing=grid)
    assert torch.allclose(ddim.var(1) / s_end**2, torch.full((5,), (1.02 / _sigma(1.0)) ** 2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ts_ddim", "ts_dpmpp_2m", "ts_dpmpp_3m", "ts_deis_3"])
def test_vp_schedules_only(name):
    for sch in (EDM(), FlowMatching()):
        with pytest.raises(ValueError, match=r"VP schedules.*1 - alpha_bar"):
            fewstep.sample(lambda x, t: x, torch.randn(2, 8), name, 4, schedule=sch)
    with pytest.raises(ValueError, match="VP schedule"):
        shifted_times(EDM(), torch.randn(2, 8), 1.0, 0.5, 1.5, 1.0)


def test_errors():
    with pytest.raises(ValueError, match=r"chooses its evaluation times while sampling.*fewstep.sample"):
        FewstepScheduler(sampler="ts_dpmpp_2m").set_timesteps(5)
    with pytest.raises(ValueError, match="fractions of the schedule's time range"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 4), "ts_ddim", 4, schedule=SCHED, window=30)
    with pytest.raises(ValueError, match="at least 2"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 1), "ts_ddim", 4, schedule=SCHED)
    with pytest.raises(ValueError, match=r"data_variance .* in \[0, 1\)"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 4), "ts_deis_3", 4, schedule=SCHED, data_variance=1.0)
    with pytest.raises(ValueError, match="selection must be one of shrunk, argmin"):
        fewstep.sample(lambda x, t: x, torch.randn(2, 4), "ts_dpmpp_2m", 4, schedule=SCHED, selection="median")
