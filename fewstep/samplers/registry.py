"""The sampler registry: every sampler is registered once, by name, with its metadata."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fewstep._util import close_matches

if TYPE_CHECKING:
    from fewstep.samplers.core import Program, Setup

__all__ = ["SamplerSpec", "register", "available", "spec", "resolve", "aliases"]

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
    with their defaults (a misspelt option is an error, never handed to the network);
    ``final_step_evals`` what a step onto clean data costs when it is cheaper than a full step
    (the Euler step that ends k-diffusion's Heun, DPM-2 and DPM++ 2S / SDE samplers), so that
    :meth:`nfe_for_steps` converts k-diffusion's step count into a budget."""

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
    final_step_evals: int | None = None  # None: a step onto clean data costs evals_per_step

    def nfe_for_steps(self, steps: int, ends_on_data: bool) -> int:
        """Network evaluations of ``steps`` solver steps (``len(sigmas) - 1`` in k-diffusion): a
        full step costs ``evals_per_step``, the last one ``final_step_evals`` when it lands on
        clean data."""
        last = self.final_step_evals if ends_on_data and self.final_step_evals is not None else self.evals_per_step
        return self.evals_per_step * (steps - 1) + last

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
            "final_step_evals": self.final_step_evals if self.final_step_evals is not None else self.evals_per_step,
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


# Names users know from k-diffusion, ComfyUI and AUTOMATIC1111 for registered samplers, with the
# options that make them that sampler.  Each is the *same numbers* as the tool it comes from
# (tests/test_k_samplers.py), except where the comment says how it differs.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    # k-diffusion / ComfyUI spellings
    "euler_a": ("euler_ancestral", {}),
    "dpm2": ("dpm_2", {}),
    "dpm2_a": ("dpm_2_ancestral", {}),
    "dpm_2_a": ("dpm_2_ancestral", {}),
    "dpmpp_2s_a": ("dpmpp_2s_ancestral", {}),
    "dpmpp_sde_gpu": ("dpmpp_sde", {}),  # ComfyUI: the same sampler with the Brownian tree on the GPU
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {}),
    # UniPC as ComfyUI / A1111 configure it (bh1; bh2).  ComfyUI runs the UniPC authors' code, which
    # also lowers the order at every step count and ends at sigma = 0.001 instead of 0: not the same
    # numbers (lower_order_final=math.inf gives the authors' order rule).
    "uni_pc": ("unipc_3", {"solver_type": "bh1"}),
    "unipc": ("unipc_3", {"solver_type": "bh1"}),
    "uni_pc_bh2": ("unipc_3", {"solver_type": "bh2"}),
    # AUTOMATIC1111's old k_ names
    "k_euler": ("euler", {}),
    "k_euler_a": ("euler_ancestral", {}),
    "k_euler_ancestral": ("euler_ancestral", {}),
    "k_heun": ("heun", {}),
    "k_dpm_2": ("dpm_2", {}),
    "k_dpm_2_a": ("dpm_2_ancestral", {}),
    "k_dpm_2_ancestral": ("dpm_2_ancestral", {}),
    "k_lms": ("lms", {}),
}


def aliases() -> dict[str, str]:
    """``{alias: registered name}``."""
    return {k: v[0] for k, v in _ALIASES.items()}


def _normalise(name: str) -> str:
    """AUTOMATIC1111's display names to the snake-case ones: ``"DPM++ 2M Karras"`` ->
    ``dpmpp_2m_karras``, ``"Euler a"`` -> ``euler_a``."""
    out = name.strip().lower().replace("++", "pp")
    for ch in " -":
        out = out.replace(ch, "_")
    while "__" in out:
        out = out.replace("__", "_")
    return out


def _exact(name: str) -> tuple[SamplerSpec, dict[str, Any]] | None:
    if name in _REGISTRY:
        return _REGISTRY[name], {}
    if name in _ALIASES:
        target, presets = _ALIASES[name]
        return _REGISTRY[target], dict(presets)
    return None


def resolve(name: str) -> tuple[SamplerSpec, dict[str, Any], str | None]:
    """``(spec, preset options, spacing or None)`` for a registered name, an alias, an
    AUTOMATIC1111 display name or a combined ``<sampler>_<spacing>`` name (``dpmpp_2m_karras``,
    ``euler_a_sgm_uniform``, ``"DPM++ SDE Karras"``); an unknown name lists the closest ones."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"a sampler is named by a string, got {type(name).__name__}")
    for candidate in dict.fromkeys((name, _normalise(name))):
        found = _exact(candidate)
        if found is not None:
            return found[0], found[1], None
    from fewstep.schedules import SPACINGS

    key = _normalise(name)
    for sp in sorted(SPACINGS, key=len, reverse=True):  # longest first: ddim_uniform before uniform-like tails
        if key.endswith("_" + sp):
            found = _exact(key[: -len(sp) - 1])
            if found is not None:
                return found[0], found[1], sp
    known = [*_REGISTRY, *_ALIASES]
    raise ValueError(
        f"unknown sampler {name!r}{close_matches(key, known)}; `fewstep samplers` or fewstep.samplers.available() "
        f"lists all {len(_REGISTRY)} (aliases: {', '.join(sorted(_ALIASES))}; a spacing can be appended, e.g. dpmpp_2m_karras)"
    )


def spec(name: str) -> SamplerSpec:
    """The metadata of a registered sampler (aliases and ``<sampler>_<spacing>`` names give the
    sampler they name); an unknown name lists the closest ones."""
    return resolve(name)[0]
