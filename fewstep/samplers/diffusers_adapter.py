"""The push-style front door: one diffusers scheduler that runs any registered sampler.

``pipe.scheduler = FewstepScheduler.from_config(pipe.scheduler.config, sampler="dpmpp_3m")``
puts a fewstep sampler into any diffusers pipeline that loops over ``scheduler.timesteps`` and
calls ``scheduler.step``.  ``num_inference_steps`` is the NFE budget: the pipeline calls the
network exactly that many times.  The sampler's routine (the same generator that
:func:`fewstep.sample` drives) is advanced one evaluation per ``step`` call, so the two front
doors produce the same tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from fewstep.models.prediction import check_prediction_type, to_x0
from fewstep.samplers.core import Eval, NoiseSource, NonFiniteError, Program, check_state, prepare, validate_options
from fewstep.samplers.registry import spec
from fewstep.schedules import NoiseSchedule, VPDiscrete, diffusers_betas

__all__ = ["FewstepScheduler", "FewstepSchedulerOutput"]


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """``prev_sample`` (the input of the next network call, or the final sample) and
    ``pred_original_sample`` (the data prediction of this call)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


_PUSH_LIMITS = {
    "uncond": "re-noises with the unconditional prediction (CFG++), but a diffusers pipeline combines the "
    "conditional and unconditional outputs itself and hands the scheduler only the guided one; run it with "
    "fewstep.sample(fewstep.models.ClassifierFreeGuidance(...), ...) instead",
    "target_time": "feeds the model the time it jumps to (CTM's G(x, t, s)), which a pipeline's network call "
    "cannot pass; run it with fewstep.sample(...) instead",
}


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


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler wrapping any registered fewstep sampler.

    Config (besides the usual DDPM-family schedule keys, read as diffusers reads them):
        sampler: registered sampler name (``fewstep samplers`` lists them).
        sampler_options: dict of solver options for that sampler.
        boundary_condition: for a distilled consistency student, its ``c_skip``/``c_out``
            boundary condition (``fewstep.distill.BoundaryCondition`` fields), applied to every data
            prediction exactly as the student's own denoiser applies it.
        plan: a sampling plan (``SamplingPlan.to_dict()``, from ``fewstep tune``): it replaces
            sampler, options and spacing, and ``num_inference_steps`` must be its NFE.
        spacing: time-grid spacing name (``None``: the sampler's default).
        final: ``"zero"`` (finish on clean data) or ``"min"`` (stop at timestep 0).
        clip_sample / thresholding (+ ratio, max value): data-prediction processing, as diffusers.

    ``set_timesteps(n)`` plans exactly ``n`` network evaluations; ``timesteps`` holds the model
    timesteps of those evaluations in order.  Samplers that choose their evaluation times while
    sampling cannot run under a pipeline's fixed loop; ``set_timesteps`` says so.
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
        prediction_type: str = "epsilon",
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
        boundary_condition: dict[str, float] | None = None,
        plan: dict[str, Any] | None = None,
    ):
        betas = diffusers_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.schedule: NoiseSchedule = VPDiscrete.from_betas(betas)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)  # read by some pipelines
        self._prediction_type = check_prediction_type(prediction_type, self.schedule)
        self.init_noise_sigma = self.schedule.noise_scale(self.schedule.t_max)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self.program: Program | None = None
        self._reset()
        # Fail at construction on an unknown sampler, option or malformed plan, not at the first step.
        if plan is not None:
            from fewstep.samplers.plan import SamplingPlan

            self._plan = SamplingPlan.from_dict(plan)
            self._plan.check_schedule(self.schedule)
        else:
            self._plan = None
            validate_options(spec(sampler), self._options())

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

    def _program_for(self, nfe: int, grid: Any = None) -> Program:
        return prepare(
            self.config.sampler,
            nfe,
            self.schedule,
            spacing=grid if grid is not None else self.config.spacing,
            end=self.config.final,
            steps_offset=self.config.steps_offset,
            **self._options(),
        )

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``, refusing schedules other than the DDPM family (whose
        keys it would otherwise drop silently, leaving a DDPM schedule in their place)."""
        cfg = dict(config.config if hasattr(config, "config") else (config or {}))
        name = str(cfg.get("_class_name", ""))
        if "beta_schedule" not in cfg and "trained_betas" not in cfg and ("FlowMatch" in name or "shift" in cfg or "sigma_data" in cfg):
            raise ValueError(
                f"FewstepScheduler drives DDPM-family (discrete variance-preserving) schedules, and {name or 'this config'} "
                "is a flow-matching or EDM schedule; sample such models with fewstep.sample(DiffusersDenoiser(model, "
                "scheduler), noise, ...), whose schedule comes from fewstep.schedules.from_diffusers"
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Plan ``num_inference_steps`` network evaluations (or run on the given ``timesteps``,
        one evaluation each, then a final step to the end time)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps (the NFE budget) or timesteps")
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
                raise TypeError(
                    f"num_inference_steps must be a whole number (the NFE budget), got {num_inference_steps!r}"
                )
            num_inference_steps = int(num_inference_steps)
        if self._plan is not None:
            if timesteps is not None or int(num_inference_steps) != self._plan.nfe:
                raise ValueError(
                    f"this scheduler runs a sampling plan tuned for {self._plan.nfe} network evaluations: "
                    f"call it with num_inference_steps={self._plan.nfe}, or tune a plan for the budget you want"
                )
            program = self._plan.program(self.schedule)
        elif timesteps is not None:
            _check_push_style(self.config.sampler)
            ts = [float(t) for t in timesteps]
            end = self.schedule.t_zero if self.config.final == "zero" else self.schedule.t_min
            if spec(self.config.sampler).evals_per_step != 1:
                raise ValueError(
                    f"sampler {self.config.sampler!r} evaluates between grid times, so custom timesteps cannot be "
                    "its evaluation times; pass num_inference_steps instead"
                )
            program = self._program_for(len(ts), grid=ts + [end])
        else:
            _check_push_style(self.config.sampler)
            program = self._program_for(int(num_inference_steps))
        self._install(program, device)

    def _install(self, program: Program, device: str | torch.device | None) -> None:
        if program.eval_times is None:
            raise ValueError(
                f"sampler {self.config.sampler!r} chooses its evaluation times while sampling, which a diffusers "
                "pipeline's fixed timestep loop cannot follow; run it with fewstep.sample(...) instead"
            )
        self.program = program
        self.num_inference_steps = program.nfe
        ts = torch.as_tensor(self.schedule.model_timestep(torch.tensor(program.eval_times, dtype=torch.float64)))
        self._model_times = ts.tolist()
        self._boundary = None
        if self.config.boundary_condition:
            from fewstep.distill.student import BoundaryCondition

            c_skip, c_out = BoundaryCondition(**self.config.boundary_condition).coefficients(
                self.schedule, torch.tensor(program.eval_times, dtype=torch.float64)
            )
            self._boundary = list(zip(c_skip.tolist(), c_out.tolist()))
        integral = bool(torch.all(ts == ts.round()))
        self.timesteps = (ts.to(torch.int64) if integral else ts.to(torch.float32)).to(device)
        self.init_noise_sigma = self.schedule.noise_scale(program.start_time)
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation ``begin_index`` (image-to-image pipelines skip the noisiest part of
        the plan by ``strength``): the rest of the grid is re-planned as a run of its own, from the
        timestep the pipeline noises its input to."""
        if self.program is None:
            raise ValueError("call set_timesteps(num_inference_steps) before set_begin_index()")
        k = int(begin_index)
        if k == 0:
            return
        if not 0 < k < self.program.nfe:
            raise ValueError(f"begin_index must be in [0, {self.program.nfe}), got {begin_index}")
        if self._plan is not None or self.program.spec.evals_per_step != 1:
            raise ValueError(
                f"{'a sampling plan' if self._plan is not None else repr(self.config.sampler)} cannot start part-way: its "
                "evaluations are not one per grid time; for image-to-image use a multistep sampler (dpmpp_2m, unipc_3, ...)"
            )
        device = self.timesteps.device
        self._install(self._program_for(self.program.nfe - k, grid=self.program.grid[k:].tolist()), device)

    def _reset(self) -> None:
        self._routine = None
        self._pending: Eval | None = None
        self._last_out: torch.Tensor | None = None
        self._step_index = 0

    @property
    def step_index(self) -> int:
        return self._step_index

    # -- the loop ------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

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
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor]:
        """Feed one network output; returns the state of the next evaluation (or the result)."""
        if self.program is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if eta:
            raise ValueError(
                f"eta={eta} was passed to step(); FewstepScheduler takes solver options once, in "
                "sampler_options (e.g. sampler='ddim', sampler_options={'eta': ...})"
            )
        if kwargs:
            raise TypeError(f"FewstepScheduler.step got unexpected arguments {sorted(kwargs)}")
        if self._step_index >= self.program.nfe:
            raise ValueError(
                f"step() called {self._step_index + 1} times for {self.program.nfe} planned evaluations; "
                "call set_timesteps again to start a new run"
            )
        work = torch.promote_types(sample.dtype, torch.float32)
        if self._routine is None:
            x = sample.to(work)
            self._routine = self.program.routine(x, NoiseSource(generator))
            self._pending = next(self._routine)
        req = self._pending
        assert req is not None
        point = self.program.eval_points[self._step_index]
        expected = self._model_times[self._step_index]
        got = float(timestep if not isinstance(timestep, torch.Tensor) or timestep.ndim == 0 else timestep.flatten()[0])
        if not math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-3):
            raise ValueError(
                f"step() got timestep {got}, but evaluation {self._step_index + 1} is planned at {expected}; "
                "the pipeline must iterate over scheduler.timesteps in order"
            )
        if not isinstance(model_output, torch.Tensor) or model_output.shape != sample.shape:
            got_shape = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output).__name__
            raise ValueError(
                f"step() got a model output of shape {got_shape} for a sample of shape {tuple(sample.shape)}; "
                "FewstepScheduler needs the network's prediction of the sample's shape (a network with learned "
                "variance outputs twice the channels: pass only the first half)"
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
        x0 = to_x0(self._prediction_type, model_output, x, point.alpha, point.sigma).to(work)
        if not bool(torch.isfinite(x0).all()):
            raise NonFiniteError(
                f"the {self._prediction_type} output at evaluation {self._step_index + 1} (timestep {timestep}, "
                f"alpha={point.alpha:.3g}, sigma={point.sigma:.3g}) gives a NaN/inf data prediction"
                + (": an epsilon prediction says nothing about x0 at zero SNR (alpha = 0); zero-terminal-SNR models "
                   "are trained with prediction_type='v_prediction'" if point.alpha == 0 and self._prediction_type == "epsilon" else "")
            )
        if self._boundary is not None:  # a consistency student: f = c_skip x + c_out x0
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
        if not return_dict:
            return (out,)
        return FewstepSchedulerOutput(prev_sample=out, pred_original_sample=x0.to(sample.dtype))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` at model timesteps ``timesteps`` (img2img, training)."""
        t = timesteps.detach().to("cpu", torch.float64).flatten()
        a = self.schedule.alpha(t).to(original_samples.device, original_samples.dtype)
        s = self.schedule.sigma(t).to(original_samples.device, original_samples.dtype)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return a.reshape(shape) * original_samples + s.reshape(shape) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
