"""Sampling plans: a tuned way to sample one model with a fixed NFE budget, as plain data.

A :class:`SamplingPlan` records a *base* registered sampler with its time grid and options (for
example a tuned grid and per-step solver orders), and optionally a full *coefficient table* that
replaces the base sampler's update rule.  Plans are written by :func:`fewstep.samplers.tune`,
saved to and loaded from JSON, and run by ``fewstep.sample(denoiser, noise, plan=plan)`` and by
``FewstepScheduler(plan=plan.to_dict())``.

Coefficient tables.  Every deterministic sampler that evaluates the network at fixed times and
combines the results linearly (DDIM, DPM-Solver++ single- and multistep, DEIS, UniPC with its
corrector, DC-Solver, GHVB, ...) produces states that are linear in the starting noise ``x_T``
and the data predictions so far:

    x_i = T[i][0] x_T + sum_{j < i} T[i][1 + j] D_j,      i = 1 .. nfe   (x_nfe is the result),

where ``D_j = D(x_j, t_j)``.  :func:`probe_table` reads ``T`` off any such program exactly, by
running its routine on coefficient vectors instead of images.  Tuning the table from the model's own trajectories generalises the compensation ideas of
DC-Solver (Zhao et al. 2024) and of learned solver coefficients (e.g. Frankel et al. 2025, "S4S:
Solving for a Diffusion Model Solver") to every coefficient of every step.  :func:`table_program`
runs a table.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewstep._util import atomic_write_json
from fewstep.samplers._expint import combine
from fewstep.samplers.core import Eval, NoiseSource, Program, Routine, Setup, prepare
from fewstep.samplers.registry import SamplerSpec
from fewstep.schedules import NoiseSchedule, from_config

__all__ = ["SamplingPlan", "probe_table", "table_program", "PLAN_FORMAT"]

PLAN_FORMAT = "fewstep-plan/1"


def probe_table(program: Program) -> list[list[float]]:
    """The coefficient table ``T`` (``nfe + 1`` rows of ``nfe + 1`` floats) of a deterministic
    program with fixed evaluation times.

    The routine is run on vectors of coefficients over ``[x_T, D_0, ..., D_{nfe-1}]``: the
    starting state is the unit vector of ``x_T``, and evaluation ``j`` answers with the unit vector
    of ``D_j``.  Because every operation of such a routine is a linear combination of those
    quantities, the states it produces are exactly their coefficient vectors."""
    if program.eval_times is None:
        raise ValueError(f"{program.spec.name} chooses its evaluation times while sampling; it has no fixed coefficient table")
    if program.stochastic:
        raise ValueError(f"{program.spec.name} draws fresh noise; only deterministic samplers have a coefficient table")
    if program.x0_transform is not None:
        raise ValueError("clipping or thresholding the data prediction is not linear; tune without it")
    if program.spec.needs:
        raise ValueError(f"{program.spec.name} needs {', '.join(program.spec.needs)} from the driver; it has no plain table")
    n = program.nfe
    unit = torch.eye(n + 1, dtype=torch.float64)
    routine = program.routine(unit[0].clone(), NoiseSource())
    rows = [unit[0].tolist()]
    req = next(routine)
    for j in range(n):
        try:
            req = routine.send((req.x, unit[1 + j].clone()))
        except StopIteration as stop:
            if j != n - 1:
                raise RuntimeError(f"internal error: {program.spec.name} finished after {j + 1} of {n} evaluations") from None
            rows.append(stop.value.tolist())
            break
        rows.append(req.x.tolist())
    else:
        raise RuntimeError(f"internal error: {program.spec.name} asked for more than {n} evaluations")
    return rows


def _check_table(table: Any, nfe: int) -> list[list[float]]:
    if isinstance(table, torch.Tensor):
        table = table.tolist()
    if not isinstance(table, Sequence) or isinstance(table, str) or len(table) != nfe + 1:
        raise ValueError(f"a coefficient table for nfe={nfe} has {nfe + 1} rows of {nfe + 1} numbers")
    rows = []
    for i, row in enumerate(table):
        r = _numbers(row, f"row {i} of the coefficient table")
        if len(r) != nfe + 1:
            raise ValueError(f"row {i} of the coefficient table has {len(r)} numbers, expected {nfe + 1}")
        if any(v != 0.0 for v in r[1 + i :]) and i < nfe:
            raise ValueError(f"row {i} of the coefficient table uses predictions not made yet (D_{i} or later)")
        if not all(math.isfinite(v) for v in r):
            raise ValueError(f"row {i} of the coefficient table is not finite")
        rows.append(r)
    if rows[0] != [1.0] + [0.0] * nfe:
        raise ValueError("row 0 of the coefficient table must be x_T itself: [1, 0, ..., 0]")
    return rows


def _numbers(values: Any, what: str) -> list[float]:
    """``values`` as a list of floats; anything but a list of real numbers (strings, booleans,
    nested lists: what a hand-edited or foreign JSON file may hold) is a ``ValueError``."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise ValueError(f"{what} must be a list of numbers, got {type(values).__name__}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
        raise ValueError(f"{what} must be a list of numbers, found {bad[0]!r}")
    return [float(v) for v in values]


def table_routine(times: Sequence[float], table: Sequence[Sequence[float]]):
    """The routine of a coefficient table: evaluation ``i`` at ``times[i]``, then
    ``x_{i+1} = T[i+1][0] x_T + sum_{j <= i} T[i+1][1 + j] D_j``."""

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        x_T, ds = x, []
        for i, t in enumerate(times):
            _, d = yield Eval(x, t)
            ds.append(d)
            row = table[i + 1]
            x = combine(x_T, row[0], list(zip(row[1 : i + 2], ds)))
        return x

    return routine


def _build_table_program(setup: Setup) -> Program:
    """Evaluation times from ``setup.spacing`` (``nfe`` times, then the end time): non-increasing,
    as a sampler may evaluate twice at one time (Heun's second stage is the next step's first)."""
    table = _check_table(setup.options["table"], setup.nfe)
    grid = torch.as_tensor(setup.spacing, dtype=torch.float64).flatten()
    if len(grid) != setup.nfe + 1 or not bool(torch.all(grid[1:] <= grid[:-1])):
        raise ValueError(f"a plan needs {setup.nfe} non-increasing evaluation times and an end time, got {grid.tolist()}")
    for t in (float(grid[0]), float(grid[-1])):
        setup.schedule.check_time(t, "plan time")
    times = grid[:-1].tolist()
    return setup.program(grid, times, table_routine(times, table))


# Plans are not a registry entry (a table is meaningless without the model it was tuned on); this
# spec only names them in programs and error messages.
PLAN_SPEC = SamplerSpec(
    name="plan",
    family="plan",
    order=0,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper="fewstep sampling plans (fewstep.samplers.plan)",
    summary="a tuned coefficient table on the grid of its evaluation times",
    build=_build_table_program,
    options={"table": None},
)


def table_program(schedule: NoiseSchedule, eval_times: Sequence[float], end_time: float, table: Sequence[Sequence[float]]) -> Program:
    """The program that runs coefficient table ``table`` with evaluations at ``eval_times``."""
    nfe = len(eval_times)
    setup = Setup(PLAN_SPEC, schedule, nfe, {"table": table}, spacing=[*eval_times, end_time])
    return _build_table_program(setup)


@dataclass
class SamplingPlan:
    """A base sampler on a tuned grid with tuned options, optionally with a tuned coefficient
    table; plain data (``to_dict`` / ``from_dict``, ``save`` / ``load``).

    Attributes:
        sampler: the registered base sampler.
        nfe: network evaluations.
        grid: the base sampler's step grid (``steps + 1`` schedule times).
        options: the base sampler's options (e.g. per-step ``orders``).
        schedule: ``schedule.config()`` of the model's schedule; a plan only runs on it.
        eval_times: the schedule times of the ``nfe`` evaluations.
        table: the coefficient table, or ``None`` to run the base sampler as it is.
        meta: how the plan was made (tuning stages and their errors, trajectories, seeds, ...).
    """

    sampler: str
    nfe: int
    grid: list[float]
    options: dict[str, Any]
    schedule: dict[str, Any]
    eval_times: list[float]
    table: list[list[float]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fewstep.samplers.registry import spec

        if not isinstance(self.sampler, str):
            raise ValueError(f"sampler must name a registered sampler, got {self.sampler!r}")
        spec(self.sampler)  # an unknown name lists the close ones
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be a positive integer, got {self.nfe!r}")
        self.grid = _numbers(self.grid, "grid")
        if len(self.grid) < 2 or not all(math.isfinite(t) for t in self.grid):
            raise ValueError(f"grid must hold at least two finite times, got {self.grid}")
        self.eval_times = _numbers(self.eval_times, "eval_times")
        if not all(math.isfinite(t) for t in self.eval_times):
            raise ValueError(f"eval_times must be finite, got {self.eval_times}")
        if len(self.eval_times) != self.nfe:
            raise ValueError(f"a plan for nfe={self.nfe} has {self.nfe} evaluation times, got {len(self.eval_times)}")
        for name in ("options", "schedule", "meta"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a JSON object (a dict with string keys), got {type(value).__name__}")
            setattr(self, name, dict(value))
        try:
            from_config(self.schedule)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"schedule is not a fewstep schedule config ({type(err).__name__}: {err})") from None
        if self.table is not None:
            self.table = _check_table(self.table, self.nfe)

    # -- running ------------------------------------------------------------------------------
    def check_schedule(self, schedule: NoiseSchedule) -> None:
        if schedule.config() != self.schedule:
            raise ValueError(
                f"this plan was tuned for the schedule {from_config(self.schedule)!r}, not {schedule!r}; "
                "tune a plan for this model (fewstep tune)"
            )

    def program(self, schedule: NoiseSchedule | None = None) -> Program:
        """The program that runs the plan (on ``schedule``, which must be the plan's own)."""
        sched = from_config(self.schedule) if schedule is None else schedule
        self.check_schedule(sched)
        if self.table is None:
            return prepare(self.sampler, self.nfe, sched, spacing=self.grid, **self.options)
        return table_program(sched, self.eval_times, self.grid[-1], self.table)

    # -- plain data ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SamplingPlan":
        """A plan from its plain data; every field is checked (types, lengths, finite numbers, a
        registered sampler, a schedule config), so a malformed plan fails here with what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"not a fewstep sampling plan (a JSON object with format {PLAN_FORMAT!r}), got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"not a fewstep sampling plan (format {fmt!r}, expected {PLAN_FORMAT!r})")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"malformed sampling plan: {err}") from None
        except ValueError as err:
            raise ValueError(f"malformed sampling plan: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically: a uniquely named temporary file in the target's
        folder, then a rename (:func:`fewstep._util.atomic_write_bytes`), so concurrent saves
        never leave a partial file.  The target must be absent or a regular file."""
        return atomic_write_json(path, self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SamplingPlan":
        """Read a plan written by :meth:`save` (plain JSON: nothing in it is executed or
        unpickled); a file that is not a valid plan is a ``ValueError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no sampling plan at {path}; write one with `fewstep tune --out {path}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is not a sampling plan (not valid JSON: {err}); write one with `fewstep tune --out {path}`") from None
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}; write a new plan with `fewstep tune --out {path}`") from None

    def __repr__(self) -> str:
        parts = [f"sampler={self.sampler!r}", f"nfe={self.nfe}"]
        if self.options:
            parts.append(f"options={self.options}")
        parts.append("table=tuned" if self.table is not None else "table=None")
        return f"SamplingPlan({', '.join(parts)})"
