"""Error per NFE on an exact model: every sampler against the exact probability-flow ODE.

On a Gaussian mixture the denoiser is known in closed form, so a sampler's error against the
exact ODE solution from the same starting noise is pure discretisation error (DESIGN.md, "The
exact testbed").  Two numbers per (sampler, NFE):

* ``rmse``: root-mean-square difference to the exact ODE solution, over all samples and
  dimensions (for stochastic samplers this mixes in their noise; read their Fréchet distance);
* ``fd``: Fréchet distance between the samples and the exact-ODE samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

import fewstep
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.models.mixture import GaussianMixture
from fewstep.samplers.core import NonFiniteError, prepare
from fewstep.schedules import NoiseSchedule, VPDiscrete, diffusers_betas

__all__ = ["ExactRow", "ExactStudy", "exact_error_table", "default_exact_samplers", "default_schedule", "DEFAULT_NFES"]

DEFAULT_NFES = (4, 5, 6, 8, 10, 15, 20, 50)


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


@dataclass
class ExactStudy:
    """The inputs of a study, made once: model, schedule, noise and the exact reference."""

    model: GaussianMixture
    schedule: NoiseSchedule
    noise: torch.Tensor
    reference: torch.Tensor  # exact ODE solution from each noise, float64
    fd_floor: float  # Fréchet distance of the reference to an independent exact data sample

    @classmethod
    def make(
        cls,
        model: GaussianMixture | None = None,
        schedule: NoiseSchedule | None = None,
        num_samples: int = 1000,
        seed: int = 0,
    ) -> "ExactStudy":
        model = model if model is not None else GaussianMixture.digits()
        schedule = schedule if schedule is not None else default_schedule()
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(num_samples, model.dim, generator=g, dtype=torch.float64)
        x_t = noise * schedule.noise_scale(schedule.t_max)
        reference = model.ode_solve(x_t, schedule, schedule.t_max, schedule.t_zero)
        data = model.sample(num_samples, generator=g)
        return cls(model, schedule, noise, reference, frechet_distance_from_features(reference, data))

    def evaluate(self, sampler: str, nfe: int, generator_seed: int = 1, **options) -> ExactRow:
        """One row: the sampler's error against the exact ODE solution at this budget.

        A budget or option set the sampler cannot run with (a ``ValueError`` from
        :func:`fewstep.samplers.prepare`) is recorded in ``error`` with NaN numbers; a run whose
        denoiser output or samples go non-finite is recorded with infinite numbers and
        ``error`` starting with ``"non-finite"``.  Any other error propagates."""
        try:
            program = prepare(sampler, nfe, self.schedule, **options)
        except ValueError as err:  # an impossible budget for this sampler: recorded, not fatal
            return ExactRow(sampler, nfe, math.nan, math.nan, fewstep.spec(sampler).stochastic, 0.0, str(err))
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
            return ExactRow(sampler, nfe, math.inf, math.inf, program.stochastic, time.perf_counter() - t0, f"non-finite: {err}")
        seconds = time.perf_counter() - t0
        out = out.to(torch.float64)
        if not bool(torch.isfinite(out).all()):
            return ExactRow(sampler, nfe, math.inf, math.inf, info.stochastic, seconds, "non-finite samples")
        rmse = float(torch.sqrt(torch.mean((out - self.reference) ** 2)))
        fd = frechet_distance_from_features(out, self.reference)
        return ExactRow(sampler, nfe, rmse, fd, info.stochastic, seconds)


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
    """Rows for every (sampler, NFE); samplers default to :func:`default_exact_samplers`."""
    study = study or ExactStudy.make(**study_kwargs)
    names = list(samplers) if samplers is not None else default_exact_samplers()
    rows = []
    for name in names:
        for nfe in nfes:
            rows.append(study.evaluate(name, nfe))
            if progress is not None:
                progress(f"{name} nfe={nfe}")
    return rows, study


def rows_as_dicts(rows: Sequence[ExactRow]) -> list[dict]:
    return [asdict(r) for r in rows]
