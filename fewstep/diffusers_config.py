"""How fewstep reads a diffusers scheduler config: every key accounted for.

A diffusers scheduler config mixes four things: the noise schedule the model was trained with, what
the network predicts, the sampling grid and final step the scheduler chose, and the settings of the
scheduler's own solver.  :func:`read_config` reads all of them, for both front doors
(:func:`fewstep.schedules.from_diffusers` for ``DiffusersDenoiser``, and
``FewstepScheduler.from_config``), from two explicit tables:

* :data:`CLASSES`: every scheduler class diffusers exports (0.33 to 0.42), with the family of its
  schedule (``vp``, ``flow``, ``edm``) or the reason fewstep refuses it;
* :data:`KEYS`: every config key of those classes, with what it does and how fewstep treats it.

The kinds of :data:`KEYS`:

========== ===================================================================================
schedule   defines the noise schedule: always honoured (both doors)
prediction what the network outputs: honoured
pipeline   read by pipelines from ``scheduler.config`` (Flux's ``mu``): kept in the config
grid       the scheduler's time grid: followed when *set* (see below), through the source
           scheduler's own grid (``spacing="diffusers"``)
final      where the last step lands: honoured when set (``final="zero"`` / ``"min"``)
processing clipping / thresholding of the data prediction: honoured when set
consistency LCM's skipping-step grid and boundary condition: honoured for consistency samplers
variance   a network that also outputs its variance: the variance half is dropped
solver     the replaced scheduler's own solver settings: no effect (``sampler=`` is the solver)
none       no effect on the result, for the reason given
refuse     a ``ValueError`` naming the key and what to do
========== ===================================================================================

**Set or default.**  A grid or final-step key is *set* when its value differs from its class's
default, or when it was passed to ``FewstepScheduler.from_config``: a value at the class default
expresses no choice of the model's authors (diffusers writes every key, so every config carries
the historical default of each), and fewstep's measured-best default grid applies; a set key (a
zero-SNR model's ``trailing``, a Karras config, ``set_alpha_to_one=False``) is followed.  A
processing key (clipping, thresholding: they belong to the data's range) follows diffusers' own
rule: set unless it is in ``_use_default_values`` (the keys a scheduler was built without;
diffusers itself drops them when switching classes).  Schedule and prediction keys are always
honoured, whatever ``_use_default_values`` says (diffusers' own class switching would replace
them by the new class's defaults: ``KDPM2DiscreteScheduler``'s default ``beta_start`` is 0.00085).

A key in neither table (a newer diffusers) is a ``ValueError`` naming it: fewstep accepts only
what it understands.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fewstep.schedules import EDM, FlowMatching, NoiseSchedule, VPDiscrete, VPSigma, diffusers_alphas_cumprod

__all__ = ["KEYS", "CLASSES", "ReadConfig", "read_config", "key_table_markdown"]


# ---------------------------------------------------------------------------------------------
# The classes
# ---------------------------------------------------------------------------------------------

_NOT_GAUSSIAN = "is a scheduler for a masked / discrete-token model, not a Gaussian diffusion or flow schedule"
_SCORE_SDE = (
    "drives a score-SDE predictor-corrector loop of a score network; wrap the network with "
    "fewstep.models.PredictionDenoiser on a schedule you build (fewstep.schedules.EDM or VPContinuous) "
    "and sample it with fewstep.sample"
)
_UNKNOWN = (
    "parameterises its model in a way fewstep does not implement; sample it with its own scheduler, or "
    "build the schedule yourself (fewstep.schedules) and wrap the network (fewstep.models.PredictionDenoiser)"
)

#: class name -> ``("vp" | "flow" | "edm", default sampler or None)`` or ``("refuse", reason)``.
#: The default sampler is used by ``FewstepScheduler.from_config`` only when ``sampler=`` is not
#: given: a consistency model needs its own sampler (a diffusion solver on it is garbage); for a
#: diffusion model ``None`` keeps fewstep's default sampler.
CLASSES: dict[str, tuple[str, str | None]] = {
    # variance-preserving, discrete training timesteps (also flow when use_flow_sigmas=True)
    "DDPMScheduler": ("vp", None),
    "DDPMParallelScheduler": ("vp", None),
    "DDIMScheduler": ("vp", None),
    "DDIMParallelScheduler": ("vp", None),
    "PNDMScheduler": ("vp", None),
    "LMSDiscreteScheduler": ("vp", None),
    "EulerDiscreteScheduler": ("vp", None),
    "EulerAncestralDiscreteScheduler": ("vp", None),
    "HeunDiscreteScheduler": ("vp", None),
    "KDPM2DiscreteScheduler": ("vp", None),
    "KDPM2AncestralDiscreteScheduler": ("vp", None),
    "DPMSolverMultistepScheduler": ("vp", None),
    "DPMSolverSinglestepScheduler": ("vp", None),
    "DPMSolverSDEScheduler": ("vp", None),
    "DEISMultistepScheduler": ("vp", None),
    "UniPCMultistepScheduler": ("vp", None),
    "SASolverScheduler": ("vp", None),
    "CogVideoXDDIMScheduler": ("vp", None),
    "CogVideoXDPMScheduler": ("vp", None),
    "LCMScheduler": ("vp", "lcm"),
    "TCDScheduler": ("vp", "tcd"),
    # flow matching
    "FlowMatchEulerDiscreteScheduler": ("flow", None),
    "FlowMatchHeunDiscreteScheduler": ("flow", None),
    # EDM
    "EDMEulerScheduler": ("edm", None),
    "EDMDPMSolverMultistepScheduler": ("edm", None),
    "CosineDPMSolverMultistepScheduler": ("edm", None),
    # refused, with the reason
    "AmusedScheduler": ("refuse", _NOT_GAUSSIAN),
    "VQDiffusionScheduler": ("refuse", _NOT_GAUSSIAN),
    "BlockRefinementScheduler": ("refuse", _NOT_GAUSSIAN),
    "EntropyBoundScheduler": ("refuse", _NOT_GAUSSIAN),
    "DDIMInverseScheduler": ("refuse", "inverts images into noise (it runs the ODE towards noise); FewstepScheduler samples"),
    "DPMSolverMultistepInverseScheduler": ("refuse", "inverts images into noise (it runs the ODE towards noise); FewstepScheduler samples"),
    "RePaintScheduler": ("refuse", "runs RePaint's resampling loop (it jumps back up in noise), which no fewstep sampler does"),
    "KarrasVeScheduler": ("refuse", _SCORE_SDE),
    "ScoreSdeVeScheduler": ("refuse", _SCORE_SDE),
    "ScoreSdeVpScheduler": ("refuse", _SCORE_SDE),
    "UnCLIPScheduler": ("refuse", "is UnCLIP's learned-variance prior/decoder loop, " + _UNKNOWN),
    "DDPMWuerstchenScheduler": ("refuse", "uses Wuerstchen's own continuous cosine schedule, which fewstep does not implement"),
    "ConsistencyDecoderScheduler": ("refuse", "belongs to a consistency VAE decoder, not to a sampler fewstep replaces"),
    "CMStochasticIterativeScheduler": (
        "refuse",
        "applies CM's own c_noise = 250 ln(sigma) and boundary condition inside the scheduler; wrap the network "
        "yourself (fewstep.models.PredictionDenoiser on fewstep.schedules.EDM, boundary condition as in "
        "fewstep.distill.ConsistencyStudent) and sample with fewstep.sample(..., 'cm_multistep', ...)",
    ),
    "SCMScheduler": ("refuse", "uses sCM's TrigFlow parameterisation, which fewstep does not implement"),
    "IPNDMScheduler": ("refuse", "uses iPNDM's own fixed schedule (no noise schedule in its config), " + _UNKNOWN),
    "FlowMatchLCMScheduler": ("refuse", "changes the latent resolution between steps (scale_factors, upscale_mode)"),
    "FlowMapEulerDiscreteScheduler": ("refuse", _UNKNOWN),
    "LTXEulerAncestralRFScheduler": ("refuse", _UNKNOWN),
    "HeliosScheduler": ("refuse", _UNKNOWN),
    "HeliosDMDScheduler": ("refuse", _UNKNOWN),
    "PiflowScheduler": ("refuse", _UNKNOWN),
    "RFD4ProteinaScheduler": ("refuse", _UNKNOWN),
    "MiniMaxH3Scheduler": ("refuse", _UNKNOWN),
    "DiscreteDDIMScheduler": ("refuse", _NOT_GAUSSIAN),
}


# ---------------------------------------------------------------------------------------------
# The keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key: its ``kind`` (module docstring) and what it does / how it is treated."""

    kind: str
    how: str


_SOLVER = "a setting of the replaced scheduler's own solver; FewstepScheduler's solver is sampler= (with sampler_options)"
_REFUSED_CLASS = "only in a refused class (CLASSES says why)"

KEYS: dict[str, Key] = {
    # -- the noise schedule -------------------------------------------------------------------
    "num_train_timesteps": Key("schedule", "VP: N training timesteps; flow: model timestep N t; EDM: no effect (EDM's time is sigma)"),
    "beta_start": Key("schedule", "VP betas, built exactly as diffusers (float32)"),
    "beta_end": Key("schedule", "VP betas, built exactly as diffusers (float32)"),
    "beta_schedule": Key("schedule", "linear / scaled_linear / squaredcos_cap_v2; any other value is refused"),
    "trained_betas": Key("schedule", "VP betas given as a list"),
    "rescale_betas_zero_snr": Key("schedule", "zero terminal SNR (Lin et al. 2024, Algorithm 1): alpha(t_max) = 0 exactly"),
    "snr_shift_scale": Key("schedule", "CogVideoX's SNR shift: alphas_cumprod / (s + (1 - s) alphas_cumprod), before zero-SNR rescaling"),
    "timestep_type": Key("schedule", "'continuous' with v_prediction: VPSigma (the network sees 0.25 ln(sigma)); otherwise discrete, as diffusers"),
    "sigma_min": Key("schedule", "EDM / VPSigma: lowest noise level; VP discrete: the Karras/exponential/beta grid's end (a grid key there)"),
    "sigma_max": Key("schedule", "EDM / VPSigma: highest noise level; VP discrete: the Karras/exponential/beta grid's start (a grid key there)"),
    "sigma_data": Key("schedule", "EDM preconditioning's data standard deviation (c_in, c_skip, c_out)"),
    "shift": Key("schedule", "flow: SD3's resolution shift (it places fewstep's default 'shifted' grid)"),
    "use_flow_sigmas": Key("schedule", "True: a flow-matching model (SANA, Wan) under a DPM-Solver/UniPC/DEIS/SA-Solver config"),
    "flow_shift": Key("schedule", "flow shift of use_flow_sigmas configs (as shift)"),
    "invert_sigmas": Key("schedule", "False: no effect; True (Mochi's inverted sigmas) is refused"),
    "use_dynamic_shifting": Key("schedule", "flow: the shift comes from the mu the pipeline passes to set_timesteps (required then, as in diffusers)"),
    "time_shift_type": Key("schedule", "how mu becomes the shift: 'exponential' (shift = e^mu), 'linear' (shift = mu)"),
    # -- what the network predicts --------------------------------------------------------------
    "prediction_type": Key("prediction", "epsilon / v_prediction / sample / flow_prediction; EDM configs: EDM's F (+c_out) / -F / sample"),
    # -- read by pipelines ------------------------------------------------------------------------
    "base_shift": Key("pipeline", "kept in the config: Flux/SD3 pipelines compute mu from it"),
    "max_shift": Key("pipeline", "kept in the config: Flux/SD3 pipelines compute mu from it"),
    "base_image_seq_len": Key("pipeline", "kept in the config: Flux/SD3 pipelines compute mu from it"),
    "max_image_seq_len": Key("pipeline", "kept in the config: Flux/SD3 pipelines compute mu from it"),
    # -- the grid and the final step ---------------------------------------------------------------
    "timestep_spacing": Key("grid", "linspace / leading / trailing: followed when set, as the source scheduler spaces them"),
    "steps_offset": Key("grid", "offset of the leading spacing (fewstep's spacing='leading' takes it too)"),
    "use_karras_sigmas": Key("grid", "True: the source scheduler's Karras sigmas"),
    "use_exponential_sigmas": Key("grid", "True: the source scheduler's exponential sigmas (uniform log-SNR)"),
    "use_beta_sigmas": Key("grid", "True: the source scheduler's beta sigmas (Lee et al. 2024)"),
    "use_lu_lambdas": Key("grid", "True: DPM-Solver's uniform-lambda grid (Lu et al. 2022)"),
    "lambda_min_clipped": Key("grid", "DPM-Solver's clipping of the grid's start in log-SNR (cosine schedules)"),
    "interpolation_type": Key("grid", "Euler's interpolation of sigmas ('log_linear' spaces them in log sigma)"),
    "sigma_schedule": Key("grid", "EDM: 'karras' or 'exponential' grid"),
    "rho": Key("grid", "EDM: the Karras grid's rho"),
    "shift_terminal": Key("grid", "flow: the grid stretched to end at this sigma (LTX-Video)"),
    "final_sigmas_type": Key("final", "'zero': the last step lands on clean data; 'sigma_min': at the lowest training noise level"),
    "set_alpha_to_one": Key("final", "True: the last step lands on clean data; False: at training timestep 0"),
    # -- data-prediction processing ----------------------------------------------------------------
    "clip_sample": Key("processing", "clamp x0_hat to [-clip_sample_range, clip_sample_range] (option clip_denoised)"),
    "clip_sample_range": Key("processing", "the clamp range of clip_sample"),
    "thresholding": Key("processing", "dynamic thresholding (Saharia et al. 2022)"),
    "dynamic_thresholding_ratio": Key("processing", "dynamic thresholding's quantile"),
    "sample_max_value": Key("processing", "dynamic thresholding's largest threshold"),
    # -- consistency models ---------------------------------------------------------------------------
    "original_inference_steps": Key("consistency", "LCM/TCD's skipping-step grid: the option original_inference_steps of lcm / tcd; no effect on other samplers"),
    "timestep_scaling": Key("consistency", "LCMScheduler: its boundary condition c_skip / c_out (scale); TCDScheduler applies none: no effect"),
    # -- learned variance -----------------------------------------------------------------------------
    "variance_type": Key("variance", "learned / learned_range: the network outputs 2C channels, the first C are used; fixed_*: DDPM's ancestral noise, no effect"),
    # -- the replaced scheduler's own solver: no effect ----------------------------------------------
    "solver_order": Key("solver", _SOLVER),
    "algorithm_type": Key("solver", _SOLVER),
    "solver_type": Key("solver", _SOLVER),
    "lower_order_final": Key("solver", _SOLVER),
    "euler_at_final": Key("solver", _SOLVER),
    "predict_x0": Key("solver", _SOLVER),
    "solver_p": Key("solver", _SOLVER),
    "disable_corrector": Key("solver", _SOLVER),
    "predictor_order": Key("solver", _SOLVER),
    "corrector_order": Key("solver", _SOLVER),
    "tau_func": Key("solver", _SOLVER),
    "skip_prk_steps": Key("solver", _SOLVER),
    "noise_sampler_seed": Key("solver", _SOLVER),
    "s_noise": Key("solver", _SOLVER),
    "stochastic_sampling": Key("solver", "FlowMatchEuler's re-noising sampler; without sampler=, True selects cm_multistep (the same algorithm)"),
    # -- only in refused classes -----------------------------------------------------------------------
    **{
        k: Key("refuse", _REFUSED_CLASS)
        for k in (
            "alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end", "num_vec_classes", "mask_token_id",
            "masking_schedule", "block_length", "editing_threshold", "minimal_topk", "threshold", "entropy_bound", "t_min",
            "t_max", "eps", "final_step_size_scale", "n_grid", "num_policy_substeps", "noise_mode", "schedule_mode",
            "t_lim_ode", "t_lim_ode_below", "tail_step_multiplier", "tail_steps", "tsr_k", "tsr_sigma", "gamma",
            "stage_range", "stages", "scheduler_type", "correct_steps", "snr", "sampling_eps", "beta_min", "beta_max", "s",
            "scaler", "corrector_k", "corrector_selection", "corrector_selection_tau", "corrector_steps",
            "num_inference_steps", "scale_factors", "upscale_mode", "kwargs", "eta", "s_churn", "s_min", "s_max",
            "clip_denoised",
        )
    },
}

#: Grid keys that only modify another grid key's grid (see read_config).
GRID_MODIFIERS = ("steps_offset", "rho")

#: Which source scheduler each family's pipelines expect when FewstepScheduler has no source config.
SYNTHETIC_SOURCE = {"flow": "FlowMatchEulerDiscreteScheduler", "edm": "EDMEulerScheduler"}


def key_table_markdown() -> str:
    """:data:`KEYS` as a Markdown table (for docs/design.md)."""
    lines = ["| key | kind | how |", "|---|---|---|"]
    for k in sorted(KEYS):
        lines.append(f"| `{k}` | {KEYS[k].kind} | {KEYS[k].how} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class ReadConfig:
    """What a diffusers scheduler config means, key by key (see the module docstring)."""

    class_name: str | None
    family: str  # "vp_discrete", "vp_sigma", "flow", "edm"
    schedule: NoiseSchedule
    prediction_type: str | None
    source: dict[str, Any]  # the config with overrides applied (JSON-ready), for the source's own grid
    grid_keys: list[str] = field(default_factory=list)  # grid keys set: follow the source's grid
    end: str | None = None  # "zero" / "min" from set final keys (or the class's own rule), else None
    processing: dict[str, Any] = field(default_factory=dict)  # FewstepScheduler processing kwargs that were set
    sampler: str | None = None  # the class's own sampler (consistency models), else None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    boundary_condition: dict[str, float] | None = None
    learned_variance: bool = False
    flow: dict[str, Any] = field(default_factory=dict)  # shift, dynamic-shifting keys
    notes: list[str] = field(default_factory=list)
    schedule_keys: dict[str, Any] = field(default_factory=dict)  # FewstepScheduler's keys for this schedule
    steps_offset: int = 0
    ambiguous: list[str] = field(default_factory=list)  # other classes the keys fit (same schedule, other sampler)
    spacing: str | None = None  # a fewstep spacing equal to the config's grid (configs without _class_name)


def _plain(v: Any) -> Any:
    """JSON-ready copy of a config value."""
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _as_mapping(config_or_scheduler: Any) -> dict[str, Any]:
    if isinstance(config_or_scheduler, Mapping):
        return dict(config_or_scheduler)
    if hasattr(config_or_scheduler, "config"):
        cfg = dict(config_or_scheduler.config)
        cfg.setdefault("_class_name", type(config_or_scheduler).__name__)
        return cfg
    raise TypeError(
        f"expected a diffusers scheduler or its config mapping, got {type(config_or_scheduler).__name__}"
    )


def class_defaults(class_name: str | None) -> dict[str, Any]:
    """The ``__init__`` defaults of a diffusers scheduler class ({} if diffusers lacks it)."""
    cls = diffusers_class(class_name)
    if cls is None:
        return {}
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }


def diffusers_class(class_name: str | None) -> type | None:
    if not class_name:
        return None
    try:
        import diffusers
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    return getattr(diffusers, class_name, None)


@functools.lru_cache(maxsize=None)
def _installed_classes() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, ``__init__`` parameters in order) of every scheduler class this diffusers exports, and
    of FewstepScheduler."""
    import diffusers.schedulers as schedulers

    out = []
    for name in sorted(dir(schedulers)):
        if not name.endswith("Scheduler") or "Flax" in name:
            continue
        try:
            cls = getattr(schedulers, name)
        except Exception:  # an optional dependency missing (torchsde, scipy)
            continue
        if inspect.isclass(cls):
            out.append((name, tuple(k for k in inspect.signature(cls.__init__).parameters if k != "self")))
    from fewstep.samplers.diffusers_adapter import FewstepScheduler

    out.append(("FewstepScheduler", tuple(k for k in inspect.signature(FewstepScheduler.__init__).parameters if k != "self")))
    return tuple(out)


def class_parameters(class_name: str | None) -> tuple[str, ...] | None:
    for name, params in _installed_classes():
        if name == class_name:
            return params
    return None


def _all_parameters() -> set[str]:
    return {k for _, params in _installed_classes() for k in params}


def infer_class(cfg: Mapping[str, Any]) -> str | None:
    """The scheduler class of a config without ``_class_name`` (``scheduler.config`` in memory
    carries none; diffusers adds it only when saving).  A scheduler registers its ``__init__``
    keys first, in signature order, and ``from_config`` appends the keys of the class it was
    switched from after them (diffusers keeps them "for compatible classes"), so the class is the
    one whose parameters are the config's leading keys (the longest such).  ``None`` when no class
    matches (a hand-written mapping: read by its keys).  Classes with the same keys and the same
    family (DDIM / DDIMParallel, LMS / KDPM2, LCM / TCD ...) read the same schedule; a tie between
    families is an error asking for the scheduler itself."""
    keys = [k for k in cfg if not k.startswith("_")]
    matches: list[tuple[int, str]] = []
    for name, params in _installed_classes():
        if params and tuple(keys[: len(params)]) == params:
            matches.append((len(params), name))
    if not matches:
        return None
    longest = max(n for n, _ in matches)
    names = [m for n, m in matches if n == longest]
    if "FewstepScheduler" in names:
        return "FewstepScheduler"
    families = {CLASSES.get(m, ("unknown", m))[0] for m in names}
    if len(families) > 1 or "refuse" in families or "unknown" in families:
        raise ValueError(
            f"this config has no _class_name and its keys fit {', '.join(names)}, which mean different things to "
            "fewstep; pass the scheduler itself (FewstepScheduler.from_config(pipe.scheduler)) or add its _class_name"
        )
    return names[0]


def source_class(config_or_scheduler: Any) -> str | None:
    """The scheduler class a config (or scheduler) belongs to: its ``_class_name``, else inferred."""
    cfg = _as_mapping(config_or_scheduler)
    name = cfg.get("_class_name")
    return str(name) if name else infer_class(cfg)


def same_key_classes(class_name: str, cfg: Mapping[str, Any]) -> list[str]:
    """Other accepted classes with exactly ``class_name``'s keys whose default sampler differs
    (``LCMScheduler`` / ``TCDScheduler``): the schedule is the same, the sampler is not."""
    mine = CLASSES.get(class_name, ("", None))
    params = class_parameters(class_name)
    return [
        name for name, meaning in CLASSES.items()
        if name != class_name and meaning[0] == mine[0] and meaning[1] != mine[1] and class_parameters(name) == params
    ]


def _family_of(class_name: str | None, cfg: Mapping[str, Any]) -> str:
    if class_name:
        if class_name not in CLASSES:
            raise ValueError(
                f"fewstep cannot tell the noise schedule of {class_name!r}: it does not know this scheduler class (a "
                f"newer diffusers?). {class_name} {_UNKNOWN}"
            )
        fam, extra = CLASSES[class_name]
        if fam == "refuse":
            raise ValueError(f"{class_name} {extra}")
        return fam
    # a plain mapping without _class_name: tell the family by its keys
    if "beta_schedule" in cfg or "trained_betas" in cfg:
        return "vp"
    if "shift" in cfg:
        return "flow"
    if "sigma_data" in cfg:
        return "edm"
    raise ValueError(
        "cannot tell the noise schedule of this config: it has no _class_name and no beta_schedule, trained_betas, "
        "shift or sigma_data; pass the scheduler itself (or its config) or build the schedule directly "
        "(fewstep.schedules.VPDiscrete, VPContinuous, EDM, FlowMatching)"
    )


def _own_keys(class_name: str | None, cfg: dict[str, Any], overrides: Mapping[str, Any]) -> list[str]:
    """Drop (and return) the keys diffusers carried along from other classes: keys that are not
    parameters of ``class_name`` but are parameters of another installed scheduler class (diffusers
    keeps them "for compatible classes"; the class itself ignores them).  A key that is a parameter
    of no installed class stays, and :func:`_check_keys` refuses it (a newer diffusers)."""
    params = class_parameters(class_name)
    if params is None:
        return []
    everything = _all_parameters()
    hidden = [k for k in cfg if not k.startswith("_") and k not in params and k in everything and k not in overrides]
    for k in overrides:
        if k not in params:
            raise ValueError(
                f"{k!r} is not a setting of {class_name}, so it has no meaning for this config; pass it only with a "
                "scheduler that has it"
            )
    for k in hidden:
        del cfg[k]
    return hidden


def _check_keys(class_name: str | None, cfg: Mapping[str, Any]) -> None:
    where = class_name or "the config"
    for k, v in cfg.items():
        if k.startswith("_"):
            continue  # diffusers' bookkeeping (_class_name, _diffusers_version, _use_default_values)
        key = KEYS.get(k)
        if key is None:
            raise ValueError(
                f"{where} has the config key {k!r}={v!r}, which fewstep does not know (a newer diffusers?): it cannot "
                "tell whether it changes the schedule, so it refuses the config rather than misread it. Upgrade "
                f"fewstep, or remove {k!r} from the config if you know it does not change the model's schedule"
            )
        if key.kind == "refuse":
            raise ValueError(f"{where}: config key {k!r} is not supported by fewstep ({key.how})")


def read_config(config_or_scheduler: Any, overrides: Mapping[str, Any] | None = None) -> ReadConfig:
    """Read a diffusers scheduler (or its config) key by key; ``overrides`` are keys passed
    explicitly (``FewstepScheduler.from_config(config, key=value)``): they replace the config's
    and count as set."""
    cfg = _as_mapping(config_or_scheduler)
    overrides = dict(overrides or {})
    class_name = cfg.get("_class_name")
    inferred = not class_name
    class_name = str(class_name) if class_name else infer_class(cfg)
    if class_name == "FewstepScheduler":
        return _read_fewstep(cfg, overrides)
    ambiguous = same_key_classes(class_name, cfg) if inferred and class_name else []
    if class_name and class_name in CLASSES and CLASSES[class_name][0] != "refuse" and class_parameters(class_name) is None:
        raise ValueError(f"{class_name} is not in this diffusers, so its config cannot be read against its own keys")
    hidden = _own_keys(class_name, cfg, overrides) if class_name in CLASSES and CLASSES[class_name][0] != "refuse" else []
    defaults_used = set(cfg.get("_use_default_values") or ())
    cfg.update(overrides)
    defaults_used -= set(overrides)
    family = _family_of(class_name, cfg)
    _check_keys(class_name, cfg)
    cls_defaults = class_defaults(class_name)

    def is_set(k: str) -> bool:
        """The config chose ``k`` (see the module docstring)."""
        if k not in cfg:
            return False
        if k in overrides:
            return True
        if KEYS[k].kind == "processing":  # diffusers' own rule: a key not left at its default when built
            return k not in defaults_used
        # grid and final-step keys: chosen when away from the class default (a config written out by
        # diffusers, or by hand, carries the historical default of every key)
        return class_name is None or k not in cls_defaults or cfg[k] != cls_defaults[k]

    def get(k: str, default: Any = None) -> Any:
        v = cfg.get(k, cls_defaults.get(k, default))
        return default if v is None and default is not None else v

    source = {k: _plain(v) for k, v in cfg.items() if k != "_use_default_values"}
    if class_name:
        source["_class_name"] = class_name
    if defaults_used:
        source["_use_default_values"] = sorted(defaults_used)
    notes: list[str] = [f"ignored {k!r}: a key of another scheduler class, carried along by diffusers" for k in hidden]

    # -- the schedule ------------------------------------------------------------------------------
    if get("invert_sigmas", False):
        raise ValueError(
            f"{class_name or 'the config'} has invert_sigmas=True (Mochi's inverted sigma convention), which fewstep does "
            "not implement; sample that model with its own scheduler"
        )
    prediction = get("prediction_type")
    flow: dict[str, Any] = {}
    if family == "vp" and get("use_flow_sigmas", False):
        family = "flow"
        flow["shift"] = float(get("flow_shift", 1.0))
    elif family == "flow":
        flow["shift"] = float(get("shift", 1.0))
    if family == "flow":
        flow["use_dynamic_shifting"] = bool(get("use_dynamic_shifting", False))
        flow["time_shift_type"] = str(get("time_shift_type", "exponential"))
        for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len"):
            if k in cfg and cfg[k] is not None:
                flow[k] = cfg[k]
        n = int(get("num_train_timesteps", 1000))
        schedule: NoiseSchedule = FlowMatching(shift=flow["shift"], num_train_timesteps=n)
        if prediction is None:
            prediction = "flow_prediction"
    elif family == "edm":
        # a plain mapping (no _class_name) does not say how its network is conditioned: raw sigma, as before
        precondition = {"CosineDPMSolverMultistepScheduler": "cosine", None: None}.get(class_name, "edm")
        sd = get("sigma_data", 1.0 if precondition == "cosine" else 0.5)
        schedule = EDM(float(get("sigma_min", 0.002)), float(get("sigma_max", 80.0)), float(sd), precondition=precondition)
    else:
        beta_schedule = get("beta_schedule", "linear")
        if get("trained_betas") is None and beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"{class_name or 'the config'} has beta_schedule={beta_schedule!r}, which fewstep does not build; "
                "pass trained_betas (the betas themselves) instead"
            )
        ac = diffusers_alphas_cumprod(
            int(get("num_train_timesteps", 1000)),
            float(get("beta_start", 0.0001)),
            float(get("beta_end", 0.02)),
            str(beta_schedule),
            get("trained_betas"),
            bool(get("rescale_betas_zero_snr", False)),
            get("snr_shift_scale"),
        )
        if get("timestep_type", "discrete") == "continuous" and prediction == "v_prediction":
            family = "vp_sigma"
            rho = torch.sqrt((1 - ac.double()) / ac.double())
            lo = get("sigma_min")
            hi = get("sigma_max")
            schedule = VPSigma(float(lo) if lo is not None else float(rho[0]), float(hi) if hi is not None else float(rho[-1]))
        else:
            if get("timestep_type", "discrete") == "continuous":
                notes.append("timestep_type='continuous' acts only with v_prediction in diffusers; discrete timesteps, as there")
            family = "vp_discrete"
            schedule = VPDiscrete(ac)
    if prediction is None and family in ("vp_discrete", "vp_sigma"):
        prediction = "epsilon"  # every VP class's default

    # -- grid, final step, processing ---------------------------------------------------------------
    # Modifiers (steps_offset of the leading spacing, rho of the Karras grid, a VP config's
    # sigma_min / sigma_max of its Karras / exponential / beta sigmas) are honoured inside the
    # source's grid but do not choose it by themselves (SD 1.5 sets steps_offset=1 with the default
    # spacing).
    grid_keys = [k for k in KEYS if KEYS[k].kind == "grid" and k not in GRID_MODIFIERS and is_set(k)]
    spacing = None
    if grid_keys and class_name is None:
        # no source class to ask for its own grid: only the keys with an exact fewstep spacing
        if family == "vp_discrete" and grid_keys == ["timestep_spacing"] and cfg["timestep_spacing"] in ("linspace", "leading", "trailing"):
            spacing = str(cfg["timestep_spacing"])
        elif grid_keys == ["use_karras_sigmas"] and cfg["use_karras_sigmas"]:
            spacing = "karras"
        elif grid_keys == ["use_exponential_sigmas"] and cfg["use_exponential_sigmas"]:
            spacing = "logsnr"
        elif all(not cfg[k] for k in grid_keys if isinstance(cfg[k], bool)) and all(isinstance(cfg[k], bool) for k in grid_keys):
            spacing = None  # use_*_sigmas=False: nothing chosen
        else:
            raise ValueError(
                f"this config has no _class_name, and its grid keys {grid_keys} need the grid of the scheduler they belong "
                "to: pass the scheduler itself (FewstepScheduler.from_config(pipe.scheduler)) or add its _class_name"
            )
        grid_keys = []
    end = None
    if is_set("final_sigmas_type"):
        end = "zero" if cfg["final_sigmas_type"] == "zero" else "min"
    if is_set("set_alpha_to_one"):
        end = "zero" if cfg["set_alpha_to_one"] else "min"
    if class_name == "TCDScheduler" and end is None:
        end = "min"  # TCD's last step lands at timestep 0 (floor((1 - gamma) * 0)), not on clean data
    processing: dict[str, Any] = {}
    for k in ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
        if is_set(k):
            processing[k] = cfg[k]

    # -- consistency models and learned variance ------------------------------------------------------
    sampler = CLASSES.get(class_name, ("", None))[1] if class_name else None
    if family == "flow" and get("stochastic_sampling", False):
        sampler = "cm_multistep"
    sampler_options: dict[str, Any] = {}
    if sampler in ("lcm", "tcd") and cfg.get("original_inference_steps") is not None:
        sampler_options["original_inference_steps"] = int(cfg["original_inference_steps"])
    boundary = None
    if class_name == "LCMScheduler":
        boundary = {"boundary_time": 0.0, "scale": float(get("timestep_scaling", 10.0)), "sigma_data": 0.5}
    learned = str(get("variance_type", None)) in ("learned", "learned_range")
    if family == "vp_discrete":
        keys: dict[str, Any] = {
            k: _plain(get(k)) for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr", "snr_shift_scale")
        }
    elif family == "vp_sigma":
        keys = {"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max}
    elif family == "flow":
        keys = {"num_train_timesteps": schedule.num_train_timesteps, **{k: _plain(v) for k, v in flow.items()}}
    else:
        keys = {"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max, "sigma_data": schedule.sigma_data,
                "precondition": schedule.precondition}
    return ReadConfig(
        class_name, family, schedule, prediction, source, grid_keys, end, processing, sampler, sampler_options,
        boundary, learned, flow, notes, keys, int(get("steps_offset", 0) or 0), ambiguous, spacing,
    )


def _read_fewstep(cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> ReadConfig:
    """A FewstepScheduler's own config: its schedule and prediction type, as it builds them."""
    from fewstep.samplers.diffusers_adapter import FewstepScheduler

    sch = FewstepScheduler.from_config({k: v for k, v in cfg.items() if k != "_class_name"}, **overrides)
    prediction = sch._precondition.prediction_type if sch._precondition is not None else sch._prediction_type
    return ReadConfig("FewstepScheduler", sch.config.family, sch.schedule, prediction, _plain(dict(sch.config)))


# ---------------------------------------------------------------------------------------------
# The source scheduler's own grid
# ---------------------------------------------------------------------------------------------


def _dedupe(values: list[float]) -> list[float]:
    """Consecutive repeats removed (Heun-type schedulers list every inner time twice)."""
    out: list[float] = []
    for v in values:
        if not out or v != out[-1]:
            out.append(v)
    return out


def native_scheduler(source: Mapping[str, Any]) -> Any:
    """A fresh instance of the diffusers scheduler ``source`` is the config of."""
    name = source.get("_class_name")
    cls = diffusers_class(str(name) if name else None)
    if cls is None:
        raise ValueError(f"the source scheduler {name!r} is not in this diffusers; its own grid cannot be computed")
    return cls.from_config(dict(source))


def native_times(
    source: Mapping[str, Any],
    family: str,
    schedule: NoiseSchedule,
    num_steps: int | None,
    end: str | None,
    **set_timesteps_kwargs: Any,
) -> list[float]:
    """The grid (``num_steps + 1`` times in ``schedule``'s time) the source diffusers scheduler
    builds for ``num_steps`` steps, asking the scheduler itself (its ``set_timesteps``, with the
    ``sigmas`` / ``mu`` / ``original_inference_steps`` a pipeline passed).

    Times are read from the scheduler's ``sigmas`` (flow: the flow time; EDM: sigma; VP:
    ``sigma / alpha``, converted by log-SNR), except on discrete VP schedules where a network
    timestep it evaluates at stands for the same noise level as its sigma (then the timestep
    itself, so the network sees what diffusers feeds it).  Where diffusers feeds the network a
    timestep that is *not* its solver's noise level (DPM-Solver's rounded Karras timesteps, Euler's
    ``log_linear`` interpolation), fewstep evaluates at the solver's noise level.  Schedulers
    without ``sigmas`` (DDIM, DDPM, PNDM, LCM, TCD) give their timesteps and the final time ``end``."""
    native = native_scheduler(source)
    params = inspect.signature(native.set_timesteps).parameters
    kwargs = {k: v for k, v in set_timesteps_kwargs.items() if v is not None}
    for k in list(kwargs):
        if k not in params:
            if k in ("sigmas", "timesteps"):
                raise ValueError(f"{type(native).__name__}.set_timesteps takes no {k}= in this diffusers, so the {k} passed cannot be honoured")
            kwargs.pop(k)  # e.g. mu for a scheduler without dynamic shifting: it has no effect there
    if "sigmas" in kwargs:
        native.set_timesteps(device="cpu", **kwargs)
    else:
        native.set_timesteps(num_steps, device="cpu", **kwargs)
    ts = [float(v) for v in torch.as_tensor(native.timesteps).double().flatten()]
    sig = getattr(native, "sigmas", None)
    sig = None if sig is None else _dedupe([float(v) for v in torch.as_tensor(sig).double().flatten()])
    if family in ("flow", "edm", "vp_sigma"):
        if sig is None:
            raise ValueError(f"{type(native).__name__} exposes no sigmas to read its grid from")
        times = sig
    elif sig is not None:
        tsd = _dedupe(ts)
        times = []
        for i, s in enumerate(sig):
            if s == 0.0:
                times.append(schedule.t_zero)
                continue
            t_sig = float(schedule.t_from_lambda(-math.log(s)))
            if i < len(tsd) and len(tsd) == len(sig) - 1:
                a, sg = schedule.alpha_sigma(tsd[i])
                if abs(sg / a / s - 1.0) < 1e-4:
                    t_sig = tsd[i]
            if abs(t_sig - round(t_sig)) < 1e-6:
                t_sig = float(round(t_sig))
            times.append(t_sig)
    else:
        times = _dedupe(ts) + [schedule.t_zero if (end or "zero") == "zero" else schedule.t_min]
    if num_steps is not None and len(times) != num_steps + 1:
        raise ValueError(
            f"{type(native).__name__} builds {len(times) - 1} distinct steps for {num_steps}, so its own grid cannot "
            "drive this sampler's budget; use a fewstep spacing (spacing=None, 'logsnr', ...)"
        )
    return times


def resample_sigmas(sigmas: list[float], num_steps: int, terminal: float = 0.0) -> list[float]:
    """A pipeline's ``n`` sigmas (the first ``n`` points of a grid ending at ``terminal``) as
    ``num_steps`` sigmas of the same spacing: piecewise-linear in the index ``k / n``.  For
    ``num_steps == n`` they are returned unchanged; a uniform list (Flux's
    ``linspace(1, 1/n, n)``) stays uniform."""
    n = len(sigmas)
    if num_steps == n:
        return list(sigmas)
    knots = np.linspace(0.0, 1.0, n + 1)
    vals = np.asarray(list(sigmas) + [terminal], dtype=np.float64)
    return np.interp(np.arange(num_steps) / num_steps, knots, vals).tolist()
