"""ODE steps over one interval of a training grid, taken from the sampler registry.

Consistency distillation needs the teacher's ODE solution from ``t_{n+1}`` to ``t_n`` for every
sample of a batch, each sample on its own interval.  Nothing here is solver maths: a registered
deterministic sampler's *builder* prepares the program for one interval (through
:class:`IntervalSetup`, a :class:`fewstep.samplers.core.Setup` whose grid subdivides
``[t_hi, t_lo]``), and :class:`IntervalSolver` drives the programs of all intervals present in a
batch *in lockstep*: every sampler spends the same number of evaluations on any interval, so each
round of evaluations is one batched denoiser call with a per-sample time tensor.

The same driver moves a multistep-consistency student to its segment's edge (DDIM, Heek et al.
2024), so that map also comes from the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fewstep._util import tree_map
from fewstep.models.prediction import time_tensor
from fewstep.samplers.core import NoiseSource, Program, Setup, validate_options
from fewstep.samplers.registry import SamplerSpec, spec
from fewstep.schedules import NoiseSchedule

__all__ = ["IntervalSetup", "IntervalSolver", "AdaptersOff"]


@dataclass
class IntervalSetup(Setup):
    """A :class:`Setup` whose grid runs from ``interval[0]`` down to ``interval[1]``, subdivided
    uniformly in time into as many steps as the sampler's builder asks for (one, for a sampler run
    with ``nfe`` equal to its evaluations per step)."""

    interval: tuple[float, float] = (0.0, 0.0)

    def grid(self, num_steps: int) -> torch.Tensor:
        if num_steps < 1:
            raise ValueError(f"{self.spec.name} cannot run with nfe={self.nfe}: minimum is {self.spec.min_nfe}")
        hi, lo = self.interval
        return torch.linspace(hi, lo, num_steps + 1, dtype=torch.float64)

    def ends_on_data(self) -> bool:
        return self.schedule.sigma(float(self.interval[1])) == 0.0


class IntervalSolver:
    """A registered deterministic diffusion sampler applied over per-sample intervals.

    Args:
        sampler: registry name (``ddim``, ``dpmpp_2s``, ``dpmpp_2m``, ``heun``, ...).
        schedule: the teacher's schedule.
        nfe: evaluations per interval; default the sampler's ``evals_per_step`` (one step).  A
            multistep sampler (``dpmpp_2m``) on one interval with ``nfe=1`` is its first-order
            start, i.e. DDIM; give it ``nfe >= 2`` to subdivide the interval and reach its order.
        options: the sampler's own options (data-prediction transforms are not applied here).
    """

    def __init__(self, sampler: str, schedule: NoiseSchedule, nfe: int | None = None, options: Mapping[str, Any] | None = None):
        s = self.check(sampler, options)
        options = dict(options or {})
        self.spec = s
        self.schedule = schedule
        self.nfe = int(nfe) if nfe is not None else s.evals_per_step
        if self.nfe < s.min_nfe:
            raise ValueError(f"{sampler} needs at least nfe={s.min_nfe} per interval, got {self.nfe}")
        self.options = validate_options(s, options)
        self._programs: dict[tuple[float, float], Program] = {}

    @staticmethod
    def check(sampler: str, options: Mapping[str, Any] | None = None) -> SamplerSpec:
        """The sampler's spec, after checking it can take a teacher step with these options."""
        s = spec(sampler)
        if s.model_kind != "diffusion" or s.stochastic:
            raise ValueError(
                f"the teacher's ODE step must be a deterministic diffusion sampler; {sampler!r} is "
                f"{'stochastic' if s.stochastic else s.model_kind}. Use e.g. 'ddim', 'dpmpp_2s' or 'dpmpp_2m'"
            )
        needs = tuple(getattr(s, "needs", ()) or ())
        if needs:
            raise ValueError(f"{sampler!r} needs {', '.join(needs)} from its driver, which a teacher step does not provide; use e.g. 'ddim' or 'dpmpp_2s'")
        bad = [k for k in (options or {}) if k not in s.options]
        if bad:
            raise TypeError(
                f"{sampler} takes no option {bad[0]!r} for a teacher step; its own options are "
                f"{', '.join(sorted(s.options)) or '(none)'} (clipping/thresholding is not applied to teacher steps)"
            )
        return s

    def program(self, t_hi: float, t_lo: float) -> Program:
        """The (cached) program from ``t_hi`` down to ``t_lo``."""
        key = (float(t_hi), float(t_lo))
        prog = self._programs.get(key)
        if prog is None:
            if not key[0] > key[1]:
                raise ValueError(f"an interval must run from a noisier to a cleaner time, got {key}")
            prog = self.spec.build(IntervalSetup(self.spec, self.schedule, self.nfe, dict(self.options), interval=key))
            if prog.eval_times is not None and len(prog.eval_times) != self.nfe:
                raise RuntimeError(f"internal error: {self.spec.name} planned {len(prog.eval_times)} evaluations for nfe={self.nfe}")
            self._programs[key] = prog
        return prog

    def __call__(
        self,
        denoiser: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t_hi: torch.Tensor,
        t_lo: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The sampler's solution at ``t_lo[b]`` from ``x[b]`` at ``t_hi[b]``, for every sample ``b``.

        ``cond`` values that are tensors with ``B`` rows are per-sample (they follow their
        sample), also inside nested dicts (SDXL's ``added_cond_kwargs``); anything else is passed
        to every call as it is.  Samples with ``t_hi == t_lo``
        are returned unchanged.  Gradients flow through the denoiser's outputs (the student's map
        to its segment edge is trained through this)."""
        b = x.shape[0]
        hi = t_hi.detach().to("cpu", torch.float64).flatten()
        lo = t_lo.detach().to("cpu", torch.float64).flatten()
        if hi.numel() != b or lo.numel() != b:
            raise ValueError(f"need one start and one end time per sample ({b}), got {hi.numel()} and {lo.numel()}")
        cond = dict(cond or {})
        keys = list(zip(hi.tolist(), lo.tolist()))
        groups: dict[tuple[float, float], list[int]] = {}
        for i, k in enumerate(keys):
            if k[0] != k[1]:
                groups.setdefault(k, []).append(i)
        work = torch.promote_types(x.dtype, torch.float32)
        if not groups:
            return x.to(work)
        order = [i for idx in groups.values() for i in idx]
        index = torch.tensor(order, device=x.device)
        sizes = [len(idx) for idx in groups.values()]
        cond_g = tree_map(lambda v: v.index_select(0, index.to(v.device)) if _per_sample(v, b) else v, cond)
        routines = []
        reqs = []
        for key, xg in zip(groups, x.to(work).index_select(0, index).split(sizes)):
            r = self.program(*key).routine(xg, NoiseSource())
            routines.append(r)
            reqs.append(next(r))
        results: list[torch.Tensor | None] = [None] * len(routines)
        for _ in range(self.nfe):
            xs = torch.cat([q.x for q in reqs])
            times = torch.cat([_times(q.t, n) for n, q in zip(sizes, reqs)])
            d = denoiser(xs, time_tensor(times, x.device), **cond_g)
            if d.shape != xs.shape:
                raise ValueError(f"the denoiser returned shape {tuple(d.shape)} for input shape {tuple(xs.shape)}")
            for j, (r, q, dj) in enumerate(zip(routines, reqs, d.to(work).split(sizes))):
                try:
                    reqs[j] = r.send((q.x, dj))
                except StopIteration as stop:
                    results[j] = stop.value
        if any(v is None for v in results):
            raise RuntimeError(f"internal error: {self.spec.name} did not finish an interval in nfe={self.nfe} evaluations")
        out_g = torch.cat(results)  # type: ignore[arg-type]
        out = x.to(work).clone() if len(order) < b else torch.empty_like(out_g)
        return out.index_copy(0, index, out_g)


def _times(t: float | torch.Tensor, n: int) -> torch.Tensor:
    """Per-sample times of one request (samplers may ask for one time per sample)."""
    if isinstance(t, torch.Tensor) and t.ndim:
        return t.detach().to("cpu", torch.float64).flatten()
    return torch.full((n,), float(t), dtype=torch.float64)


def _per_sample(v: Any, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch and batch > 1


class AdaptersOff(torch.nn.Module):
    """The base network of a model carrying LoRA adapters (diffusers' peft integration): calls run
    with the adapters disabled, so the teacher is the student's own frozen weights (LCM-LoRA,
    Luo et al. 2023b)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        if not (hasattr(network, "disable_adapters") and hasattr(network, "enable_adapters")):
            raise TypeError(
                f"{type(network).__name__} has no peft adapters to switch off; add them with "
                "network.add_adapter(peft.LoraConfig(...)) (diffusers models) before distilling"
            )
        self.__dict__["_net"] = network  # not a submodule: its weights belong to the student

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        net = self.__dict__["_net"]
        net.disable_adapters()
        try:
            return net(*args, **kwargs)
        finally:
            net.enable_adapters()
