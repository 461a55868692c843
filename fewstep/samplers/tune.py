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
   the network, with early stopping on the validation error: a per-step compensation in the spirit
   of DC-Solver (Zhao et al. 2024) extended to the whole table.

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
from fewstep.samplers.core import NoiseSource, Program, prepare, run_program
from fewstep.samplers.plan import SamplingPlan, probe_table, table_program
from fewstep.samplers.registry import spec as sampler_spec
from fewstep.schedules import NoiseSchedule

__all__ = ["tune", "INGREDIENTS"]

INGREDIENTS = ("grid", "orders", "coefficients")


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


def _differentiable_table_run(
    denoiser: Callable, table: torch.Tensor, times: Sequence[float], x_T: torch.Tensor, cond: Mapping[str, Any] | None, model_dtype: torch.dtype
) -> torch.Tensor:
    """The coefficient table's result, with gradients to ``table`` through the network."""
    ds: list[torch.Tensor] = []
    x = x_T
    for i, t in enumerate(times):
        ds.append(denoiser(x.to(model_dtype), time_tensor(t, x.device), **dict(cond or {})).to(x_T.dtype))
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
    num_trajectories: int = 128,
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
    validation_fraction: float = 0.25,
    grid_evaluations: int | None = None,
    coefficient_iterations: int = 200,
    learning_rate: float = 1.5e-3,
    progress: Callable[[str], None] | None = None,
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
        ingredients: the stages to run, a subset of ``("grid", "orders", "coefficients")``.
        options: options of the base sampler.
        reference_sampler, reference_nfe: the model's own many-step solution that every stage is
            fitted to (default NFE ``max(200, 20 nfe)``); its own error (against half the NFE) is
            recorded in the plan.
        grid_evaluations: Nelder-Mead budget (default ``40 (steps - 1)`` evaluations of the plan).
        coefficient_iterations, learning_rate: Adam on the coefficient table.
        progress: called with a short message after each stage.

    Returns:
        The :class:`SamplingPlan`; ``plan.meta["stages"]`` lists each stage's errors.
    """
    t_begin = time.perf_counter()
    unknown = [i for i in ingredients if i not in INGREDIENTS]
    if unknown:
        raise ValueError(f"unknown tuning ingredient(s) {unknown}; choose from {', '.join(INGREDIENTS)}")
    s = sampler_spec(sampler)
    if s.stochastic or not s.push_style or s.needs or s.model_kind != "diffusion":
        raise ValueError(
            f"{sampler} cannot be tuned: tuning needs a deterministic diffusion sampler with fixed evaluation times "
            "(e.g. unipc_3, dpmpp_3m, deis_3, dpmpp_2m)"
        )
    if schedule is None:
        schedule = getattr(denoiser, "schedule", None)
        if schedule is None:
            raise ValueError("pass schedule=... (the denoiser has no .schedule attribute to take it from)")
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
    say = progress or (lambda msg: None)

    ref_nfe = int(reference_nfe) if reference_nfe is not None else max(200, 20 * nfe)
    with torch.no_grad():
        reference = fewstep.sample(denoiser, noise, reference_sampler, ref_nfe, schedule=schedule, cond=cond)
        half = fewstep.sample(denoiser, noise[val], reference_sampler, ref_nfe // 2, schedule=schedule, cond=cond)
    ref_error = _rmse(half, reference[val])
    data = _Trajectories(denoiser, schedule, noise, reference, cond)
    say(f"reference {reference_sampler} at {ref_nfe} NFE (its error vs {ref_nfe // 2} NFE: {ref_error:.2e})")

    base = prepare(sampler, nfe, schedule, **options)
    grid = base.grid.tolist()
    stages = [{"stage": "default", "train_rmse": data.error(base, train), "val_rmse": data.error(base, val), "accepted": True}]
    best_val, program = stages[0]["val_rmse"], base
    say(f"default grid: validation RMSE {best_val:.4g}")

    if "grid" in ingredients and len(grid) > 2:
        from scipy.optimize import minimize

        g0 = np.asarray(grid)
        fit_rows = slice(train.start, min(train.stop, train.start + 128))

        def objective(z: np.ndarray) -> float:
            try:
                return data.error(prepare(sampler, nfe, schedule, spacing=_warp(z, g0), **options), fit_rows)
            except ValueError:  # a degenerate grid (coinciding times)
                return math.inf

        budget = int(grid_evaluations) if grid_evaluations is not None else 40 * (len(g0) - 2)
        res = minimize(objective, np.zeros(len(g0) - 2), method="Nelder-Mead",
                       options={"maxfev": budget, "xatol": 1e-3, "fatol": 1e-7, "adaptive": True})
        candidate = prepare(sampler, nfe, schedule, spacing=_warp(res.x, g0), **options)
        stage = {"stage": "grid", "train_rmse": data.error(candidate, train), "val_rmse": data.error(candidate, val),
                 "evaluations": int(res.nfev), "grid": candidate.grid.tolist()}
        stage["accepted"] = stage["val_rmse"] < best_val
        if stage["accepted"]:
            best_val, program, grid = stage["val_rmse"], candidate, candidate.grid.tolist()
        stages.append(stage)
        say(f"grid: validation RMSE {stage['val_rmse']:.4g} ({'kept' if stage['accepted'] else 'dropped'})")

    if "orders" in ingredients and "orders" in s.options and program.orders is not None:
        orders = list(program.orders)
        current = data.error(program, train)
        for _ in range(2):  # coordinate descent passes
            changed = False
            for i in range(len(orders)):
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
        stages.append(stage)
        say(f"orders {orders}: validation RMSE {stage['val_rmse']:.4g} ({'kept' if stage['accepted'] else 'dropped'})")

    table = None
    if "coefficients" in ingredients:
        table, stage = _fit_table(data, program, train, val, coefficient_iterations, learning_rate, best_val)
        stages.append(stage)
        if stage["accepted"]:
            best_val = stage["val_rmse"]
        else:
            table = None
        say(f"coefficients: validation RMSE {stage['val_rmse']:.4g} ({'kept' if stage['accepted'] else 'dropped'})")

    meta = {
        "tuned_by": "fewstep.samplers.tune",
        "fewstep_version": fewstep.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "base_sampler": sampler,
        "ingredients": list(ingredients),
        "num_trajectories": int(noise.shape[0]),
        "num_validation": n_val,
        "reference": {"sampler": reference_sampler, "nfe": ref_nfe, "self_rmse": ref_error},
        "stages": stages,
        "validation_rmse": best_val,
        "network_evaluations": data.evaluations,
        "seconds": time.perf_counter() - t_begin,
    }
    return SamplingPlan(sampler, nfe, grid, options, schedule.config(), list(program.eval_times), table, meta)


def _fit_table(
    data: _Trajectories, program: Program, train: slice, val: slice, iterations: int, lr: float, best_val: float
) -> tuple[list[list[float]] | None, dict[str, Any]]:
    """Adam on the coefficient table through the network; the best validation iterate."""
    t0 = torch.tensor(probe_table(program), dtype=torch.float64)
    n = program.nfe
    mask = torch.tril(torch.ones(n + 1, n + 1, dtype=torch.float64), diagonal=0)
    mask[:, 0] = 1.0
    mask[0] = 0.0  # x_0 = x_T is fixed
    times = list(program.eval_times)
    sched = program.schedule
    x_train = data.noise[train].to(torch.promote_types(data.noise.dtype, torch.float32)) * sched.noise_scale(times[0])
    ref_train = data.reference[train].to(x_train.dtype)
    model_dtype = data.noise.dtype
    delta = torch.zeros_like(t0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    best = (best_val, None, -1)
    train_rmse = math.nan
    with _FrozenParameters(data.denoiser), torch.enable_grad():
        for it in range(int(iterations)):
            opt.zero_grad()
            table = (t0 + delta * mask).to(x_train.dtype)
            out = _differentiable_table_run(data.denoiser, table, times, x_train, data.cond, model_dtype)
            loss = torch.mean((out - ref_train) ** 2)
            if not bool(torch.isfinite(loss)):
                break
            loss.backward()
            opt.step()
            train_rmse = float(loss.detach().sqrt())
            if it % 10 == 9 or it == iterations - 1:
                cand = (t0 + delta.detach() * mask).tolist()
                v = data.error(table_program(sched, times, float(program.grid[-1]), cand), val)
                if v < best[0]:
                    best = (v, cand, it + 1)
    stage = {"stage": "coefficients", "train_rmse": train_rmse, "val_rmse": best[0], "iterations": int(iterations),
             "best_iteration": best[2], "accepted": best[1] is not None}
    return best[1], stage
