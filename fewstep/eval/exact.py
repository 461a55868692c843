"""Error per NFE on an exact model: every sampler against the exact probability-flow ODE.

On a Gaussian mixture the denoiser is known in closed form, so a sampler's error against the
exact ODE solution from the same starting noise is pure discretisation error (DESIGN.md, "The
exact testbed").  Two numbers per (sampler, NFE):

* ``rmse``: root-mean-square difference to the exact ODE solution, over all samples and
  dimensions (for stochastic samplers this mixes in their noise; read their Fréchet distance);
* ``fd``: Fréchet distance between the samples and the exact-ODE samples.

Both come with a bootstrap standard error and 95 % interval over the sample indices, and each NFE
column with paired differences to its best cell (the same noise for every sampler, so one set of
resamples serves every cell: :mod:`fewstep.eval.uncertainty`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

import fewstep

from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.eval.uncertainty import Comparison, bootstrap_counts, compare, fd_replicates, interval, resampled_moments
from fewstep.models.mixture import GaussianMixture
from fewstep.samplers.core import NonFiniteError, prepare
from fewstep.schedules import NoiseSchedule, VPDiscrete, diffusers_betas

__all__ = ["ExactRow", "ExactStudy", "exact_error_table", "exact_error_study", "default_exact_samplers", "default_schedule", "DEFAULT_NFES"]

DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20, 50)
#: Bootstrap resamples of the exact study: 100 (standard errors to about 7 %), half the FID study's,
#: since it has seven times as many cells (every sampler) and its errors are far apart.
EXACT_REPLICATES = 100


def default_schedule() -> NoiseSchedule:
    """DDPM's linear schedule, 1000 steps (Ho et al. 2020): the schedule of the embedded models."""
    return VPDiscrete.from_betas(diffusers_betas(1000, 1e-4, 0.02, "linear"))


@dataclass
class ExactRow:
    """One (sampler, NFE) cell: ``stochastic`` says whether this run drew fresh noise (from the
    program, so ``ddim`` with ``eta > 0`` is stochastic); ``error`` why a cell has no numbers."""

    sampler: str
    nfe: int
    rmse: float
    fd: float
    stochastic: bool
    seconds: float
    error: str = ""
    rmse_se: float = math.nan
    rmse_lo: float = math.nan
    rmse_hi: float = math.nan
    fd_se: float = math.nan
    fd_lo: float = math.nan
    fd_hi: float = math.nan


@dataclass
class ExactStudy:
    """The inputs of a study, made once: model, schedule, noise and the exact reference."""

    model: GaussianMixture
    schedule: NoiseSchedule
    noise: torch.Tensor
    reference: torch.Tensor  # exact ODE solution from each noise, float64
    fd_floor: float  # Fréchet distance of the reference to an independent exact data sample
    bootstrap: int = EXACT_REPLICATES  # resamples behind the intervals (0: none)
    seed: int = 0

    @classmethod
    def make(
        cls,
        model: GaussianMixture | None = None,
        schedule: NoiseSchedule | None = None,
        num_samples: int = 1000,
        seed: int = 0,
        bootstrap: int = EXACT_REPLICATES,
    ) -> "ExactStudy":
        model = model if model is not None else GaussianMixture.digits()
        schedule = schedule if schedule is not None else default_schedule()
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(num_samples, model.dim, generator=g, dtype=torch.float64)
        x_t = noise * schedule.noise_scale(schedule.t_max)
        reference = model.ode_solve(x_t, schedule, schedule.t_max, schedule.t_zero)
        data = model.sample(num_samples, generator=g)
        return cls(model, schedule, noise, reference, frechet_distance_from_features(reference, data), int(bootstrap), int(seed))

    def evaluate(self, sampler: str, nfe: int, generator_seed: int = 1, **options) -> ExactRow:
        """One row: the sampler's error against the exact ODE solution at this budget.

        A budget or option set the sampler cannot run with (a ``ValueError`` from
        :func:`fewstep.samplers.prepare`) is recorded in ``error`` with NaN numbers; a run whose
        denoiser output or samples go non-finite is recorded with infinite numbers and
        ``error`` starting with ``"non-finite"``.  Any other error propagates."""
        return self.evaluate_with_replicates(sampler, nfe, generator_seed, **options)[0]

    def _resamples(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """The study's bootstrap counts and the exact-ODE samples' resampled moments, made once."""
        if getattr(self, "_cache", None) is None:
            counts = bootstrap_counts(self.noise.shape[0], self.bootstrap, self.seed)
            ref = self.reference.numpy()
            moments = resampled_moments(ref, counts) if ref.shape[0] >= ref.shape[1] else None
            self._cache = (counts, moments)
        return self._cache

    def evaluate_with_replicates(self, sampler: str, nfe: int, generator_seed: int = 1,
                                 **options) -> tuple[ExactRow, dict[str, np.ndarray]]:
        """:meth:`evaluate`, and the bootstrap replicates of ``rmse`` and ``fd`` (empty without
        numbers or without resamples), for paired comparisons between cells."""
        try:
            program = prepare(sampler, nfe, self.schedule, **options)
        except ValueError as err:  # an impossible budget for this sampler: recorded, not fatal
            return ExactRow(sampler, nfe, math.nan, math.nan, fewstep.spec(sampler).stochastic, 0.0, str(err)), {}
        t0 = time.perf_counter()
        try:
            out, info = fewstep.sample(
                self.model.denoiser(self.schedule),
                self.noise,
                sampler,
                nfe,
                schedule=self.schedule,
                generator=torch.Generator().manual_seed(generator_seed),
                return_info=True,
                **options,
            )
        except NonFiniteError as err:
            return ExactRow(sampler, nfe, math.inf, math.inf, program.stochastic, time.perf_counter() - t0, f"non-finite: {err}"), {}
        seconds = time.perf_counter() - t0
        out = out.to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            return ExactRow(sampler, nfe, math.inf, math.inf, info.stochastic, seconds, "non-finite samples"), {}
        sq = ((out - self.reference) ** 2).mean(dim=1).numpy()  # per-sample mean squared error
        rmse = float(np.sqrt(sq.mean()))
        fd = frechet_distance_from_features(out, self.reference)
        row = ExactRow(sampler, nfe, rmse, fd, info.stochastic, seconds)
        reps: dict[str, np.ndarray] = {}
        if self.bootstrap:
            counts, ref_moments = self._resamples()
            reps["rmse"] = np.sqrt(counts @ sq / len(sq))
            reps["fd"] = fd_replicates(out.numpy(), counts, paired_with=self.reference.numpy(), paired_moments=ref_moments)[1]
            for key, value in (("rmse", rmse), ("fd", fd)):
                iv = interval(value, reps[key])
                setattr(row, f"{key}_se", iv.se)
                setattr(row, f"{key}_lo", iv.lo)
                setattr(row, f"{key}_hi", iv.hi)
        return row, reps


def default_exact_samplers() -> list[str]:
    """Every registered diffusion sampler that runs on a plain denoiser ``D(x, t)``: samplers that
    need more from the driver (CFG++'s unconditional prediction) have nothing to show on the
    unguided mixture."""
    return [n for n in fewstep.available(model_kind="diffusion") if not fewstep.spec(n).needs]


def exact_error_table(
    samplers: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    study: ExactStudy | None = None,
    progress: Callable[[str], None] | None = None,
    **study_kwargs,
) -> tuple[list[ExactRow], ExactStudy]:
    """Rows for every (sampler, NFE); samplers default to :func:`default_exact_samplers`.
    :func:`exact_comparisons` gives the paired comparisons of the same study."""
    rows, _, study = exact_error_study(samplers, nfes, study, progress, **study_kwargs)
    return rows, study


def exact_error_study(
    samplers: Sequence[str] | None = None,
    nfes: Sequence[int] = DEFAULT_NFES,
    study: ExactStudy | None = None,
    progress: Callable[[str], None] | None = None,
    **study_kwargs,
) -> tuple[list[ExactRow], dict[str, dict[int, Comparison]], ExactStudy]:
    """Rows for every (sampler, NFE) and, per metric (``rmse``, ``fd``) and NFE, the paired
    comparison with the column's best cell (:func:`fewstep.eval.uncertainty.compare`)."""
    study = study or ExactStudy.make(**study_kwargs)
    names = list(samplers) if samplers is not None else default_exact_samplers()
    rows, reps = [], {}
    for name in names:
        for nfe in nfes:
            row, r = study.evaluate_with_replicates(name, nfe)
            rows.append(row)
            reps[(name, nfe)] = r
            if progress is not None:
                progress(f"{name} nfe={nfe}")
    comparisons: dict[str, dict[int, Comparison]] = {"rmse": {}, "fd": {}}
    for key in comparisons:
        for nfe in nfes:
            est = {r.sampler: getattr(r, key) for r in rows if r.nfe == nfe and key in reps[(r.sampler, nfe)]}
            comp = compare(est, {s: reps[(s, nfe)][key] for s in est}) if est else None
            if comp is not None:
                comparisons[key][nfe] = comp
    return rows, comparisons, study


def rows_as_dicts(rows: Sequence[ExactRow]) -> list[dict]:
    return [asdict(r) for r in rows]
