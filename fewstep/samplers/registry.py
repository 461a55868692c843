"""The sampler registry: every sampler is registered once, by name, with its metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fewstep._util import close_matches

if TYPE_CHECKING:
    from fewstep.samplers.core import Program, Setup

__all__ = ["SamplerSpec", "register", "available", "spec"]

# Options every sampler accepts; they act on each data prediction (see core.x0_transform).
COMMON_OPTIONS: dict[str, Any] = {
    "clip_denoised": None,  # float: clamp x0_hat to [-c, c]
    "thresholding": False,  # dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3)
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}


@dataclass(frozen=True)
class SamplerSpec:
    """What a registered sampler is.

    ``order`` is the convergence order of the deterministic solver (0 for samplers that have none:
    consistency samplers, and the time-shift and CFG++ samplers, which move the state by amounts that
    do not shrink with the step); ``stochastic`` whether it draws fresh noise *with its default
    options* (options can change that: ``ddim`` with ``eta > 0``, ``ctm`` with ``gamma > 0``;
    :attr:`fewstep.samplers.core.Program.stochastic` and ``SampleInfo.stochastic`` say what a
    run actually does); ``evals_per_step`` the network evaluations one full step costs;
    ``min_nfe`` the smallest budget it can run with; ``options`` the solver options it accepts,
    with their defaults (a misspelt option is an error, never handed to the network)."""

    name: str
    family: str
    order: int
    evals_per_step: int
    stochastic: bool
    model_kind: Literal["diffusion", "consistency"]
    paper: str
    summary: str
    build: Callable[["Setup"], "Program"] = field(repr=False, compare=False)
    options: Mapping[str, Any] = field(default_factory=dict)
    min_nfe: int = 1
    push_style: bool = True  # evaluation times known before sampling, so diffusers' loop can drive it
    # What the sampler needs from the driver beyond ``D(x, t)`` (core.Eval): "uncond" (the
    # unconditional prediction of a guided denoiser, CFG++) or "target_time" (a model taking the
    # time it jumps to, CTM).  A diffusers pipeline's loop can give neither.
    needs: tuple[str, ...] = ()

    def all_options(self) -> dict[str, Any]:
        opts = dict(COMMON_OPTIONS)
        opts.update(self.options)
        return opts

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "order": self.order,
            "evals_per_step": self.evals_per_step,
            "stochastic": self.stochastic,
            "model_kind": self.model_kind,
            "min_nfe": self.min_nfe,
            "push_style": self.push_style,
            "needs": list(self.needs),
            "paper": self.paper,
            "summary": self.summary,
            "options": dict(self.options),
        }


_REGISTRY: dict[str, SamplerSpec] = {}


def register(**meta: Any) -> Callable[[Callable[["Setup"], "Program"]], Callable[["Setup"], "Program"]]:
    """Decorator registering a program builder ``build(setup) -> Program`` under ``meta["name"]``."""

    def deco(build: Callable[["Setup"], "Program"]) -> Callable[["Setup"], "Program"]:
        s = SamplerSpec(build=build, **meta)
        if s.name in _REGISTRY:
            raise ValueError(f"sampler {s.name!r} is registered twice")
        _REGISTRY[s.name] = s
        return build

    return deco


def _ensure_loaded() -> None:
    import fewstep.samplers  # noqa: F401  (importing the package registers the built-in families)


def available(family: str | None = None, model_kind: str | None = None) -> list[str]:
    """Names of the registered samplers (optionally of one family or model kind), sorted."""
    _ensure_loaded()
    return sorted(
        n
        for n, s in _REGISTRY.items()
        if (family is None or s.family == family) and (model_kind is None or s.model_kind == model_kind)
    )


def spec(name: str) -> SamplerSpec:
    """The metadata of a registered sampler; an unknown name lists the closest ones."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"a sampler is named by a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}{close_matches(name, _REGISTRY)}; "
            f"`fewstep samplers` or fewstep.samplers.available() lists all {len(_REGISTRY)}"
        ) from None
