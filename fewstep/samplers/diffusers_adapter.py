"""The push-style front door: one diffusers scheduler that runs any registered sampler.

``pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_3m")``
puts a fewstep sampler into any diffusers pipeline that loops over ``scheduler.timesteps`` and
calls ``scheduler.step``: DDPM-family UNet pipelines, flow-matching transformer pipelines (SD3,
Flux, SANA, Wan, ...), EDM-preconditioned pipelines, and consistency pipelines (LCM, TCD).
``num_inference_steps`` is the NFE budget: the pipeline calls the network exactly that many
times.  The sampler's routine (the same generator that :func:`fewstep.sample` drives) is advanced
one evaluation per ``step`` call, so the two front doors produce the same tensors.

Every key of the config being replaced is read by :func:`fewstep.diffusers_config.read_config`
(honoured, known to have no effect, or refused with an error naming it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep.models.prediction import EDMPreconditioning, check_prediction_type, to_x0
from fewstep.samplers.core import Eval, NoiseSource, NonFiniteError, Program, check_state, prepare, steps_to_nfe, validate_options
from fewstep.samplers.registry import spec
from fewstep.schedules import (
    EDM,
    SPACINGS,
    FlowMatching,
    GridRule,
    NoiseSchedule,
    VPDiscrete,
    VPSigma,
    diffusers_alphas_cumprod,
    time_grid,
)

__all__ = ["FewstepScheduler", "FewstepSchedulerOutput"]

FAMILIES = ("vp_discrete", "vp_sigma", "flow", "edm")
_DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """``prev_sample`` (the input of the next network call, or the final sample),
    ``pred_original_sample`` (the data prediction of this call) and ``denoised`` (the same data
    prediction, under the name ``LCMScheduler`` gives it: ``LatentConsistencyModelPipeline`` returns
    the last one)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None
    denoised: torch.Tensor | None = None


_PUSH_LIMITS = {
    "uncond": "re-noises with the unconditional prediction (CFG++), but a diffusers pipeline combines the "
    "conditional and unconditional outputs itself and hands the scheduler only the guided one; run it with "
    "fewstep.sample(fewstep.models.ClassifierFreeGuidance(...), ...) instead",
    "target_time": "feeds the model the time it jumps to (CTM's G(x, t, s)), which a pipeline's network call "
    "cannot pass; run it with fewstep.sample(...) instead",
}

#: The per-call ``eta`` pipelines pass to ``step`` (DDIM, TCD, SANA...), as each sampler's own option.
ETA_OPTION = {"ddim": "eta", "tcd": "gamma"}

#: Scheduler keys of FewstepScheduler itself (not of the config it replaces).
_OWN_KEYS = ("sampler", "sampler_options", "spacing", "final", "budget", "boundary_condition", "plan", "family", "diffusers_config")


def _check_push_style(sampler: str) -> None:
    """A clear error for samplers a pipeline's fixed ``timesteps`` / ``step`` loop cannot drive."""
    s = spec(sampler)
    for need in s.needs:
        if need in _PUSH_LIMITS:
            raise ValueError(f"sampler {sampler!r} {_PUSH_LIMITS[need]}")
    if not s.push_style:
        raise ValueError(
            f"sampler {sampler!r} chooses its evaluation times while sampling, which a diffusers pipeline's fixed "
            "timestep loop cannot follow; run it with fewstep.sample(...) instead"
        )


def _lcm_strength_timesteps(num_train: int, num_steps: int, original_steps: int, strength: float) -> list[float]:
    """LCM's skipping-step timesteps for image-to-image (``LCMScheduler.set_timesteps(strength=)``,
    Luo et al. 2023): ``num_steps`` of the first ``int(original_steps * strength)`` training
    timesteps ``k c - 1`` (``c = N // original_steps``), from the noisiest."""
    c = num_train // original_steps
    m = int(original_steps * strength)
    if m < num_steps:
        raise ValueError(
            f"LCM img2img with strength={strength} keeps {m} of original_inference_steps={original_steps} timesteps, "
            f"fewer than num_inference_steps={num_steps}; raise strength or lower num_inference_steps"
        )
    origin = (np.arange(1, m + 1) * c - 1)[::-1]
    idx = np.floor(np.linspace(0, m, num=num_steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float64).tolist()


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler wrapping any registered fewstep sampler.

    Build it with ``FewstepScheduler.from_config(pipe.scheduler.config, sampler=...)``: the config
    of the scheduler being replaced is read key by key (:mod:`fewstep.diffusers_config`), and
    keyword arguments to ``from_config`` win over it.  Its own config:

        family: ``"vp_discrete"`` (DDPM family; keys ``num_train_timesteps``, ``beta_*``,
            ``trained_betas``, ``rescale_betas_zero_snr``, ``snr_shift_scale``), ``"flow"`` (flow
            matching; ``shift``, ``use_dynamic_shifting`` and the keys Flux pipelines read to compute
            ``mu``), ``"edm"`` (``sigma_min``, ``sigma_max``, ``sigma_data``, ``precondition``) or
            ``"vp_sigma"`` (Stable Video Diffusion's continuous timesteps; ``sigma_min``, ``sigma_max``).
        prediction_type: what the network predicts (default: the family's, ``epsilon`` for VP and
            EDM, ``flow_prediction`` for flow).
        sampler, sampler_options: the registered sampler (``fewstep samplers`` lists them) and its options.
        spacing: the time grid: ``None`` (the sampler's default), a fewstep spacing name, or
            ``"diffusers"``: the grid of the scheduler being replaced, as that scheduler computes it
            (chosen automatically when its config sets a grid key: ``timestep_spacing``,
            ``use_karras_sigmas``, ...).
        final: ``"zero"`` (finish on clean data) or ``"min"`` (stop at the schedule's ``t_min``).
        budget: what ``num_inference_steps`` counts: ``"nfe"`` (network evaluations, the default)
            or ``"steps"`` (solver steps, k-diffusion's and ComfyUI's count: 10 Heun steps to clean
            data are 19 evaluations; :func:`fewstep.samplers.steps_to_nfe`).
        boundary_condition: a consistency model's ``c_skip`` / ``c_out`` (``BoundaryCondition``
            fields), applied to every data prediction (LCM's, read from ``LCMScheduler``'s
            ``timestep_scaling``; a distilled fewstep student's).
        plan: a sampling plan (``SamplingPlan.to_dict()``): it replaces sampler, options and spacing.
        clip_sample / thresholding (+ ratio, max value): data-prediction processing, as diffusers.
        variance_type: ``"learned"`` / ``"learned_range"``: the network's output has twice the
            channels; the first half is the prediction.
        diffusers_config: the config of the scheduler being replaced (for its own grid).

    ``set_timesteps(n)`` plans exactly ``n`` network evaluations (``n`` solver steps with
    ``budget="steps"``); ``timesteps`` holds the model
    timesteps of those evaluations in order (VP: the training index; flow: ``1000 t``; EDM:
    ``c_noise``), ``sigmas`` their noise levels in diffusers' convention.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        steps_offset: int = 0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        sampler: str = "dpmpp_2m",
        sampler_options: dict[str, Any] | None = None,
        spacing: str | None = None,
        final: str = "zero",
        budget: str = "nfe",
        boundary_condition: dict[str, float] | None = None,
        plan: dict[str, Any] | None = None,
        family: str = "vp_discrete",
        snr_shift_scale: float | None = None,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float = 0.5,
        precondition: str | None = None,
        variance_type: str | None = None,
        diffusers_config: dict[str, Any] | None = None,
    ):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
        if family == "vp_discrete":
            ac = diffusers_alphas_cumprod(
                num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr, snr_shift_scale
            )
            self.schedule: NoiseSchedule = VPDiscrete(ac)
            self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)  # read by some pipelines
        elif family == "vp_sigma":
            self.schedule = VPSigma(sigma_min if sigma_min is not None else 0.002, sigma_max if sigma_max is not None else 700.0)
        elif family == "flow":
            self.schedule = FlowMatching(shift, num_train_timesteps)
        else:
            self.schedule = EDM(
                sigma_min if sigma_min is not None else 0.002, sigma_max if sigma_max is not None else 80.0, sigma_data, precondition
            )
        default_prediction = {"flow": "flow_prediction"}.get(family, "epsilon")
        p = prediction_type if prediction_type is not None else default_prediction
        if isinstance(self.schedule, EDM) and self.schedule.precondition is not None:
            self._precondition: EDMPreconditioning | None = EDMPreconditioning(self.schedule.sigma_data, p)
            self._prediction_type = self._precondition.prediction_type
        else:
            self._precondition = None
            self._prediction_type = check_prediction_type(p, self.schedule)
        if spacing is not None and spacing != "diffusers" and spacing not in SPACINGS:
            raise ValueError(f"spacing must be None, 'diffusers' or one of {', '.join(SPACINGS)}, got {spacing!r}")
        if final not in ("zero", "min"):
            raise ValueError(f"final must be 'zero' (finish on clean data) or 'min' (stop at t_min), got {final!r}")
        if budget not in ("nfe", "steps"):
            raise ValueError(f"budget must be 'nfe' (num_inference_steps counts network evaluations) or 'steps' (solver steps), got {budget!r}")
        if budget == "steps" and plan is not None:
            raise ValueError("a sampling plan fixes its number of network evaluations; use budget='nfe' with plan=")
        if use_dynamic_shifting and family != "flow":
            raise ValueError("use_dynamic_shifting is the resolution-dependent shift of flow-matching schedules (family='flow')")
        self.init_noise_sigma = self.schedule.noise_scale(self.schedule.t_max)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.program: Program | None = None
        self._prep: dict[str, Any] | None = None
        self._begin_index: int | None = None
        self._exhausted = False
        self._reset()
        # Fail at construction on an unknown sampler, option or malformed plan, not at the first step.
        if plan is not None:
            from fewstep.samplers.plan import SamplingPlan

            self._plan = SamplingPlan.from_dict(plan)
            self._plan.check_schedule(self.schedule)
        else:
            self._plan = None
            validate_options(spec(sampler), self._options())

    # -- construction from another scheduler's config ------------------------------------------
    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """A FewstepScheduler for the model whose scheduler config is ``config``.

        ``config`` is a diffusers scheduler (or its config) of any class :mod:`fewstep.diffusers_config`
        knows; every key is honoured, known to have no effect, or refused with an error naming it.
        Keyword arguments win over the config: FewstepScheduler's own (``sampler``,
        ``sampler_options``, ``spacing``, ``final``, ...) and keys of the replaced scheduler
        (``use_karras_sigmas=True``, ``timestep_spacing="trailing"``, ``prediction_type=...``), which
        count as set.  A FewstepScheduler config is loaded as diffusers loads any config."""
        from fewstep.diffusers_config import KEYS, class_parameters, read_config, source_class

        cfg = dict(config.config if hasattr(config, "config") and not isinstance(config, Mapping) else (config or {}))
        if not cfg.get("_class_name") and hasattr(config, "config") and not isinstance(config, Mapping):
            cfg["_class_name"] = type(config).__name__
        own_params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        name = source_class(cfg) if cfg else cls.__name__
        if name == cls.__name__:
            cfg.pop("_class_name", None)
            return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if name is None and kwargs.get("sampler") in ("lcm", "tcd") and "original_inference_steps" in cfg:
            name = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}[kwargs["sampler"]]
        if name is not None:
            cfg["_class_name"] = name
        params = set(class_parameters(name) or ()) if name else set(cfg) | set(KEYS)
        # keyword arguments: the replaced scheduler's keys update its config (and count as set);
        # FewstepScheduler's own settings win over what the config implies; anything else is an error
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in params and k not in _OWN_KEYS}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in own_params}
        if kwargs:
            raise TypeError(
                f"FewstepScheduler.from_config got unexpected keyword argument(s) {sorted(kwargs)}: neither a FewstepScheduler "
                f"setting nor a key of {name or 'the config'}"
            )
        kwargs = overrides
        read = read_config(cfg, overrides=kwargs)
        if read.ambiguous and "sampler" not in own:
            raise ValueError(
                f"this config has no _class_name and its keys fit {read.class_name} and {', '.join(read.ambiguous)}, which "
                "need different samplers: pass sampler= (e.g. 'lcm' or 'tcd'), or the scheduler itself "
                "(FewstepScheduler.from_config(pipe.scheduler))"
            )
        init: dict[str, Any] = {
            "family": read.family,
            "prediction_type": read.prediction_type,
            "steps_offset": read.steps_offset,
            "diffusers_config": read.source,
            **read.schedule_keys,
            **read.processing,
        }
        if read.learned_variance:
            init["variance_type"] = str(read.source.get("variance_type"))
        if read.grid_keys:
            init["spacing"] = "diffusers"
        elif read.spacing is not None:
            init["spacing"] = read.spacing
        if read.end is not None:
            init["final"] = read.end
        sampler = own.get("sampler", read.sampler or "dpmpp_2m")
        init["sampler"] = sampler
        s = spec(sampler)
        derived = {k: v for k, v in read.sampler_options.items() if k in s.options}
        init["sampler_options"] = {**derived, **dict(own.get("sampler_options") or {})} or None
        if read.boundary_condition is not None and s.model_kind == "consistency":
            init["boundary_condition"] = read.boundary_condition
        init.update({k: v for k, v in own.items() if k not in ("sampler", "sampler_options")})
        sch = cls(**init)
        return (sch, {}) if return_unused_kwargs else sch

    @property
    def compatibles(self) -> list[type]:
        """The diffusers schedulers that read this config as the same schedule (tested)."""
        import diffusers

        from fewstep.diffusers_config import CLASSES

        names = {
            "vp_discrete": [n for n in self._compatibles if CLASSES.get(n, ("",))[0] == "vp"],
            "flow": ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"],
            "edm": ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"] if self.config.precondition == "edm" else [],
            "vp_sigma": [],
        }[self.config.family]
        return [type(self)] + [getattr(diffusers, n) for n in names if hasattr(diffusers, n)]

    # -- planning ------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        opts = dict(self.config.sampler_options or {})
        if self.config.thresholding:
            opts.setdefault("thresholding", True)
            opts.setdefault("dynamic_thresholding_ratio", self.config.dynamic_thresholding_ratio)
            opts.setdefault("sample_max_value", self.config.sample_max_value)
        elif self.config.clip_sample:
            opts.setdefault("clip_denoised", self.config.clip_sample_range)
        return opts

    def _source(self) -> dict[str, Any]:
        """The config of the scheduler being replaced (or the family's usual one, built from ours)."""
        from fewstep.diffusers_config import SYNTHETIC_SOURCE, diffusers_class

        if self.config.diffusers_config:
            return dict(self.config.diffusers_config)
        name = SYNTHETIC_SOURCE.get(self.config.family)
        cls = diffusers_class(name)
        if cls is None:
            raise ValueError(
                "spacing='diffusers' and pipeline-given sigmas follow the grid of the diffusers scheduler this one replaces, "
                "and this FewstepScheduler has none: build it with FewstepScheduler.from_config(pipe.scheduler.config, ...)"
            )
        params = set(inspect.signature(cls.__init__).parameters)
        own = dict(self.config)
        return {"_class_name": name, **{k: own[k] for k in params if k in own and own[k] is not None and not k.startswith("_")}}

    def _run_schedule(self, mu: float | None) -> NoiseSchedule:
        """The schedule of this run: a flow schedule takes the shift of the pipeline's ``mu``."""
        if self.config.family != "flow":
            if mu is not None:
                raise ValueError(f"mu is the dynamic time shift of flow-matching schedules; this is a {self.config.family} schedule")
            return self.schedule
        if mu is None:
            if self.config.use_dynamic_shifting:
                raise ValueError("use_dynamic_shifting=True: pass mu to set_timesteps (the pipeline computes it from the image size)")
            return self.schedule
        if not self.config.use_dynamic_shifting:
            raise ValueError(
                "mu was passed, but this scheduler has use_dynamic_shifting=False (a static shift); build it with "
                "use_dynamic_shifting=True, as the pipeline expects"
            )
        return self.schedule.with_shift(FlowMatching.dynamic_shift(mu, self.config.time_shift_type))

    def _native_rule(self, schedule: NoiseSchedule, **set_timesteps_kwargs: Any) -> GridRule:
        from fewstep.diffusers_config import native_times, resample_sigmas

        source, family, end = self._source(), self.config.family, self.config.final
        pipeline_sigmas = set_timesteps_kwargs.pop("sigmas", None)
        kw = {k: v for k, v in set_timesteps_kwargs.items() if v is not None}

        def make(num_steps: int) -> list[float]:
            if pipeline_sigmas is not None:
                return native_times(source, family, schedule, num_steps, end, sigmas=resample_sigmas(pipeline_sigmas, num_steps), **kw)
            return native_times(source, family, schedule, num_steps, end, **kw)

        probe = make(1)
        return GridRule(make, probe[-1], name=f"{source.get('_class_name', 'diffusers')} grid")

    def _prepare(self, nfe: int, schedule: NoiseSchedule, spacing: Any, options: dict[str, Any], t_start: float | None = None) -> Program:
        self._prep = {"nfe": nfe, "schedule": schedule, "spacing": spacing, "options": dict(options), "t_start": t_start}
        return prepare(
            self.config.sampler, nfe, schedule, spacing=spacing, end=self.config.final, t_start=t_start,
            steps_offset=self.config.steps_offset, **options,
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ) -> None:
        """Plan ``num_inference_steps`` network evaluations.

        What a pipeline passes is honoured: ``timesteps`` are the evaluation times themselves (model
        timesteps, one evaluation each, then a final step to the end time); ``sigmas`` are the
        pipeline's grid (Flux always passes ``linspace(1, 1/n, n)``), taken through the replaced
        scheduler's own shift (``mu``: the dynamic shift) and resampled to the number of steps the
        sampler needs for its budget, unless this scheduler was given a fewstep ``spacing`` (which then
        wins: FluxPipeline passes its default sigmas on every call); ``mu`` shifts a flow schedule's
        grid (``shift = e^mu``);
        ``original_inference_steps`` and ``strength`` are LCM's (for ``lcm`` / ``tcd``)."""
        given = [k for k, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if not given:
            raise ValueError("pass num_inference_steps (the NFE budget), or timesteps, or sigmas")
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both")
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(f"num_inference_steps must be a whole number (the NFE budget), got {num_inference_steps!r}")
            num_inference_steps = int(num_inference_steps)
            for name, seq in (("timesteps", timesteps), ("sigmas", sigmas)):
                if seq is not None and len(seq) != num_inference_steps:
                    raise ValueError(f"{len(seq)} {name} were passed for num_inference_steps={num_inference_steps}")
        nfe = num_inference_steps if num_inference_steps is not None else len(timesteps if timesteps is not None else sigmas)
        schedule = self._run_schedule(mu)
        self._begin_index, self._exhausted = None, False
        if self._plan is not None:
            if timesteps is not None or sigmas is not None or nfe != self._plan.nfe:
                raise ValueError(
                    f"this scheduler runs a sampling plan tuned for {self._plan.nfe} network evaluations: "
                    f"call it with num_inference_steps={self._plan.nfe}, or tune a plan for the budget you want"
                )
            self._prep = None
            self._install(self._plan.program(self.schedule), device)
            return
        _check_push_style(self.config.sampler)
        s = spec(self.config.sampler)
        if self.config.budget == "steps":
            nfe = steps_to_nfe(self.config.sampler, nfe, schedule, end=self.config.final)
        options = self._options()
        if "original_inference_steps" in s.options and original_inference_steps is not None:
            options["original_inference_steps"] = int(original_inference_steps)
        spacing: Any
        if timesteps is not None:
            if s.evals_per_step != 1:
                raise ValueError(
                    f"sampler {self.config.sampler!r} evaluates between grid times, so custom timesteps cannot be "
                    "its evaluation times; pass num_inference_steps instead"
                )
            ts = [float(schedule.time_from_model_timestep(float(t))) for t in timesteps]
            end = schedule.t_zero if self.config.final == "zero" else schedule.t_min
            spacing = ts + [end]
        elif sigmas is not None and self.config.spacing in (None, "diffusers"):
            spacing = self._native_rule(schedule, sigmas=[float(v) for v in sigmas], mu=mu)
        elif strength != 1.0:
            if self.config.sampler not in ("lcm", "tcd") or not isinstance(schedule, VPDiscrete):
                raise ValueError(
                    "set_timesteps(strength=...) is LCM's image-to-image schedule (lcm / tcd on a discrete schedule); "
                    "other pipelines start part-way with set_begin_index"
                )
            opts = {**spec(self.config.sampler).options, **options}
            ts = _lcm_strength_timesteps(schedule.num_train_timesteps, nfe, int(opts["original_inference_steps"]), float(strength))
            spacing = ts + [schedule.t_zero if self.config.final == "zero" else schedule.t_min]
        elif self.config.spacing == "diffusers":
            spacing = self._native_rule(schedule, mu=mu, original_inference_steps=original_inference_steps)
        else:
            spacing = self.config.spacing
        integral_ok = spacing is not None and (not isinstance(spacing, (str, Mapping)) or spacing in _DIFFUSERS_SPACINGS)
        self._install(self._prepare(nfe, schedule, spacing, options), device, integral_ok=integral_ok)

    def _install(self, program: Program, device: str | torch.device | None, integral_ok: bool = True) -> None:
        if program.eval_times is None:
            raise ValueError(
                f"sampler {self.config.sampler!r} chooses its evaluation times while sampling, which a diffusers "
                "pipeline's fixed timestep loop cannot follow; run it with fewstep.sample(...) instead"
            )
        self.program = program
        self.num_inference_steps = program.nfe
        sched = program.schedule
        times = torch.tensor(program.eval_times, dtype=torch.float64)
        ts = torch.as_tensor(sched.model_timestep(times), dtype=torch.float64)
        self._model_times = ts.tolist()
        self._boundary = None
        if self.config.boundary_condition:
            from fewstep.distill.student import BoundaryCondition

            c_skip, c_out = BoundaryCondition(**self.config.boundary_condition).coefficients(sched, times)
            self._boundary = list(zip(c_skip.tolist(), c_out.tolist()))
        # Integer model timesteps stay int64 (diffusers' DDPM-family convention) on diffusers' own
        # grids; fewstep's spacings keep float32 so that set_begin_index can re-plan them in place.
        integral = integral_ok and bool(torch.all(ts == ts.round()))
        self.timesteps = (ts.to(torch.int64) if integral else ts.to(torch.float32)).to(device)
        grid_pts = torch.tensor(list(program.eval_times) + [float(program.grid[-1])], dtype=torch.float64)
        self.sigmas = self._diffusers_sigmas(sched, grid_pts).to(torch.float32)
        self.init_noise_sigma = sched.noise_scale(program.start_time)
        self._reset()

    @staticmethod
    def _diffusers_sigmas(schedule: NoiseSchedule, times: torch.Tensor) -> torch.Tensor:
        """Noise levels in diffusers' convention: flow / EDM: the time itself; VP: sigma / alpha."""
        if isinstance(schedule, (FlowMatching, EDM, VPSigma)):
            return times.clone()
        la, ls = schedule.log_alpha_sigma(times)
        return torch.exp(ls - la)

    # -- image-to-image ------------------------------------------------------------------------
    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation ``begin_index`` (image-to-image and inpainting pipelines skip the
        noisiest ``begin_index`` of ``num_inference_steps`` steps by ``strength``).

        ``strength`` means a noise level: the run starts where the replaced diffusers scheduler's own
        grid is at that index (strength 0.3 of a DPM-Solver config starts at timestep ~300, of a
        flow config at ``sigma = shift(0.3)``), and the remaining ``n - begin_index`` evaluations
        are re-planned from there with the sampler's own spacing.  The new timesteps are written into
        ``timesteps`` in place, so the slice the pipeline took before calling this sees them.  On a
        diffusers grid (``spacing="diffusers"``, pipeline sigmas or integer spacings) the rest of the
        grid is used as it is.  ``begin_index = n`` (``strength * n < 1``) leaves no evaluation: the
        pipeline's ``add_noise`` / ``scale_noise`` then raises a ``ValueError`` saying so (diffusers'
        schedulers fail there too, with an indexing error)."""
        k = int(begin_index)
        if k == 0:
            self._begin_index = 0 if self.program is not None else None
            return
        if self.program is None:
            raise ValueError("call set_timesteps(num_inference_steps) before set_begin_index()")
        n = self.program.nfe
        if not 0 < k <= n:
            raise ValueError(f"begin_index must be in [0, {n}], got {begin_index}")
        if self._plan is not None or self.program.spec.evals_per_step != 1 or self._prep is None:
            raise ValueError(
                f"{'a sampling plan' if self._plan is not None else repr(self.config.sampler)} cannot start part-way: its "
                "evaluations are not one per grid time; for image-to-image use a multistep sampler (dpmpp_2m, unipc_3, ...)"
            )
        self._begin_index = k
        if k == n:
            self._exhausted = True
            return
        prep = self._prep
        spacing = prep["spacing"]
        device = self.timesteps.device
        old, old_sigmas = self.timesteps, self.sigmas
        if spacing is None or (isinstance(spacing, (str, Mapping)) and spacing not in _DIFFUSERS_SPACINGS):
            t_start = self._diffusers_start_time(prep["schedule"], n, k)
            program = prepare(
                self.config.sampler, n - k, prep["schedule"], spacing=spacing, end=self.config.final, t_start=t_start,
                steps_offset=self.config.steps_offset, **prep["options"],
            )
        else:
            program = prepare(
                self.config.sampler, n - k, prep["schedule"], spacing=self.program.grid[k:].tolist(), end=self.config.final,
                **prep["options"],
            )
        self._install(program, device, integral_ok=old.dtype == torch.int64)
        new = self.timesteps
        if old.dtype == torch.int64 and new.dtype != torch.int64:
            raise RuntimeError("internal error: an integer grid re-planned to fractional timesteps")
        old[k:] = new.to(old.dtype)  # the pipeline's slice timesteps[k:] is a view of `old`
        self.timesteps = old  # diffusers' convention: the full list, with begin_index
        self.sigmas = torch.cat([old_sigmas[:k], self.sigmas])
        self._begin_index = k

    def _diffusers_start_time(self, schedule: NoiseSchedule, n: int, k: int) -> float:
        """Where the replaced diffusers scheduler's own ``n``-step grid is at index ``k``."""
        from fewstep.diffusers_config import native_times

        try:
            times = native_times(self._source(), self.config.family, schedule, n, self.config.final)
            return float(times[k])
        except ValueError:
            # no diffusers scheduler to ask (a FewstepScheduler built directly on a VP schedule): diffusers'
            # DDPM-family default, the linspace spacing
            return float(time_grid(schedule, n, "linspace", end=self.config.final)[k])

    def _reset(self) -> None:
        self._routine = None
        self._pending: Eval | None = None
        self._last_out: torch.Tensor | None = None
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    # -- the loop ------------------------------------------------------------------------------
    def _check_timestep(self, timestep: Any) -> None:
        expected = self._model_times[self._step_index]
        got = float(timestep if not isinstance(timestep, torch.Tensor) or timestep.ndim == 0 else timestep.flatten()[0])
        if not math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-3):
            raise ValueError(
                f"step() got timestep {got}, but evaluation {self._step_index + 1} is planned at {expected}; "
                "the pipeline must iterate over scheduler.timesteps in order"
            )

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input: ``c_in x`` under EDM preconditioning (Karras et al. 2022, Table 1),
        the sample itself otherwise (fewstep keeps VP and flow states in the model's own scale)."""
        if self._precondition is None:
            return sample
        if self.program is None or self._step_index >= self.program.nfe:
            raise ValueError("scale_model_input() needs a planned evaluation: call set_timesteps first")
        if timestep is not None:
            self._check_timestep(timestep)
        return sample * self._precondition.c_in(self.program.eval_points[self._step_index].sigma)

    def _apply_eta(self, eta: float | None) -> None:
        """A pipeline's per-call ``eta`` as the sampler's own parameter (ddim: eta, tcd: gamma)."""
        if eta is None or self._prep is None:
            if eta:
                raise ValueError(f"eta={eta} was passed to step(), but a sampling plan has no eta")
            return
        name = ETA_OPTION.get(self.config.sampler)
        if name is None:
            if eta:
                raise ValueError(
                    f"eta={eta} was passed to step(), but sampler {self.config.sampler!r} has no eta-like parameter "
                    f"(ddim: eta, tcd: gamma); choose such a sampler, or set its solver options in sampler_options"
                )
            return
        full = {**spec(self.config.sampler).all_options(), **self._prep["options"]}
        if float(full[name]) == float(eta):
            return
        prep = self._prep
        program = prepare(
            self.config.sampler, self.program.nfe, prep["schedule"], spacing=self.program.grid.tolist(), end=self.config.final,
            **{**prep["options"], name: float(eta)},
        )
        if program.eval_times != self.program.eval_times:
            raise RuntimeError("internal error: eta moved the evaluation times")
        self.program = program
        self._prep = {**prep, "options": {**prep["options"], name: float(eta)}}

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        eta: float | None = None,
        use_clipped_model_output: bool | None = None,
        **kwargs: Any,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Feed one network output; returns the state of the next evaluation (or the result).

        With ``return_dict=False`` the result is ``(prev_sample, denoised)``, as ``LCMScheduler``
        returns it (pipelines that take ``[0]`` get the sample).  ``eta`` (DDIM / TCD pipelines) sets
        the sampler's own parameter for this run (``ddim``: eta, ``tcd``: gamma)."""
        if self.program is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if kwargs:
            raise TypeError(f"FewstepScheduler.step got unexpected arguments {sorted(kwargs)}")
        if self._exhausted or self._step_index >= self.program.nfe:
            raise ValueError(
                f"step() called {self._step_index + 1} times for {self.program.nfe} planned evaluations; "
                "call set_timesteps again to start a new run"
            )
        work = torch.promote_types(sample.dtype, torch.float32)
        if self._routine is None:
            self._apply_eta(eta)
            x = sample.to(work)
            self._routine = self.program.routine(x, NoiseSource(generator))
            self._pending = next(self._routine)
        req = self._pending
        assert req is not None
        point = self.program.eval_points[self._step_index]
        self._check_timestep(timestep)
        if (
            self.config.variance_type in ("learned", "learned_range")
            and isinstance(model_output, torch.Tensor)
            and model_output.ndim == sample.ndim
            and model_output.shape[1] == 2 * sample.shape[1]
        ):
            model_output = model_output[:, : sample.shape[1]]  # the variance half is not used
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            got_shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(
                f"step() got a model output of shape {got_shape} for a sample of shape {tuple(sample.shape)}; "
                "FewstepScheduler needs the network's prediction of the sample's shape (a network with learned "
                "variance outputs twice the channels: set variance_type='learned', or pass only the first half)"
            )
        if not bool(torch.isfinite(model_output).all()):
            raise NonFiniteError(
                f"the model output at evaluation {self._step_index + 1} of {self.program.nfe} (timestep {timestep}) "
                "holds NaN/inf. Common causes: float16 overflow in the network (run it in bfloat16 or float32), an "
                "epsilon-prediction model evaluated at zero SNR, or a broken checkpoint."
            )
        # Follow our own full-precision state unless the pipeline changed the sample it got.
        last = self._last_out
        if last is not None and (sample is last or (sample.shape == last.shape and torch.equal(sample, last))):
            x = req.x
        else:
            x = sample.to(work) if self._step_index else req.x
        if self._precondition is not None:
            x0 = self._precondition.to_x0(model_output, x, point.sigma).to(work)
        else:
            x0 = to_x0(self._prediction_type, model_output, x, point.alpha, point.sigma).to(work)
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteError(
                f"the {self._prediction_type} output at evaluation {self._step_index + 1} (timestep {timestep}, "
                f"alpha={point.alpha:.3g}, sigma={point.sigma:.3g}) gives a NaN/inf data prediction"
                + (": an epsilon prediction says nothing about x0 at zero SNR (alpha = 0); zero-terminal-SNR models "
                   "are trained with prediction_type='v_prediction'" if point.alpha == 0 and self._prediction_type == "epsilon" else "")
            )
        if self._boundary is not None:  # a consistency model: f = c_skip x + c_out x0
            c_skip, c_out = self._boundary[self._step_index]
            x0 = x * c_skip + x0 * c_out
        if self.program.x0_transform is not None:
            x0 = self.program.x0_transform(x0)
        self._step_index += 1
        try:
            self._pending = self._routine.send((x, x0))
            nxt = self._pending.x
        except StopIteration as stop:
            nxt = stop.value
            self._pending = None
        check_state(nxt, self.program, "after step() " + str(self._step_index) + f" of {self.program.nfe}")
        out = nxt.to(sample.dtype)
        self._last_out = out
        denoised = x0.to(sample.dtype)
        if not return_dict:
            return (out, denoised)
        return FewstepSchedulerOutput(prev_sample=out, pred_original_sample=denoised, denoised=denoised)

    # -- the forward process -------------------------------------------------------------------
    def _noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any) -> torch.Tensor:
        ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).flatten()
        if ts.numel() == 0:
            raise ValueError(
                "no timestep to noise to: strength * num_inference_steps < 1 leaves no denoising step "
                "(the pipeline skipped every evaluation); raise strength or num_inference_steps"
            )
        if ts.numel() == 1 and original_samples.shape[0] > 1:
            ts = ts.expand(original_samples.shape[0])
        t = torch.as_tensor(self.schedule.time_from_model_timestep(ts), dtype=torch.float64)
        a = self.schedule.alpha(t).to(original_samples.device, original_samples.dtype)
        s = self.schedule.sigma(t).to(original_samples.device, original_samples.dtype)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return a.reshape(shape) * original_samples + s.reshape(shape) * noise

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at model timesteps ``timesteps`` (img2img, training)."""
        return self._noise(original_samples, noise, timesteps)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The flow forward process at model timesteps ``timestep`` (``FlowMatchEulerDiscreteScheduler``'s
        name, which SD3 / Flux img2img and inpainting pipelines call): ``sigma noise + (1 - sigma) x0``
        on flow schedules, ``alpha x0 + sigma noise`` on any other."""
        if noise is None:
            raise ValueError("scale_noise needs the noise to add")
        return self._noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
