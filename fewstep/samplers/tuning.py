"""Tuning a sampling plan for one model and one NFE budget, from the model's own evaluations.

:func:`tune` starts from a registered deterministic sampler and improves it in stages, each
fitted on *training* trajectories and kept only if it lowers the error on held-out *validation*
trajectories (different noises):

1. ``grid``: the evaluation times.  The default grid is warped by a monotone map with one
   parameter per interior time (softmax increments of the grid's index coordinate), searched
   with Nelder-Mead on the final-sample error (the search of optimised step schedules such as
   Sabour et al. 2024, "Align Your Steps", and Liu et al. 2024, USF, sec. 4, without their priors).
2. ``orders``: the solver order of every step (USF's per-step solver choice), by coordinate
   descent over the orders each step can take.
3. ``coefficients``: every coefficient of the plan's linear update (its coefficient table, read
   off the sampler exactly by :func:`fewstep.samplers.plan.probe_table`), fitted by Adam through
   the network on minibatches of the training trajectories, with early stopping on the validation
   error: a per-step compensation in the spirit of DC-Solver (Zhao et al. 2024) extended to the
   whole table.
4. ``times``: with ``coefficients``, the evaluation times move jointly with the table (the joint
   solver-and-schedule fit of Frankel et al. 2025, "S4S", sec. 4, and the learned discretisation of
   Tong et al. 2025, "LD3").  The derivative of the network in its time input is taken by a forward
   difference (one extra evaluation per step, without a graph), so any denoiser works, including
   ones whose schedule is not differentiable in ``t``; the derivative in ``x`` flows through autograd.

The target of every stage is the model's own many-step solution from the same noise
(``reference_sampler`` at ``reference_nfe``), never data the model does not provide.  The error
is the root-mean-square difference of the final samples.  The result is a
:class:`fewstep.samplers.plan.SamplingPlan` whose ``meta`` records every stage's train and
validation error (the ablation of the ingredients).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

import fewstep
from fewstep.models.prediction import time_tensor
from fewstep.samplers.core import NoiseSource, Program, model_schedule, prepare, run_program
from fewstep.samplers.plan import SamplingPlan, probe_table, table_program
from fewstep.samplers.registry import spec as sampler_spec
from fewstep.schedules import NoiseSchedule

__all__ = ["tune", "INGREDIENTS"]

INGREDIENTS = ("grid", "orders", "coefficients", "times")


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))


class _Trajectories:
    """Noise, the model's reference solution from it, and the error of a program on a subset."""

    def __init__(self, denoiser: Callable, schedule: NoiseSchedule, noise: torch.Tensor, reference: torch.Tensor, cond: Mapping[str, Any] | None):
        self.denoiser, self.schedule, self.noise, self.reference, self.cond = denoiser, schedule, noise, reference, cond
        self.evaluations = 0

    def error(self, program: Program, rows: slice) -> float:
        noise = self.noise[rows]
        work = torch.promote_types(noise.dtype, torch.float32)
        with torch.no_grad():
            out, _ = run_program(program, self.denoiser, program.initial_state(noise.to(work)), noise_source=NoiseSource(),
                                 cond=self.cond, model_dtype=noise.dtype)
        self.evaluations += program.nfe * noise.shape[0]
        return _rmse(out, self.reference[rows])


def _warp(z: np.ndarray, g0: np.ndarray) -> list[float]:
    """The default grid ``g0`` re-timed: softmax increments of the index coordinate, ``z = 0`` is ``g0``."""
    w = np.exp(np.append(z - z.max(initial=0.0), -z.max(initial=0.0)))
    u = np.concatenate([[0.0], np.cumsum(w / w.sum())])
    u[-1] = 1.0
    return np.interp(u, np.linspace(0.0, 1.0, len(g0)), g0).tolist()


class _EvalTimes:
    """The evaluation times as free parameters ``t_j = t0_j + s_j c_j`` (``c_j``: the smaller gap to
    a neighbouring time, so one unit of ``s_j`` is one local step).  The first time (where the
    noise is given) stays fixed; after every update :meth:`project` keeps the times decreasing and
    above the schedule's smallest time."""

    def __init__(self, times: Sequence[float], schedule: NoiseSchedule, end: float, trainable: bool):
        t0 = torch.tensor(list(times), dtype=torch.float64)
        self.floor = max(float(schedule.t_min), float(end))  # times decrease towards t_zero < t_min
        nxt = torch.cat([t0[1:], torch.tensor([self.floor])])
        prev = torch.cat([t0[:1], t0[:-1]])
        self.t0 = t0
        self.scale = torch.minimum((prev - t0).abs(), (t0 - nxt).abs())
        self.scale[0] = 0.0
        self.trainable = trainable and len(t0) > 1 and bool((self.scale[1:] > 0).all())
        self.s = torch.zeros(len(t0), dtype=torch.float64, requires_grad=self.trainable)

    def values(self) -> list[float]:
        return (self.t0 + self.s.detach() * self.scale).tolist()

    def project(self) -> None:
        """Decreasing with a margin of 1e-3 local steps, and above the floor."""
        t = self.values()
        margin = [1e-3 * float(c) for c in self.scale]
        for j in range(1, len(t)):
            t[j] = min(t[j], t[j - 1] - margin[j])
        t[-1] = max(t[-1], self.floor + margin[-1])
        for j in range(len(t) - 2, 0, -1):
            t[j] = max(t[j], t[j + 1] + margin[j + 1])
        with torch.no_grad():
            self.s.copy_((torch.tensor(t, dtype=torch.float64) - self.t0) / self.scale.clamp(min=1e-300))
            self.s[0] = 0.0


def _differentiable_table_run(
    denoiser: Callable,
    table: torch.Tensor,
    times: _EvalTimes,
    x_T: torch.Tensor,
    cond: Mapping[str, Any] | None,
    model_dtype: torch.dtype,
    step: float = 1e-3,
) -> torch.Tensor:
    """The coefficient table's result, with gradients to ``table`` through the network, and to the
    times' parameters ``s`` when they are trainable.

    ``d D / d s_j`` is the forward difference ``(D(x_j, t_j + step c_j) - D(x_j, t_j)) / step`` (no
    graph); it enters as the straight-through term ``(s_j - stop(s_j)) dD/ds_j``, which is zero in
    value and gives the chain rule in gradient."""
    kwargs = dict(cond or {})
    ds: list[torch.Tensor] = []
    x = x_T
    for i, t in enumerate(times.values()):
        d = denoiser(x.to(model_dtype), time_tensor(t, x.device), **kwargs).to(x_T.dtype)
        if times.trainable and i > 0:
            with torch.no_grad():
                moved = denoiser(x.detach().to(model_dtype), time_tensor(t + step * float(times.scale[i]), x.device), **kwargs)
                slope = (moved.to(x_T.dtype) - d.detach()) / step
            d = d + (times.s[i] - times.s[i].detach()).to(x_T.dtype) * slope
        ds.append(d)
        row = table[i + 1]
        x = row[0] * x_T + sum(row[1 + j] * ds[j] for j in range(i + 1))
    return x


class _FrozenParameters:
    """Stops gradients from reaching the network's weights while the table is fitted."""

    def __init__(self, denoiser: Any):
        self.params = [p for p in denoiser.parameters() if p.requires_grad] if isinstance(denoiser, torch.nn.Module) else []

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


def tune(
    denoiser: Callable[..., torch.Tensor],
    schedule: NoiseSchedule | None = None,
    sampler: str = "unipc_3",
    nfe: int = 5,
    num_trajectories: int = 256,
    generator: torch.Generator | None = None,
    *,
    shape: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    cond: Mapping[str, Any] | None = None,
    ingredients: Sequence[str] = INGREDIENTS,
    options: Mapping[str, Any] | None = None,
    reference_sampler: str = "dpmpp_3m",
    reference_nfe: int | None = None,
    validation_fraction: float = 0.5,
    grid_evaluations: int | None = None,
    coefficient_iterations: int = 160,
    learning_rate: float = 3e-3,
    time_learning_rate: float = 1e-2,
    batch_size: int = 32,
    patience: int = 10,
    progress: Callable[[str, float], None] | None = None,
) -> SamplingPlan:
    """Tune a sampling plan for ``denoiser`` at ``nfe`` network evaluations.

    Args:
        denoiser: ``D(x, t, **cond) -> x0_hat`` (gradients must flow through it in ``x`` for the
            ``coefficients`` stage; network weights are left untouched).
        schedule: the model's schedule (default ``denoiser.schedule``).
        sampler: the base: a registered deterministic sampler with fixed evaluation times.
        nfe: the budget.
        num_trajectories: noises drawn (``validation_fraction`` of them held out); more generalise
            better at a proportional cost.
        generator: seeds the noise; the same generator state gives the same plan.
        shape: shape of one sample, to draw the noise (or pass ``noise`` of shape (N, ...)).
        dtype: dtype of the drawn noise (the dtype the network sees).
        cond: conditioning for every call; it must not depend on the batch (broadcastable).
        ingredients: the stages to run, a subset of ``("grid", "orders", "coefficients", "times")``
            (``times`` only together with ``coefficients``).
        options: options of the base sampler.
        reference_sampler, reference_nfe: the model's own many-step solution that every stage is
            fitted to (default NFE ``max(100, 20 nfe)``); its own error (against half the NFE) is
            recorded in the plan.
        grid_evaluations: Nelder-Mead budget (default ``20 (steps - 1)`` evaluations of the plan on 64
            training trajectories).
        coefficient_iterations, learning_rate, time_learning_rate: Adam on the coefficient table
            and on the evaluation times (in units of the local step).
        batch_size: training trajectories per Adam update.
        patience: validation checks (every 10 updates) without a gain before the fit stops.
        progress: ``progress(message, fraction)`` while tuning: ``fraction`` is how much of the current
            stage is done (``1.0`` when it ends; the stages are the reference, the default grid and
            each ingredient, ``times`` counting with ``coefficients``).

    Returns:
        The :class:`SamplingPlan`; ``plan.meta["stages"]`` lists each stage's errors.
    """
    t_begin = time.perf_counter()
    unknown = [i for i in ingredients if i not in INGREDIENTS]
    if unknown:
        raise ValueError(f"unknown tuning ingredient(s) {unknown}; choose from {', '.join(INGREDIENTS)}")
    if "times" in ingredients and "coefficients" not in ingredients:
        raise ValueError("the 'times' ingredient moves the evaluation times together with the coefficient table; "
                         "add 'coefficients' (or use 'grid' to tune the base sampler's grid alone)")
    s = sampler_spec(sampler)
    if s.stochastic or not s.push_style or s.needs or s.model_kind != "diffusion":
        raise ValueError(
            f"{sampler} cannot be tuned: tuning needs a deterministic diffusion sampler with fixed evaluation times "
            "(e.g. unipc_3, dpmpp_3m, deis_3, dpmpp_2m)"
        )
    schedule = model_schedule(denoiser, schedule)
    if noise is None:
        if shape is None:
            raise ValueError("pass shape=(C, H, W) of one sample (or noise=...) so tune can draw its trajectories")
        if num_trajectories < 8:
            raise ValueError(f"num_trajectories must be at least 8 (some are held out for validation), got {num_trajectories}")
        noise = torch.randn((int(num_trajectories), *shape), generator=generator, dtype=dtype)
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n_val = max(2, int(round(noise.shape[0] * validation_fraction)))
    if noise.shape[0] - n_val < 2:
        raise ValueError(f"{noise.shape[0]} trajectories leave too few for training after holding {n_val} out")
    val, train = slice(0, n_val), slice(n_val, noise.shape[0])
    options = dict(options or {})
    say = progress or (lambda msg, fraction: None)
    base = prepare(sampler, nfe, schedule, **options)  # the budget and the options fail here, before the reference run

    ref_nfe = int(reference_nfe) if reference_nfe is not None else max(100, 20 * nfe)
    with torch.no_grad():
        reference = fewstep.sample(denoiser, noise, reference_sampler, ref_nfe, schedule=schedule, cond=cond)
        half = fewstep.sample(denoiser, noise[val], reference_sampler, ref_nfe // 2, schedule=schedule, cond=cond)
    ref_error = _rmse(half, reference[val])
    ref_seconds = time.perf_counter() - t_begin
    data = _Trajectories(denoiser, schedule, noise, reference, cond)
    say(f"reference {reference_sampler} at {ref_nfe} NFE (its error vs {ref_nfe // 2} NFE: {ref_error:.2e})", 1.0)

    grid = base.grid.tolist()
    stages = [{"stage": "default", "train_rmse": data.error(base, train), "val_rmse": data.error(base, val), "accepted": True}]
    clock = [time.perf_counter()]

    def finish(stage: dict[str, Any], label: str) -> None:
        """Record a stage with the seconds it took, and report it."""
        now = time.perf_counter()
        stage["seconds"], clock[0] = now - clock[0], now
        stages.append(stage)
        say(f"{label}: validation RMSE {stage['val_rmse']:.4g} ({'kept' if stage['accepted'] else 'dropped'})", 1.0)

    best_val, program = stages[0]["val_rmse"], base
    say(f"default grid: validation RMSE {best_val:.4g}", 1.0)

    if "grid" in ingredients and len(grid) > 2:
        from scipy.optimize import minimize

        g0 = np.asarray(grid)
        fit_rows = slice(train.start, min(train.stop, train.start + 64))

        budget = int(grid_evaluations) if grid_evaluations is not None else 20 * (len(g0) - 2)
        calls = [0]

        def objective(z: np.ndarray) -> float:
            calls[0] += 1
            if calls[0] % 10 == 0:
                say(f"grid: {calls[0]}/{budget} evaluations", min(calls[0] / budget, 0.99))
            try:
                return data.error(prepare(sampler, nfe, schedule, spacing=_warp(z, g0), **options), fit_rows)
            except ValueError:  # a degenerate grid (coinciding times)
                return math.inf

        res = minimize(objective, np.zeros(len(g0) - 2), method="Nelder-Mead",
                       options={"maxfev": budget, "xatol": 1e-3, "fatol": 1e-7, "adaptive": True})
        candidate = prepare(sampler, nfe, schedule, spacing=_warp(res.x, g0), **options)
        stage = {"stage": "grid", "train_rmse": data.error(candidate, train), "val_rmse": data.error(candidate, val),
                 "evaluations": int(res.nfev), "grid": candidate.grid.tolist()}
        stage["accepted"] = stage["val_rmse"] < best_val
        if stage["accepted"]:
            best_val, program, grid = stage["val_rmse"], candidate, candidate.grid.tolist()
        finish(stage, "grid")
    elif "grid" in ingredients:
        say("grid: nothing to move (a single step)", 1.0)

    if "orders" in ingredients and "orders" in s.options and program.orders is not None:
        orders = list(program.orders)
        current = data.error(program, train)
        for sweep in range(2):  # coordinate descent passes
            changed = False
            for i in range(len(orders)):
                say(f"orders: pass {sweep + 1}, step {i + 1}/{len(orders)}", min((sweep + (i + 1) / len(orders)) / 2, 0.99))
                for o in range(1, 5):
                    if o == orders[i]:
                        continue
                    trial = orders[:i] + [o] + orders[i + 1 :]
                    try:
                        cand = prepare(sampler, nfe, schedule, spacing=grid, **{**options, "orders": trial})
                    except ValueError:
                        continue
                    err = data.error(cand, train)
                    if err < current * (1 - 1e-4):
                        orders, current, changed = trial, err, True
            if not changed:
                break
        candidate = prepare(sampler, nfe, schedule, spacing=grid, **{**options, "orders": orders})
        stage = {"stage": "orders", "train_rmse": current, "val_rmse": data.error(candidate, val), "orders": orders}
        stage["accepted"] = stage["val_rmse"] < best_val
        if stage["accepted"]:
            best_val, program = stage["val_rmse"], candidate
            options = {**options, "orders": orders}
        finish(stage, f"orders {orders}")
    elif "orders" in ingredients:
        say(f"orders: {sampler} has no per-step orders", 1.0)

    table, eval_times = None, list(program.eval_times)
    if "coefficients" in ingredients:
        table, when, stage = _fit_table(
            data, program, train, val, best_val, iterations=coefficient_iterations, lr=learning_rate,
            fit_times="times" in ingredients, time_lr=time_learning_rate, batch_size=batch_size, patience=patience,
            generator=generator, say=say,
        )
        if stage["accepted"]:
            best_val, eval_times = stage["val_rmse"], when
        else:
            table = None
        finish(stage, stage["stage"])

    meta = {
        "tuned_by": "fewstep.samplers.tune",
        "fewstep_version": fewstep.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "base_sampler": sampler,
        "ingredients": list(ingredients),
        "num_trajectories": int(noise.shape[0]),
        "num_validation": n_val,
        "reference": {"sampler": reference_sampler, "nfe": ref_nfe, "self_rmse": ref_error, "seconds": ref_seconds},
        "stages": stages,
        "validation_rmse": best_val,
        "network_evaluations": data.evaluations,
        "seconds": time.perf_counter() - t_begin,
    }
    return SamplingPlan(sampler, nfe, grid, options, schedule.config(), eval_times, table, meta)


def _fit_table(
    data: _Trajectories, program: Program, train: slice, val: slice, best_val: float, *, iterations: int, lr: float,
    fit_times: bool, time_lr: float, batch_size: int, patience: int, generator: torch.Generator | None,
    say: Callable[[str, float], None],
) -> tuple[list[list[float]] | None, list[float], dict[str, Any]]:
    """Adam on the coefficient table (and the evaluation times) through the network, on shuffled
    minibatches of the training trajectories, learning rates decayed to zero on a cosine; the
    iterate with the best validation error (checked every 10 updates; stops after ``patience``
    checks without a gain)."""
    t0 = torch.tensor(probe_table(program), dtype=torch.float64)
    n = program.nfe
    mask = torch.tril(torch.ones(n + 1, n + 1, dtype=torch.float64), diagonal=0)
    mask[:, 0] = 1.0
    mask[0] = 0.0  # x_0 = x_T is fixed
    sched, end = program.schedule, float(program.grid[-1])
    times = _EvalTimes(program.eval_times, sched, end, fit_times)
    work = torch.promote_types(data.noise.dtype, torch.float32)
    x_train = data.noise[train].to(work) * sched.noise_scale(float(times.t0[0]))
    ref_train = data.reference[train].to(work)
    model_dtype = data.noise.dtype
    # forward-difference step in local time steps: larger where the network computes in half precision
    fd_step = 1e-3 if torch.finfo(model_dtype).bits >= 32 else 3e-2
    delta = torch.zeros_like(t0, requires_grad=True)
    groups = [{"params": [delta], "lr": lr}] + ([{"params": [times.s], "lr": time_lr}] if times.trainable else [])
    opt = torch.optim.Adam(groups)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(iterations)))  # large steps first, then settle
    best: tuple[float, list[list[float]] | None, list[float], int] = (best_val, None, times.values(), 0)
    n_train, batch = x_train.shape[0], min(int(batch_size), x_train.shape[0])
    order, pos, since_best, train_rmse, it = torch.randperm(n_train, generator=generator), 0, 0, math.nan, 0
    with _FrozenParameters(data.denoiser), torch.enable_grad():
        for it in range(1, int(iterations) + 1):
            if pos + batch > n_train:
                order, pos = torch.randperm(n_train, generator=generator), 0
            rows, pos = order[pos : pos + batch], pos + batch
            opt.zero_grad()
            out = _differentiable_table_run(data.denoiser, (t0 + delta * mask).to(work), times, x_train[rows], data.cond, model_dtype,
                                            step=fd_step)
            loss = torch.mean((out - ref_train[rows]) ** 2)
            if not bool(torch.isfinite(loss)):
                break
            loss.backward()
            data.evaluations += len(rows) * n * (2 if times.trainable else 1)  # with the forward differences
            opt.step()
            decay.step()
            if times.trainable:
                times.project()
            train_rmse = float(loss.detach().sqrt())
            if it % 10 == 0 or it == iterations:
                cand, when = (t0 + delta.detach() * mask).tolist(), times.values()
                v = data.error(table_program(sched, when, end, cand), val)
                if v < best[0]:
                    best, since_best = (v, cand, when, it), 0
                else:
                    since_best += 1
                say(f"coefficients: {it}/{iterations} updates, validation RMSE {v:.4g}", min(it / iterations, 0.99))
                if since_best >= patience:
                    break
    stage = {"stage": "coefficients+times" if times.trainable else "coefficients", "train_rmse": train_rmse,
             "val_rmse": best[0], "iterations": it, "best_iteration": best[3], "batch_size": batch,
             "accepted": best[1] is not None}
    if times.trainable:
        stage["eval_times"] = best[2]
    return best[1], best[2], stage
