"""The Time-Shift Sampler (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024, Algorithm 3) on DDIM, multistep
DPM-Solver++ and DEIS.

Exposure bias: a sample made by a solver is not distributed as the training data at its nominal
time ``t``, but it often matches the marginal at a nearby time better.  From the second step on,
while the nominal time is above the cutoff, the sampler feeds the network the time ``t_s`` of a
window around ``t`` whose noise variance ``sigma(t_s)^2`` is closest to the sample's variance
(over all its entries, per sample; the paper's line 9), and takes the solver step *from* ``t_s``
("take a sampling step with t_next", line 6): the sample is treated as lying at ``t_s``, and the
history of a multistep solver is kept at the times actually evaluated.

Window and cutoff are fractions of the schedule's time range: the defaults 0.03 and 0.3 are the
authors' ``window_size = 30``, ``cut_off_value = 300`` of a 1000-step DDPM schedule (their
DPM-Solver example).  As the variance is monotone in time, the best ``t_s`` is the solution of
``sigma(t_s)^2 = Var(x)`` clipped to the window (by inverse interpolation, so any schedule works),
and ``t_s`` is further kept within a third of the gaps to the neighbouring grid times, so the
evaluation times of a multistep history stay apart.  The shift does not vanish as the steps shrink
(it re-times the sample, it does not refine the integration), so these samplers have no
convergence order (``order = 0``): with ``cutoff=1`` (or ``window=0``) they are their base solver.

Every sample gets its own times, so the coefficients are computed per distinct history of times
(one set for the whole batch below the cutoff), cached for the duration of one run only.  The evaluation times depend on the state, so a
diffusers pipeline cannot drive these samplers (``FewstepScheduler`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fewstep.models.prediction import from_x0
from fewstep.samplers._expint import LinearStep, dpmpp_multistep_weights, multistep_orders
from fewstep.samplers.core import Eval, NoiseSource, Point, Program, Routine, Setup, points
from fewstep.samplers.deis import BASES, deis_step
from fewstep.samplers.registry import register
from fewstep.schedules import NoiseSchedule

__all__ = ["shifted_times"]

_PAPER = "Li et al. 2024, Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps (ICLR 2024), Algorithm 3"

StepRule = Callable[[Setup, list[Point], int, int], LinearStep]


def shifted_times(schedule: NoiseSchedule, variance: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per sample, the time in ``[lo, hi]`` whose ``sigma^2`` is closest to ``variance`` (B,):
    ``sigma`` increases with time, so this is the root of ``sigma(t)^2 = variance`` clipped to the
    interval, found by inverse interpolation on 1025 points of the interval (float64)."""
    v = variance.detach().to("cpu", torch.float64)
    t = torch.linspace(lo, hi, 1025, dtype=torch.float64)
    s2 = torch.exp(2.0 * schedule.log_sigma(t))
    v = v.clamp(min=float(s2[0]), max=float(s2[-1]))
    j = torch.searchsorted(s2, v.contiguous()).clamp(1, len(t) - 1)
    w = (v - s2[j - 1]) / (s2[j] - s2[j - 1]).clamp_min(torch.finfo(torch.float64).tiny)
    return t[j - 1] + w.clamp(0.0, 1.0) * (t[j] - t[j - 1])


def _dpm_rule(setup: Setup, pts: list[Point], i: int, k: int) -> LinearStep:
    c_x, w, _ = dpmpp_multistep_weights(pts, i, k, d2_weight=float(setup.options.get("d2_weight", 1.0)))
    return LinearStep(c_x, tuple(w))


def _deis_rule(setup: Setup, pts: list[Point], i: int, k: int) -> LinearStep:
    return deis_step(setup, pts, i, k, setup.options["basis"])


def _time_shift(setup: Setup, order: int, rule: StepRule) -> Program:
    opts, sch = setup.options, setup.schedule
    window, cutoff = float(opts["window"]), float(opts["cutoff"])
    if not 0.0 <= window <= 1.0 or not 0.0 <= cutoff <= 1.0:
        raise ValueError(
            f"{setup.spec.name}: window and cutoff are fractions of the schedule's time range, in [0, 1] "
            f"(0.03 and 0.3 are the paper's 30 and 300 of 1000 timesteps); got window={window}, cutoff={cutoff}"
        )
    if "basis" in opts and opts["basis"] not in BASES:
        raise ValueError(f"{setup.spec.name}: basis must be one of {', '.join(BASES)}, got {opts['basis']!r}")
    grid = setup.grid(setup.nfe)
    nominal = setup.points(grid)
    # a step onto clean data is first order for the log-SNR methods (and DEIS's log-rho basis)
    to_data = math.isinf(nominal[-1].lam) and (rule is _dpm_rule or opts["basis"] == "log_rho")
    orders = multistep_orders(setup.nfe, order, bool(opts.get("lower_order_final", True)), to_data)
    span = sch.t_max - sch.t_zero
    t_cut = sch.t_zero + cutoff * span
    g = grid.tolist()
    windows: list[tuple[float, float] | None] = [None]  # the first evaluation is at the nominal time
    for i in range(1, setup.nfe):
        if g[i] <= t_cut or window == 0.0:
            windows.append(None)
            continue
        lo = max(g[i] - 0.5 * window * span, g[i] - (g[i] - g[i + 1]) / 3)
        hi = min(g[i] + 0.5 * window * span, g[i] + (g[i - 1] - g[i]) / 3, sch.t_max)
        windows.append((lo, hi))
    return setup.program(grid, None, _routine(setup, nominal, orders, windows, rule))


def _routine(
    setup: Setup, nominal: list[Point], orders: list[int], windows: Sequence[tuple[float, float] | None], rule: StepRule
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    depth = max(orders)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        # Coefficients per distinct history of evaluated times, for this run only: shifted times
        # are per-sample floats that another run (another batch) will not repeat, so a cache kept
        # with the program would only grow.  Within a run, samples with one history (every sample
        # below the cutoff) share one entry; at most B per step.
        cache: dict[tuple[float, ...], LinearStep] = {}

        def step_for(times: tuple[float, ...], i: int) -> LinearStep:
            key = (i, *times)
            if key not in cache:
                cache[key] = rule(setup, [*points(setup.schedule, list(times)), nominal[i + 1]], len(times) - 1, orders[i])
            return cache[key]

        b = x.shape[0]
        hist_d: list[torch.Tensor] = []
        hist_eps: list[torch.Tensor] = []
        times: list[list[float]] = [[] for _ in range(b)]  # per sample, the times evaluated so far
        if x[0].numel() < 2:
            raise ValueError(f"{setup.spec.name} matches each sample's variance over its entries; samples need at least 2")
        for i, win in enumerate(windows):
            if win is None:
                t_eval: Any = nominal[i].t
                ts = [nominal[i].t] * b
            else:
                t_eval = shifted_times(setup.schedule, x.reshape(b, -1).var(dim=1), *win)
                ts = t_eval.tolist()
            x, d = yield Eval(x, t_eval)
            for tb, s in zip(times, ts):
                tb.append(s)
            k = orders[i]
            steps = [step_for(tuple(tb[-k:]), i) for tb in times]
            hist_d = [d, *hist_d[: depth - 1]]
            if any(st.w_eps for st in steps):
                a, s = _per_sample(setup.schedule, ts, x)
                hist_eps = [from_x0("epsilon", d, x, a, s), *hist_eps[: depth - 1]]
            x = _apply(steps, x, hist_d, hist_eps)
        return x

    return routine


def _per_sample(schedule: NoiseSchedule, ts: list[float], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    la, ls = schedule.log_alpha_sigma(torch.tensor(ts, dtype=torch.float64))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return torch.exp(la).to(x.device, x.dtype).reshape(shape), torch.exp(ls).to(x.device, x.dtype).reshape(shape)


def _apply(steps: list[LinearStep], x: torch.Tensor, hist_d: list[torch.Tensor], hist_eps: list[torch.Tensor]) -> torch.Tensor:
    """``c_x x + sum w_d D + sum w_eps eps`` with one set of coefficients per sample."""
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


_TS_OPTIONS = {"window": 0.03, "cutoff": 0.3}


def _register(name: str, base: str, order: int, rule: StepRule, extra: dict[str, Any]) -> None:
    @register(
        name=name,
        family="time_shift",
        order=0,
        evals_per_step=1,
        stochastic=False,
        model_kind="diffusion",
        paper=_PAPER,
        summary=f"{base} evaluating the network at the time whose noise variance matches the sample's (window, cutoff)",
        options={**_TS_OPTIONS, **extra},
        push_style=False,
    )
    def build(setup: Setup) -> Program:
        return _time_shift(setup, order, rule)


_register("ts_ddim", "ddim", 1, _dpm_rule, {})
_register("ts_dpmpp_2m", "dpmpp_2m", 2, _dpm_rule, {"lower_order_final": True})
_register("ts_dpmpp_3m", "dpmpp_3m", 3, _dpm_rule, {"lower_order_final": True, "d2_weight": 1.0})
_register("ts_deis_3", "deis_3", 3, _deis_rule, {"lower_order_final": True, "basis": "t"})
