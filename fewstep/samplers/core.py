"""Sampler programs and the pull-style driver, :func:`sample`.

A sampler is written once, as a *routine*: a Python generator that yields :class:`Eval`
requests ("evaluate the denoiser at (x, t)") and receives ``(x, x0_hat)`` back, where ``x`` is
the state the evaluation was made at (the driver may hand back a state the caller changed, as
diffusers' inpainting pipelines do) and ``x0_hat`` the data prediction.  It returns the final
sample.  Everything a routine needs is precomputed by its family's *builder* into a
:class:`Program`: the time grid, per-step coefficients, and (for push-style use) the list of
evaluation times.  Two drivers run programs: :func:`sample` here (the loop calls the network)
and :class:`fewstep.FewstepScheduler` (diffusers' loop calls the network); both apply the same
data-prediction transform and produce the same tensors.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fewstep._util import close_matches
from fewstep.models.prediction import time_tensor
from fewstep.schedules import GridRule, NoiseSchedule, Spacing, default_spacing, is_explicit_grid, k_sigma, time_grid
from fewstep.samplers.registry import SamplerSpec, resolve, spec

__all__ = [
    "Eval", "Program", "Setup", "NoiseSource", "prepare", "sample", "run_program", "check_state", "steps_to_nfe",
    "NonFiniteError", "UnguidedWarning", "SampleInfo", "MAX_NFE",
]


MAX_NFE = 100_000  # the largest budget prepare() accepts: building 10**7 steps' coefficients takes hours


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or inf in the sampling: the denoiser's output, or (with a message saying so) the
    sampler's own state."""


class UnguidedWarning(UserWarning):
    """A CFG++ sampler ran with a denoiser that exposes no unconditional prediction."""


@dataclass(frozen=True)
class Eval:
    """A request to evaluate the denoiser at state ``x`` and schedule time ``t``.

    The reply is ``(x, x0_hat)``.  Optional extensions, used only by the samplers that need them
    (every other routine is unchanged):

    * ``t`` may be a (B,) float64 tensor: one time per sample (time-shifted samplers choose it from
      the state, sample by sample);
    * ``s``: the target time of a model that jumps along its trajectory (CTM's ``G(x, t, s)``).  It
      reaches denoisers that declare ``takes_target_time = True`` as the keyword ``s``; other
      denoisers are called as ``D(x, t)`` (a jump prediction that does not depend on ``s``);
    * ``uncond=True``: the reply is ``(x, x0_hat, x0_uncond)`` with the unconditional data
      prediction of a guided denoiser (CFG++), read from its ``last_uncond`` attribute.
    """

    x: torch.Tensor
    t: float | torch.Tensor
    s: float | None = None
    uncond: bool = False


Routine = Generator[Eval, "tuple[torch.Tensor, ...]", torch.Tensor]


class NoiseSource:
    """Gaussian noise for stochastic samplers, from one ``torch.Generator`` or one per sample
    (``generator=[g_0, ..., g_{B-1}]``: then sample ``b`` only ever draws from ``g_b``, so results
    do not depend on how samples are batched).

    Routines ask for noise with :meth:`interval`, naming the two points of the step the noise
    belongs to; this source ignores them (every draw is fresh), a Brownian source
    (:class:`fewstep.samplers.brownian.BrownianNoise`) returns the normalised Brownian increment
    over them.  :meth:`begin` is called by the pull driver before the first evaluation."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None = None):
        self.generator = generator

    def begin(self, program: "Program", x: torch.Tensor) -> None:
        """Called once before a run; sources that need the program (its grid) prepare here."""

    def interval(self, x: torch.Tensor, s: "Point", t: "Point") -> torch.Tensor:
        """Standard normal noise of ``x``'s shape for the step from ``s`` to ``t``."""
        return self.randn_like(x)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        g = self.generator
        if g is None or isinstance(g, torch.Generator):
            return torch.randn(x.shape, generator=g, dtype=x.dtype, device=g.device if g is not None else x.device).to(x.device)
        if len(g) != x.shape[0]:
            raise ValueError(f"got {len(g)} generators for a batch of {x.shape[0]} samples; pass one per sample")
        return torch.stack(
            [torch.randn(x.shape[1:], generator=gi, dtype=x.dtype, device=gi.device) for gi in g]
        ).to(x.device)


@dataclass(frozen=True)
class Point:
    """One time of a grid with its schedule values (Python floats, float64).

    ``ksigma`` is the noise level k-diffusion and ComfyUI call ``sigma`` for a model of this
    schedule (:func:`fewstep.schedules.k_sigma`): ``sigma / alpha`` for VP schedules, the time itself
    for EDM and flow matching.  Brownian noise sources key their path on it."""

    t: float
    alpha: float
    sigma: float
    lam: float  # half log-SNR, +inf at clean data, -inf at zero SNR
    ksigma: float = math.nan


def points(schedule: NoiseSchedule, times: Sequence[float] | torch.Tensor) -> list[Point]:
    """Schedule values at ``times``, computed in one vectorised float64 evaluation."""
    t = torch.as_tensor(times, dtype=torch.float64).flatten()
    la, ls = schedule.log_alpha_sigma(t)
    lam = la - ls  # +inf at clean data, -inf at zero SNR
    ks = k_sigma(schedule, t)
    return [
        Point(ti, math.exp(a), math.exp(s), li, ki)
        for ti, a, s, li, ki in zip(t.tolist(), la.tolist(), ls.tolist(), lam.tolist(), ks.tolist())
    ]


@dataclass
class Setup:
    """Everything a builder needs to prepare a program."""

    spec: SamplerSpec
    schedule: NoiseSchedule
    nfe: int
    options: dict[str, Any]
    spacing: Spacing | None = None
    end: str = "zero"
    t_start: float | None = None
    steps_offset: int = 0

    def grid(self, num_steps: int) -> torch.Tensor:
        """The step grid: the caller's spacing, or the schedule family's default."""
        if num_steps < 1:
            raise ValueError(f"{self.spec.name} cannot run with nfe={self.nfe}: minimum is {self.spec.min_nfe}")
        sp = self.spacing if self.spacing is not None else default_spacing(self.schedule)
        return time_grid(self.schedule, num_steps, sp, end=self.end, t_start=self.t_start, steps_offset=self.steps_offset)

    def points(self, times: Sequence[float] | torch.Tensor) -> list[Point]:
        return points(self.schedule, times)

    @property
    def explicit_grid(self) -> torch.Tensor | None:
        """The caller's grid when ``spacing`` is a list of times (it fixes the steps), else ``None``
        (a spacing name, a ``{"name": ...}`` mapping or a :class:`~fewstep.schedules.GridRule`
        lets the budget choose them)."""
        if self.spacing is None or not is_explicit_grid(self.spacing):
            return None
        return torch.as_tensor(self.spacing, dtype=torch.float64).flatten()

    def ends_on_data(self) -> bool:
        """Whether the grid will finish on clean data (``sigma = 0``)."""
        if isinstance(self.spacing, GridRule):
            last = self.spacing.end_time
        elif self.explicit_grid is not None:
            last = float(self.explicit_grid[-1])
        else:
            last = self.schedule.t_zero if self.end == "zero" else self.schedule.t_min
        return self.schedule.sigma(last) == 0.0

    def program(
        self,
        grid: torch.Tensor,
        eval_times: list[float] | None,
        routine: Callable[[torch.Tensor, "NoiseSource"], "Routine"],
        stochastic: bool = False,
        orders: list[int] | None = None,
        step_evals: list[int] | None = None,
    ) -> "Program":
        return Program(
            self.spec, self.schedule, self.nfe, grid, eval_times, routine, dict(self.options), stochastic,
            orders=orders, step_evals=step_evals,
        )


@dataclass
class Program:
    """A sampler prepared for one schedule, budget, grid and option set.

    ``eval_times`` are the times of the ``nfe`` evaluations in order, or ``None`` when the
    routine chooses them while sampling (then diffusers' push loop cannot drive it)."""

    spec: SamplerSpec
    schedule: NoiseSchedule
    nfe: int
    grid: torch.Tensor
    eval_times: list[float] | None
    routine: Callable[[torch.Tensor, NoiseSource], Routine]
    options: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    orders: list[int] | None = None  # per-step solver orders, for samplers with an ``orders`` option
    # evaluations of each grid step, for samplers with more than one per step (None: one each)
    step_evals: list[int] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.grid) - 1

    def evals_per_grid_step(self) -> list[int]:
        """How many of the program's evaluations each grid step makes (k-diffusion's callback
        reports the first evaluation of every step)."""
        if self.step_evals is not None:
            return list(self.step_evals)
        if self.nfe != self.num_steps:
            raise ValueError(f"{self.spec.name} does not say how its {self.nfe} evaluations fall on its {self.num_steps} steps")
        return [1] * self.nfe

    @property
    def start_time(self) -> float:
        return float(self.grid[0])

    @functools.cached_property
    def eval_points(self) -> list[Point]:
        """Schedule values at the planned evaluation times (push-style drivers convert with them)."""
        if self.eval_times is None:
            raise ValueError(f"{self.spec.name} chooses its evaluation times while sampling")
        return points(self.schedule, self.eval_times)

    def initial_state(self, noise: torch.Tensor) -> torch.Tensor:
        """``x_T`` from standard normal noise: ``noise * schedule.noise_scale(t_start)``."""
        return noise * self.schedule.noise_scale(self.start_time)


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, ``s`` is the
    ``ratio`` quantile of ``|x0|`` clamped to ``[1, max_value]``; ``x0`` is clamped to ``[-s, s]``
    and divided by ``s``."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def _real(value: Any, name: str) -> float:
    """``value`` as a finite float, or a TypeError / ValueError naming the option."""
    import numpy as np

    number = isinstance(value, (int, float, np.integer, np.floating)) or (isinstance(value, torch.Tensor) and value.ndim == 0)
    if isinstance(value, bool) or not number:
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def nonnegative_options(setup: "Setup", *names: str) -> list[float]:
    """The named options of ``setup`` as floats, each checked to be a finite number >= 0 (``eta``,
    ``s_noise``, ``s_churn``, ...); a bad value is an error naming the sampler and the option."""
    out = []
    for k in names:
        v = setup.options[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{setup.spec.name}: {k} must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    return out


def _x0_transform(options: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    clip, thr = options.get("clip_denoised"), options.get("thresholding")
    if not isinstance(thr, bool):
        raise TypeError(f"thresholding must be True or False, got {thr!r}")
    if clip is not None and thr:
        raise ValueError("use either clip_denoised or thresholding, not both")
    if thr:
        ratio = _real(options["dynamic_thresholding_ratio"], "dynamic_thresholding_ratio")
        max_value = _real(options["sample_max_value"], "sample_max_value")
        if not 0 < ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
        if max_value < 1:
            raise ValueError(
                f"sample_max_value must be at least 1, got {max_value}: dynamic thresholding clamps the per-sample "
                "quantile s to [1, sample_max_value], so a smaller value would replace it by a fixed clip"
            )
        return lambda x0: dynamic_threshold(x0, ratio, max_value)
    if clip is not None:
        c = _real(clip, "clip_denoised")
        if c <= 0:
            raise ValueError(f"clip_denoised must be positive, got {clip}")
        return lambda x0: x0.clamp(-c, c)
    return None


def _check_nfe(nfe: Any, s: SamplerSpec) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        import numpy as np

        if isinstance(nfe, np.integer):
            return _check_nfe(int(nfe), s)
        raise TypeError(f"nfe must be an int (the number of network evaluations), got {nfe!r}")
    if nfe < s.min_nfe:
        raise ValueError(f"{s.name} needs at least nfe={s.min_nfe} network evaluations, got nfe={nfe}")
    if nfe > MAX_NFE:
        raise ValueError(
            f"nfe={nfe} is more than fewstep plans in one run (at most {MAX_NFE}: every coefficient is precomputed); "
            "an exact reference needs far fewer with a high-order solver (e.g. dpmpp_3m at 500-2000)"
        )
    return nfe


def validate_options(s: SamplerSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler's options with defaults filled in; a name it does not take is a TypeError
    that lists the options it does take."""
    accepted = s.all_options()
    unknown = [k for k in options if k not in accepted]
    if unknown:
        k = unknown[0]
        raise TypeError(
            f"{s.name} has no option {k!r}{close_matches(k, accepted)}; its options are: "
            f"{', '.join(sorted(accepted)) or '(none)'} (network inputs go in cond={{...}})"
        )
    for k, v in options.items():  # NaN is never a meaningful option value; refuse it before it reaches the state
        if isinstance(v, float) and math.isnan(v) or isinstance(v, torch.Tensor) and v.is_floating_point() and bool(torch.isnan(v).any()):
            raise ValueError(f"{s.name}: option {k}={v!r} is NaN; give a number")
    return {**accepted, **options}


def _check_steps(steps: Any) -> int:
    import numpy as np

    if isinstance(steps, np.integer):
        steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int (the number of solver steps, k-diffusion's len(sigmas) - 1), got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return steps


def _resolved(sampler: str, spacing: Spacing | None, options: Mapping[str, Any]) -> tuple[SamplerSpec, Spacing | None, dict[str, Any]]:
    """The registered spec behind ``sampler`` (an alias or a ``<sampler>_<spacing>`` name such as
    ``dpmpp_2m_karras``), the spacing to use and the options with the alias's presets."""
    s, presets, named_spacing = resolve(sampler)
    if named_spacing is not None and spacing is not None and not (isinstance(spacing, str) and spacing == named_spacing):
        raise ValueError(
            f"sampler name {sampler!r} already names the spacing {named_spacing!r}; do not pass spacing={spacing!r} "
            f"too (use sampler={s.name!r} with spacing=... instead)"
        )
    return s, spacing if spacing is not None else named_spacing, {**presets, **options}


def steps_to_nfe(
    sampler: str,
    steps: int,
    schedule: NoiseSchedule,
    *,
    spacing: Spacing | None = None,
    end: str = "zero",
) -> int:
    """The NFE budget of ``steps`` solver steps the k-diffusion / ComfyUI way (``steps`` is
    ``len(sigmas) - 1``): ``evals_per_step`` evaluations per step, except that a step onto clean
    data costs ``final_step_evals`` (k-diffusion's Heun, DPM-2, DPM++ 2S/SDE end with one Euler
    step).  So 10 Heun steps to sigma = 0 are 19 evaluations.  For diffusers' push door:
    ``FewstepScheduler.set_timesteps`` can call this to read ``num_inference_steps`` as steps."""
    s, spacing, _ = _resolved(sampler, spacing, {})
    steps = _check_steps(steps)
    setup = Setup(s, schedule, 0, {}, spacing, end)
    if setup.explicit_grid is not None:
        n_grid = len(setup.explicit_grid) - 1
        if n_grid != steps:
            raise ValueError(f"the given grid has {n_grid} steps, not steps={steps}")
    return s.nfe_for_steps(steps, setup.ends_on_data())


def prepare(
    sampler: str,
    nfe: int | None,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    spacing: Spacing | None = None,
    end: str = "zero",
    t_start: float | None = None,
    steps_offset: int = 0,
    **options: Any,
) -> Program:
    """Build the :class:`Program` of a registered sampler: validates the options and the NFE
    budget, builds the grid and precomputes every coefficient.  ``steps_offset`` is diffusers'
    offset of the ``leading`` spacing (1 in Stable Diffusion's config).  Give the budget as ``nfe``
    (network evaluations) or as ``steps`` (solver steps, k-diffusion's count; see
    :func:`steps_to_nfe`), not both.  ``sampler`` may be an alias (``euler_a``) or name a
    spacing too (``dpmpp_2m_karras``)."""
    s, spacing, options = _resolved(sampler, spacing, options)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"schedule must be a fewstep.schedules.NoiseSchedule, got {type(schedule).__name__}; "
            "for a diffusers model use fewstep.schedules.from_diffusers(scheduler_or_config)"
        )
    if steps is not None:
        if nfe is not None:
            raise TypeError(f"pass the budget as nfe= (network evaluations) or steps= (solver steps), not both (got nfe={nfe}, steps={steps})")
        nfe = steps_to_nfe(s.name, steps, schedule, spacing=spacing, end=end)
    if nfe is None:
        raise TypeError("prepare needs a budget: nfe= (network evaluations) or steps= (solver steps)")
    nfe = _check_nfe(nfe, s)
    opts = validate_options(s, options)
    program = s.build(Setup(s, schedule, nfe, opts, spacing, end, t_start, int(steps_offset)))
    program.options = opts
    program.x0_transform = _x0_transform(opts)
    if program.eval_times is not None and len(program.eval_times) != nfe:
        raise RuntimeError(f"internal error: {s.name} planned {len(program.eval_times)} evaluations for nfe={nfe}")
    if steps is not None and program.num_steps != steps:
        raise ValueError(
            f"{s.name} cannot take {steps} steps of this grid with nfe={nfe}: it plans {program.num_steps} steps "
            "(a start at zero SNR begins with extra first-order steps); pass nfe= instead"
        )
    return program


@dataclass
class SampleInfo:
    """What a :func:`sample` call did: its evaluations, grid and sampler."""

    nfe: int
    eval_times: list[float | list[float]]  # per-sample lists for samplers that choose times per sample
    grid: list[float]
    sampler: str
    stochastic: bool = False  # whether this run drew fresh noise (e.g. ddim with eta > 0)


def _check_output(
    x0: Any, x: torch.Tensor, index: int, nfe: int, t: float | torch.Tensor, schedule: NoiseSchedule, check_finite: bool
) -> None:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"the denoiser must return a tensor (x0_hat), got {type(x0).__name__}")
    if x0.shape != x.shape:
        raise ValueError(
            f"the denoiser returned shape {tuple(x0.shape)} for input shape {tuple(x.shape)}; "
            "it must return a data prediction x0_hat of the input's shape"
        )
    if check_finite and not bool(torch.isfinite(x0).all()):
        if isinstance(t, torch.Tensor):  # per-sample times: name the first sample that failed
            bad = int(torch.nonzero(~torch.isfinite(x0.reshape(x0.shape[0], -1)).all(dim=1))[0])
            t = float(t.flatten()[bad])
        a, s = schedule.alpha_sigma(t)
        raise NonFiniteError(
            f"the denoiser returned NaN/inf at evaluation {index + 1} of {nfe} (t={t:.6g}, alpha={a:.3g}, sigma={s:.3g}). "
            "Common causes: float16 overflow in the network (run it in bfloat16 or float32), an epsilon-prediction "
            "model evaluated at zero SNR, or a broken checkpoint."
        )


def _unconditional(denoiser: Callable[..., torch.Tensor], x0: torch.Tensor, program: Program) -> torch.Tensor | None:
    """The unconditional data prediction of the evaluation just made, for CFG++: a guided denoiser
    (:class:`fewstep.models.ClassifierFreeGuidance`) keeps it in ``last_uncond``.  ``None`` for a
    denoiser without that attribute (an unguided one)."""
    if not hasattr(denoiser, "last_uncond"):
        return None
    d_u = denoiser.last_uncond
    if not isinstance(d_u, torch.Tensor) or d_u.shape != x0.shape:
        raise ValueError(
            f"{program.spec.name} needs the unconditional prediction of every evaluation; the denoiser's last_uncond "
            f"is {None if d_u is None else tuple(getattr(d_u, 'shape', ()))}, expected shape {tuple(x0.shape)}"
        )
    d_u = d_u.to(x0.dtype)
    return program.x0_transform(d_u) if program.x0_transform is not None else d_u


def _warn_unguided(program: Program) -> None:
    warnings.warn(
        f"{program.spec.name} re-noises with the unconditional prediction, but the denoiser exposes none (no "
        "last_uncond attribute): it is treated as unguided, which makes the sampler its base sampler. Pass a "
        "fewstep.models.ClassifierFreeGuidance denoiser for CFG++.",
        UnguidedWarning,
        stacklevel=4,
    )


def run_program(
    program: Program,
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    *,
    noise_source: NoiseSource | None = None,
    cond: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    check_finite: bool = True,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Pull-style driver: runs ``program`` from state ``x``, calling ``denoiser(x, t, **cond)``.

    The state is kept in ``promote(x.dtype, float32)``; the network sees ``model_dtype``.
    Returns the final state and the list of evaluation times."""
    cond = dict(cond or {})
    model_dtype = model_dtype or x.dtype
    if "uncond" in program.spec.needs:
        check_cfgpp_scale(program, denoiser)
    noise_source = noise_source or NoiseSource()
    noise_source.begin(program, x)
    routine = program.routine(x, noise_source)
    takes_s = bool(getattr(denoiser, "takes_target_time", False))
    times: list[float | list[float]] = []
    try:
        req = next(routine)
        while True:
            i = len(times)
            if i >= program.nfe:
                raise RuntimeError(f"internal error: {program.spec.name} asked for more than nfe={program.nfe} evaluations")
            if check_finite:
                check_state(req.x, program, f"before evaluation {i + 1} of {program.nfe} (t={_time_repr(req.t)})")
            kw = cond if req.s is None or not takes_s else {**cond, "s": time_tensor(req.s, req.x.device)}
            x0 = denoiser(req.x.to(model_dtype), time_tensor(req.t, req.x.device), **kw)
            _check_output(x0, req.x, i, program.nfe, req.t, program.schedule, check_finite)
            x0 = x0.to(req.x.dtype)
            if program.x0_transform is not None:
                x0 = program.x0_transform(x0)
            times.append(req.t.tolist() if isinstance(req.t, torch.Tensor) else req.t)
            if callback is not None:
                callback(i, req.t, req.x, x0)
            if req.uncond:
                d_u = _unconditional(denoiser, x0, program)
                if d_u is None and i == 0:
                    _warn_unguided(program)
                req = routine.send((req.x, x0, x0 if d_u is None else d_u))
            else:
                req = routine.send((req.x, x0))
    except StopIteration as stop:
        out = stop.value
    if len(times) != program.nfe:
        raise RuntimeError(f"internal error: {program.spec.name} made {len(times)} evaluations for nfe={program.nfe}")
    if check_finite:
        check_state(out, program, "in the final sample")
    return out, times


def _time_repr(t: float | torch.Tensor) -> str:
    return f"{t:.6g}" if not isinstance(t, torch.Tensor) else "per-sample times"


def _option_summary(program: Program) -> str:
    """The options a run set away from the registry's defaults, for error messages."""
    defaults = program.spec.all_options()
    changed = {k: v for k, v in program.options.items() if k in defaults and defaults[k] != v}
    return ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "none (the defaults)"


def check_state(x: torch.Tensor, program: Program, where: str) -> None:
    """A :class:`NonFiniteError` if the sampler's state ``x`` holds NaN or inf.  Every denoiser output
    before it was checked, so the cause is the sampler itself: its options, its grid on this
    schedule, or the starting noise -- never the denoiser; the message says so."""
    if bool(torch.isfinite(x).all()):
        return
    bad = int(torch.nonzero(~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1))[0])
    raise NonFiniteError(
        f"{program.spec.name}: the sampler's state is NaN/inf {where} (first in sample {bad}), although every denoiser "
        f"output so far was finite. The cause is the sampler on this schedule and grid, not the denoiser: schedule "
        f"{program.schedule!r}, grid {[round(float(t), 6) for t in program.grid[:3]]}...{round(float(program.grid[-1]), 6)}, "
        f"options changed: {_option_summary(program)}. Please report it if the options are valid."
    )


def check_cfgpp_scale(program: Program, denoiser: Any) -> None:
    """CFG++ (Chung et al. 2024) takes a guidance scale ``lambda`` in ``[0, 1]``; a classical CFG
    scale (5, 7.5, ...) there is a different method, so it is refused before any evaluation."""
    w = getattr(denoiser, "guidance_scale", None)
    if w is None:
        return
    wt = torch.as_tensor(w, dtype=torch.float64)
    if not bool(((wt >= 0) & (wt <= 1)).all()):
        raise ValueError(
            f"{program.spec.name} is CFG++, whose guidance scale is the paper's lambda in [0, 1] (0: unconditional, 1: "
            f"conditional), but the denoiser's guidance_scale is {w if not isinstance(w, torch.Tensor) else w.tolist()}; "
            "set ClassifierFreeGuidance(..., guidance_scale=lambda) with lambda in [0, 1], or use a plain sampler "
            "(dpmpp_2m, ...) for classical guidance scales"
        )


def _check_noise(noise: Any) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor of standard normal samples, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(
            f"noise must be a floating-point tensor (float32, float16, bfloat16 or float64), got {noise.dtype}; "
            "draw it with torch.randn"
        )
    if noise.ndim < 2:
        raise ValueError(f"noise must be batched, shape (B, ...), got shape {tuple(noise.shape)}")
    if noise.shape[0] == 0 or noise[0].numel() == 0:
        raise ValueError(f"noise is empty (shape {tuple(noise.shape)}); pass at least one sample of at least one entry")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or inf; it must be standard normal samples (torch.randn)")
    return noise


def _plan_program(
    plan: Any,
    schedule: NoiseSchedule | None,
    sampler: str | None,
    nfe: int | None,
    spacing: Any,
    end: str,
    t_start: float | None,
    options: Mapping[str, Any],
) -> Program:
    """The program of a sampling plan, refusing arguments the plan already fixes."""
    from fewstep.samplers.plan import SamplingPlan

    if isinstance(plan, Mapping):
        plan = SamplingPlan.from_dict(plan)
    if not isinstance(plan, SamplingPlan):
        raise TypeError(f"plan must be a SamplingPlan (or its dict), got {type(plan).__name__}")
    if nfe is not None and nfe != plan.nfe:
        raise ValueError(f"the plan was tuned for nfe={plan.nfe}, not nfe={nfe}; tune one for {nfe} (fewstep tune --nfe {nfe})")
    given = [k for k, v in (("sampler", sampler), ("spacing", spacing), ("t_start", t_start)) if v is not None]
    given += ["end"] if end != "zero" else []
    given += sorted(options)
    if given:
        raise TypeError(f"a plan fixes the sampler, grid and options; do not pass {', '.join(given)} with plan=")
    return plan.program(schedule)


def model_schedule(denoiser: Any, schedule: NoiseSchedule | None) -> NoiseSchedule:
    """``schedule``, or the denoiser's own ``.schedule`` when none is given."""
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ValueError("pass schedule=... (the denoiser has no .schedule attribute to take it from)")
    return schedule


def sample(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sampler: str | None = None,
    nfe: int | None = None,
    *,
    steps: int | None = None,
    plan: Any = None,
    schedule: NoiseSchedule | None = None,
    spacing: Spacing | None = None,
    end: str = "zero",
    t_start: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | NoiseSource | None = None,
    cond: Mapping[str, Any] | None = None,
    check_finite: bool = True,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    return_info: bool = False,
    grad: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]:
    """Sample with a registered sampler using exactly ``nfe`` denoiser evaluations.

    Args:
        denoiser: ``denoiser(x, t, **cond) -> x0_hat``; ``t`` is the schedule's time as a 0-d
            float64 tensor.  Wrappers in :mod:`fewstep.models` turn eps/v/flow networks and
            diffusers models into denoisers.
        noise: standard normal noise, shape (B, ...); its dtype is the dtype the network sees
            (float16/bfloat16 networks: the sampler state is kept in float32).
        sampler: a registered name (``fewstep.samplers.available()``), an alias (``euler_a``,
            ``uni_pc``, ``"DPM++ 2M"``) or a sampler and spacing in one (``dpmpp_2m_karras``,
            ``"DPM++ SDE Karras"``); default ``"dpmpp_2m"``.
        nfe: the number of network evaluations; default 10.
        steps: instead of ``nfe``, the number of solver steps as k-diffusion, ComfyUI and A1111
            count them (``len(sigmas) - 1``; 10 Heun steps are 19 evaluations).  Exclusive with ``nfe``.
        plan: a :class:`fewstep.samplers.SamplingPlan` (or its dict) from ``fewstep.samplers.tune``;
            it fixes the sampler, budget, grid and options, so those are not passed with it.
        schedule: the model's noise schedule; defaults to ``denoiser.schedule``.
        spacing: time-grid spacing name or explicit grid (see :func:`fewstep.schedules.time_grid`);
            default: the sampler's own choice.
        end: ``"zero"`` (finish on clean data) or ``"min"`` (stop at the schedule's ``t_min``).
        t_start: first time of the grid (default ``schedule.t_max``).
        generator: a ``torch.Generator`` or one per sample, for stochastic samplers (or a
            :class:`NoiseSource` that supplies the noise itself).
        cond: conditioning passed to the denoiser as keyword arguments.
        grad: keep the autograd graph through every evaluation (to differentiate the samples with
            respect to the noise, the conditioning or the network).  Off by default, as in
            diffusers' pipelines: sampling runs under ``torch.no_grad`` whatever the caller's mode,
            so an ``nn.Module`` denoiser does not hold every step's activations in memory.
        options: solver options of the sampler (``fewstep.samplers.spec(name).options``).

    Returns:
        The samples (dtype of ``noise``), and a :class:`SampleInfo` if ``return_info``.
    """
    noise = _check_noise(noise)
    if cond is not None and not isinstance(cond, Mapping):
        raise TypeError(f"cond must be a mapping of keyword arguments for the denoiser, got {type(cond).__name__}")
    if plan is not None:  # a plan names its schedule; one given (or the denoiser's) is checked against it
        if steps is not None:
            raise TypeError("a plan fixes its budget; do not pass steps= with plan=")
        program = _plan_program(plan, schedule if schedule is not None else getattr(denoiser, "schedule", None),
                                sampler, nfe, spacing, end, t_start, options)
    else:
        schedule = model_schedule(denoiser, schedule)
        sampler = "dpmpp_2m" if sampler is None else sampler
        nfe = 10 if nfe is None and steps is None else nfe
        program = prepare(sampler, nfe, schedule, steps=steps, spacing=spacing, end=end, t_start=t_start, **options)
    work = torch.promote_types(noise.dtype, torch.float32)
    with torch.set_grad_enabled(bool(grad)):
        x = program.initial_state(noise.to(work))
        out, times = run_program(
            program,
            denoiser,
            x,
            noise_source=generator if isinstance(generator, NoiseSource) else NoiseSource(generator),
            cond=cond,
            model_dtype=noise.dtype,
            check_finite=check_finite,
            callback=callback,
        )
        out = out.to(noise.dtype)
    if return_info:
        return out, SampleInfo(len(times), times, program.grid.tolist(), program.spec.name, program.stochastic)
    return out
