"""The Time-Shift Sampler (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024) on DDIM, multistep DPM-Solver++ and
DEIS, VP schedules only.

Exposure bias: a sample made by a solver is not distributed as the training marginal at its
nominal time ``t``, but it may match the marginal at a nearby time ``t_s`` better.  The paper
(Algorithm 3, lines 7-9) measures the variance of the state over all its entries, per sample, and
picks, in a window of width ``w`` around ``t`` and only above a cutoff time, the time whose
variance ``1 - alpha_bar(t_s) = sigma(t_s)^2`` is closest to it; the network is then evaluated at
``t_s`` ("eps_theta(x_t, t_next)", "take a sampling step with t_next", lines 4-6).

The authors' code (github.com/Mingxiao-Li/TS-DPM, commit 90cc903) implements the rule once per
base sampler, and the three differ:

* DDIM (``sampler/pnm_solver.py``, ``apply_time_shift`` l. 100-127, loop l. 151-163, ``transfer``
  l. 213-221): from the second step, the variance of the *current* state ``x_t`` is matched in a
  window of ``window_size // 2`` on each side of the *next* grid time, and the shifted time becomes
  the *target* of the DDIM step; the network always sees the nominal times.  The authors' ADM code
  (github.com/tingyu215/TS-DPM-ADM, ``guided_diffusion/gaussian_diffusion.py`` l. 612-694) instead
  centres the window on the current time and moves the DDIM target by the same offset.
* DPM-Solver (``sampler/dpm_solver_utils.py``, ``time_shift`` l. 389-420, ``sample`` l. 1125-1152;
  noise-prediction multistep DPM-Solver-2, ``sampler/dpm_solver.py`` l. 145-148): after the
  ``order - 1`` warm-up steps, the target time of every step is chosen in a window of
  ``window_size // 2`` around the nominal target from the variance of the latest *noise
  prediction*; the step lands there, the network is evaluated there, and the multistep history
  keeps that time (``t_prev_list[-1] = vec_t``), so the next step and its ``h``, ``r`` use it.
* DEIS (``sampler/deis_sampler.py`` l. 39-84, ``sampler/deis/sampler.py`` l. 27-47; tAB-DEIS with
  ``ab_order=2``, i.e. three nodes, fewstep's ``deis_3``): at every step, the first included, the
  variance of the state being evaluated is matched in a window of ``window_size`` on *each* side of
  its own time; only the network's time input changes, the exponential-integrator coefficients stay
  on the nominal grid (precomputed, ``ab_coef``).

All three compare ``torch.var`` (unbiased, over all entries of one sample) with ``1 - alphas_cumprod``
over the window's integer timesteps and take the argmin, and apply it where the nominal time is
above ``cut_off_value``.  The registry entries follow them as follows.

* ``ts_ddim`` follows the paper: the state's variance, the window on its own nominal time, the
  network evaluated at ``t_s`` and the DDIM step taken from ``t_s`` (``x0`` and ``eps`` at
  ``t_s``) to the nominal next time, from the second step.  Not the DDPM-backbone code: it matches
  the current state against the noise levels around the *next* time, which differ by the whole
  step: wherever that step's drop of ``sigma^2`` exceeds the noise of the variance (below the
  middle of the schedule in a few-step run) it returns the window's upper edge whatever the sample
  is, and above it an edge chosen by the noise -- the pinning this module must avoid.
* ``ts_dpmpp_2m`` / ``ts_dpmpp_3m`` follow the code's structure: evaluations ``order`` onwards are
  shifted (the warm-up steps are not) and the shifted time is the sample's time from then on --
  the network's input, the start of the next step and the history's time (every ``h``, ``r_k`` of
  the multistep coefficients is computed on the evaluated times).  They measure the *state*, as the
  paper does, not the noise prediction: ``Var(eps_hat)`` is close to 1 at every noise level (its
  mean is ``1 - (alpha^2 / sigma^2)`` times the mean posterior variance of ``x_0``; 0.90-0.99 on
  the digits mixture for ``t = 300..900``), so matching it to ``sigma^2`` around the next time again
  returns the upper edge below the middle of the schedule.  As the state is measured after the step, it is re-timed
  (evaluated at ``t_s``), not re-aimed.  The base is DPM-Solver++ (data prediction, the registry's
  ``dpmpp_2m`` / ``dpmpp_3m``); the authors ran the noise-prediction DPM-Solver-2, to which the rule
  transfers unchanged.  ``d2_weight=0.5`` gives their ``DPM_Solver`` class's third-order update.
* ``ts_deis_3`` follows the code: every evaluation above the cutoff, the first included, the state's
  variance, the window on its own time, only the network's time shifted; the noise prediction of
  an evaluation is taken at the time it was evaluated at (the network's output), the coefficients
  at the nominal times.  The authors' DEIS has no lower-order final steps:
  ``lower_order_final=False`` reproduces it (the default is the base ``deis_3``'s).

Window and cutoff are fractions of the schedule's time range ``t_max - t_zero`` (1000 timesteps
for DDPM): ``window`` is the full width, ``window/2`` on each side.  Defaults are the authors'
published commands: DPM-Solver ``--window_size 30 --cut_off_value 300`` (TS-DPM README: 15 each
side) -> 0.03, 0.3; DEIS ``--window_size 10 --cut_off_value 900`` (10 each side) -> 0.02, 0.9;
DDIM ``--window 80 --cutoff 300`` (TS-DPM-ADM README, 5 DDIM steps) -> 0.08, 0.3.  For DDIM and
DPM-Solver++, whose coefficients use the shifted times, ``t_s`` is also kept within a third of the
gaps to the neighbouring grid times so that a step never runs backwards and a multistep history
stays ordered (fewstep's addition; at the default windows of the default grid it is inactive up to
NFE 24 for DPM-Solver++ and NFE 8 for DDIM, whose window is wider).

**The selection (deviation, required by issue 12).**  One sample's variance over ``d`` entries
has sampling noise of relative size ``sqrt(2 / (d - 1))``: 18% for 64 entries, 2.6% for a 32x32x3
image, while ``sigma^2`` changes by about 1% over a 30-step window at ``t = 500``.  The argmin then
lands on a window edge for ~95% of the samples on the 64-dimensional digits mixture (measured),
chosen by the noise, not by the sample's time.  Here the selected time is the posterior mean of
the linear-Gaussian model the argmin implicitly assumes: the sample's true time has the window as
its prior (uniform, variance ``w^2 / 12``), and the measured variance is ``v(t) + noise`` with the
chi-square variance ``2 v^2 / (d - 1)`` of a variance estimated from ``d`` entries.  Linearised over
the window this shrinks the measured variance towards the nominal time's,

    s2_hat = v(t) + kappa (s2 - v(t)),   kappa = dv^2 / (dv^2 + 24 v(t)^2 / (d - 1)),

``dv`` the change of ``v`` across the window, and then takes the authors' match of ``s2_hat``
clipped to the window.  As ``d -> inf`` (an exact variance) ``kappa -> 1`` and the selection is the
authors' argmin; when the window cannot be resolved by one sample's variance the sample keeps its
nominal time instead of jumping to an edge.  ``selection="argmin"`` is the authors' rule (on the
continuous window: the root of ``v(t_s) = s2`` clipped to the window, so no integer rounding).

**Reference variance.**  The authors compare with ``sigma^2 = 1 - alpha_bar``, the variance of
pure noise.  A sample of the marginal at ``t`` has expected per-sample variance
``v(t) = alpha^2 m + sigma^2 = m + (1 - m) sigma^2`` (VP: ``alpha^2 = 1 - sigma^2``), ``m`` the data's
mean per-sample variance over its entries; ``data_variance=m`` uses it (default 0, the authors').
With ``m = 0`` a sample of data with visible contrast looks noisier than its time, so where
``alpha^2 m`` exceeds the window's range of ``sigma^2`` (low noise, large ``d``) the selection moves
to the window's upper edge: a systematic error of the authors' reference, not noise.  For
``0 <= m < 1`` the match has the closed form ``sigma(t_s)^2 = (s2_hat - m) / (1 - m)``, solved with
the schedule's exact ``t_from_lambda``.

**VP only.**  ``1 - alpha_bar`` is the authors' reference; EDM and flow schedules raise a
``ValueError``.  The shift does not vanish as the steps shrink (it re-times the sample), so these
samplers have no convergence order (``order = 0``); with ``cutoff=1`` or ``window=0`` they are
exactly their base solver.  Coefficients that depend on a sample's times are computed at each step
per distinct history of times (one set while no sample is shifted).  The evaluation times depend on the state, so a diffusers pipeline
cannot drive these samplers (``FewstepScheduler`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fewstep.models.prediction import from_x0
from fewstep.samplers._expint import LinearStep, combine, dpmpp_multistep_weights, multistep_orders
from fewstep.samplers.core import Eval, NoiseSource, Point, Program, Routine, Setup, points
from fewstep.samplers.deis import BASES, deis_step
from fewstep.samplers.registry import register
from fewstep.schedules import NoiseSchedule

__all__ = ["shifted_times", "SELECTIONS"]

_PAPER = (
    "Li, Qu, Yao, Sun & Moens 2024, Alleviating Exposure Bias in Diffusion Models through Sampling with "
    "Shifted Time Steps (ICLR 2024), Algorithm 3; per-sampler rules of the authors' TS-DPM code"
)

SELECTIONS = ("shrunk", "argmin")

Window = tuple[float, float]


def shifted_times(
    schedule: NoiseSchedule,
    x: torch.Tensor,
    t: float,
    lo: float,
    hi: float,
    width: float,
    *,
    data_variance: float = 0.0,
    selection: str = "shrunk",
) -> torch.Tensor:
    """Per sample of ``x`` (B, ...), the time in ``[lo, hi]`` selected for a state of nominal time
    ``t`` from its variance over all entries (unbiased, as ``torch.var``), as (B,) float64.

    ``width`` is the nominal window width (the prior; ``[lo, hi]`` may be clipped).  ``"argmin"``:
    the time whose reference variance ``v = m + (1 - m) sigma^2`` (``m = data_variance``) is closest,
    the authors' rule; ``"shrunk"``: the same match after shrinking the variance towards ``v(t)``
    by ``kappa = dv^2 / (dv^2 + 24 v(t)^2 / (d - 1))`` (module docstring)."""
    if schedule.kind != "vp":
        raise ValueError(f"time shift matches variances to 1 - alpha_bar, a VP schedule's; got a {schedule.kind!r} schedule")
    m = float(data_variance)
    b, d = x.shape[0], x[0].numel()
    s2 = x.detach().reshape(b, -1).to(torch.float64).var(dim=1).cpu()
    sig2 = torch.exp(2.0 * schedule.log_sigma(torch.tensor([lo, t, hi], dtype=torch.float64)))
    s_lo, s_t, s_hi = (float(v) for v in sig2)
    u = (s2 - m) / (1.0 - m)  # the sigma^2 the sample's variance implies
    if selection == "shrunk":
        dv = (1.0 - m) * (s_hi - s_lo) / (hi - lo) * width if hi > lo else 0.0  # v's change across the window
        v_t = m + (1.0 - m) * s_t
        kappa = dv * dv / (dv * dv + 24.0 * v_t * v_t / (d - 1))
        u = s_t + kappa * (u - s_t)
    elif selection != "argmin":
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    u = u.clamp(min=s_lo, max=s_hi)
    lam = 0.5 * (torch.log1p(-u) - torch.log(u))
    ts = schedule.t_from_lambda(torch.where(u < s_hi, lam, torch.zeros_like(lam)))
    ts = torch.where(u >= s_hi, torch.full_like(ts, hi), torch.where(u <= s_lo, torch.full_like(ts, lo), ts))
    return ts.clamp(min=lo, max=hi)


@dataclass(frozen=True)
class _Variant:
    first_shifted: int  # evaluations before this index keep their nominal time
    shift_coefficients: bool  # the step's coefficients use the evaluated times (DDIM, DPM-Solver++)


def _dpm_rule(setup: Setup, pts: list[Point], i: int, k: int) -> LinearStep:
    c_x, w, _ = dpmpp_multistep_weights(pts, i, k, d2_weight=float(setup.options.get("d2_weight", 1.0)))
    return LinearStep(c_x, tuple(w))


def _check_options(setup: Setup) -> tuple[float, float, float, str]:
    opts, name = setup.options, setup.spec.name
    if setup.schedule.kind != "vp":
        raise ValueError(
            f"{name} is defined for VP schedules (VPDiscrete, VPContinuous): it matches a sample's variance to "
            f"1 - alpha_bar; got {type(setup.schedule).__name__} (kind {setup.schedule.kind!r}). Use the base "
            "sampler on this schedule."
        )
    window, cutoff = float(opts["window"]), float(opts["cutoff"])
    if not 0.0 <= window <= 1.0 or not 0.0 <= cutoff <= 1.0:
        raise ValueError(
            f"{name}: window and cutoff are fractions of the schedule's time range, in [0, 1] "
            f"(0.03 and 0.3 are the authors' 30 and 300 of 1000 timesteps); got window={window}, cutoff={cutoff}"
        )
    m = float(opts["data_variance"])
    if not 0.0 <= m < 1.0:
        raise ValueError(
            f"{name}: data_variance is the data's mean per-sample variance over its entries, in [0, 1) for a VP "
            f"schedule (at 1 the variance carries no time information); got {m}"
        )
    if opts["selection"] not in SELECTIONS:
        raise ValueError(f"{name}: selection must be one of {', '.join(SELECTIONS)}, got {opts['selection']!r}")
    if "basis" in opts and opts["basis"] not in BASES:
        raise ValueError(f"{name}: basis must be one of {', '.join(BASES)}, got {opts['basis']!r}")
    return window, cutoff, m, opts["selection"]


def _windows(
    setup: Setup, grid: list[float], nominal: list[Point], variant: _Variant, window: float, cutoff: float
) -> list[Window | None]:
    """Per evaluation, the window of its time, or ``None`` where it keeps the nominal time."""
    sch = setup.schedule
    span = sch.t_max - sch.t_zero
    t_cut = sch.t_zero + cutoff * span
    half = 0.5 * window * span
    out: list[Window | None] = []
    for i in range(setup.nfe):
        t = grid[i]
        if i < variant.first_shifted or t <= t_cut or window == 0.0 or nominal[i].alpha == 0.0:
            out.append(None)  # (a zero-SNR start keeps its time: no variance to match, x/alpha undefined)
            continue
        lo, hi = max(t - half, sch.t_min), min(t + half, sch.t_max)
        if variant.shift_coefficients:  # keep the step forward and the history ordered
            lo = max(lo, t - (t - grid[i + 1]) / 3)
            if i > 0:
                hi = min(hi, t + (grid[i - 1] - t) / 3)
        out.append((lo, hi))
    return out


def _time_shift(setup: Setup, order: int, variant: _Variant) -> Program:
    window, cutoff, m, selection = _check_options(setup)
    opts = setup.options
    grid_t = setup.grid(setup.nfe)
    nominal = setup.points(grid_t)
    grid = grid_t.tolist()
    windows = _windows(setup, grid, nominal, variant, window, cutoff)
    width = window * (setup.schedule.t_max - setup.schedule.t_zero)

    def select(x: torch.Tensor, i: int) -> tuple[Any, list[float]]:
        win = windows[i]
        if win is None:
            return nominal[i].t, [nominal[i].t] * x.shape[0]
        ts = shifted_times(setup.schedule, x, grid[i], *win, width, data_variance=m, selection=selection)
        return ts, ts.tolist()

    if variant.shift_coefficients:
        to_data = math.isinf(nominal[-1].lam)  # a step onto clean data is first order
        orders = multistep_orders(setup.nfe, order, bool(opts.get("lower_order_final", True)), to_data)
        routine = _shifted_history_routine(setup, nominal, orders, select)
    else:
        basis = opts["basis"]
        to_data = math.isinf(nominal[-1].lam) and basis == "log_rho"
        orders = multistep_orders(setup.nfe, order, bool(opts["lower_order_final"]), to_data)
        steps = [deis_step(setup, nominal, i, k, basis) for i, k in enumerate(orders)]
        # a shifted evaluation's step in noise predictions only (an unshifted one is the base step)
        steps = [st if win is None else _eps_form(st, p) for st, win, p in zip(steps, windows, nominal)]
        routine = _nominal_coefficients_routine(setup, nominal, steps, select)
    return setup.program(grid_t, None, routine, orders=orders)


def _check_dim(setup: Setup, x: torch.Tensor) -> None:
    if x[0].numel() < 2:
        raise ValueError(f"{setup.spec.name} matches each sample's variance over its entries; samples need at least 2")


def _shifted_history_routine(
    setup: Setup, nominal: list[Point], orders: list[int], select: Callable[[torch.Tensor, int], tuple[Any, list[float]]]
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """DDIM / DPM-Solver++: the sample lies at the time it was evaluated at; each step starts there,
    and the history coefficients use the evaluated times (per sample)."""
    depth = max(orders)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        _check_dim(setup, x)
        b = x.shape[0]
        hist_d: list[torch.Tensor] = []
        times: list[list[float]] = [[] for _ in range(b)]
        for i in range(setup.nfe):
            t_eval, ts = select(x, i)
            x, d = yield Eval(x, t_eval)
            for tb, s in zip(times, ts):
                tb.append(s)
            hist_d = [d, *hist_d[: depth - 1]]
            x = _apply(_steps_for(setup, nominal[i + 1], [tuple(tb[-orders[i]:]) for tb in times], orders[i]), x, hist_d, [])
        return x

    return routine


def _steps_for(setup: Setup, target: Point, histories: list[tuple[float, ...]], order: int) -> list[LinearStep]:
    """Per sample, the step from its history of evaluated times to ``target``: one set of
    coefficients per distinct history (every sample shares one while none is shifted), their
    schedule values looked up in one vectorised call."""
    distinct = list(dict.fromkeys(histories))
    pts = points(setup.schedule, [t for h in distinct for t in h])
    k = len(distinct[0])
    rule = {h: _dpm_rule(setup, [*pts[j * k : (j + 1) * k], target], k - 1, order) for j, h in enumerate(distinct)}
    return [rule[h] for h in histories]


def _eps_form(step: LinearStep, s: Point) -> LinearStep:
    """A DEIS step in noise predictions only, ``x' = c_x x + sum w_eps eps``: its first-order form
    ``alpha_t D + sigma_t eps`` with ``D = (x - sigma_s eps) / alpha_s`` at the nominal start ``s``
    (the authors' ``psi x + C eps``).  A zero-SNR start keeps the ``D`` form (it is never shifted)."""
    if not step.w_d or s.alpha == 0.0:
        return step
    (a_t,), (s_t,) = step.w_d, step.w_eps[:1]
    return LinearStep(step.c_x + a_t / s.alpha, (), (s_t - a_t * s.sigma / s.alpha, *step.w_eps[1:]), step.c_z)


def _nominal_coefficients_routine(
    setup: Setup, nominal: list[Point], steps: list[LinearStep], select: Callable[[torch.Tensor, int], tuple[Any, list[float]]]
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """DEIS: only the network's time input is shifted; the noise prediction is the network's at that
    time, the coefficients are the nominal grid's."""
    depth = max(max(len(s.w_d), len(s.w_eps)) for s in steps)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        _check_dim(setup, x)
        hist_d: list[torch.Tensor] = []
        hist_eps: list[torch.Tensor] = []
        for i, st in enumerate(steps):
            t_eval, ts = select(x, i)
            x, d = yield Eval(x, t_eval)
            if isinstance(t_eval, torch.Tensor):
                a, s = _per_sample(setup.schedule, ts, x)
            else:
                a, s = nominal[i].alpha, nominal[i].sigma
            hist_d = [d, *hist_d[: depth - 1]]
            hist_eps = [from_x0("epsilon", d, x, a, s), *hist_eps[: depth - 1]]
            x = _apply([st], x, hist_d, hist_eps)
        return x

    return routine


def _per_sample(schedule: NoiseSchedule, ts: list[float], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    la, ls = schedule.log_alpha_sigma(torch.tensor(ts, dtype=torch.float64))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return torch.exp(la).to(x.device, x.dtype).reshape(shape), torch.exp(ls).to(x.device, x.dtype).reshape(shape)


def _apply(
    steps: Sequence[LinearStep], x: torch.Tensor, hist_d: list[torch.Tensor], hist_eps: list[torch.Tensor]
) -> torch.Tensor:
    """``c_x x + sum w_d D + sum w_eps eps`` with one set of coefficients per sample (or one for all)."""
    if len(set(steps)) == 1:  # one set for all (no sample shifted): the base solver's arithmetic
        st = steps[0]
        return combine(x, st.c_x, [*zip(st.w_d, hist_d), *zip(st.w_eps, hist_eps)])
    shape = (-1,) + (1,) * (x.ndim - 1)

    def col(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=x.device).reshape(shape)

    out = col([st.c_x for st in steps]) * x
    for j, h in enumerate(hist_d):
        w = [st.w_d[j] if j < len(st.w_d) else 0.0 for st in steps]
        if any(w):
            out = out + col(w) * h
    for j, h in enumerate(hist_eps):
        w = [st.w_eps[j] if j < len(st.w_eps) else 0.0 for st in steps]
        if any(w):
            out = out + col(w) * h
    return out


_COMMON = {"data_variance": 0.0, "selection": "shrunk"}


def _register(name: str, order: int, variant: _Variant, summary: str, options: dict[str, Any]) -> None:
    @register(
        name=name,
        family="time_shift",
        order=0,
        evals_per_step=1,
        stochastic=False,
        model_kind="diffusion",
        paper=_PAPER,
        summary=summary,
        options={**options, **_COMMON},
        push_style=False,
    )
    def build(setup: Setup) -> Program:
        return _time_shift(setup, order, variant)


_SHIFT_ALL = "network time, step start and history at the time whose variance matches the state's"
_register("ts_ddim", 1, _Variant(1, True),
          "DDIM from the second step evaluated and stepped from the variance-matched time (paper, Alg. 3)",
          {"window": 0.08, "cutoff": 0.3})
_register("ts_dpmpp_2m", 2, _Variant(2, True), f"dpmpp_2m after its warm-up: {_SHIFT_ALL}",
          {"window": 0.03, "cutoff": 0.3, "lower_order_final": True})
_register("ts_dpmpp_3m", 3, _Variant(3, True), f"dpmpp_3m after its warm-up: {_SHIFT_ALL}",
          {"window": 0.03, "cutoff": 0.3, "lower_order_final": True, "d2_weight": 1.0})
_register("ts_deis_3", 3, _Variant(0, False),
          "deis_3 with the network evaluated at the variance-matched time, coefficients on the nominal grid",
          {"window": 0.02, "cutoff": 0.9, "lower_order_final": True, "basis": "t"})
