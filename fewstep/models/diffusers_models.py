"""Denoisers for diffusers models: UNets (``UNet2DModel``, ``UNet2DConditionModel``) and the
transformers of flow-matching pipelines (``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
``WanTransformer3DModel``, ``SanaTransformer2DModel``, ...), under VP, flow-matching and
EDM-preconditioned schedules."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from fewstep.models.prediction import EDMPreconditioning, PredictionDenoiser
from fewstep.schedules import EDM, FlowMatching, NoiseSchedule

__all__ = ["DiffusersDenoiser"]

#: Transformers whose pipelines feed them the flow time ``t`` itself (``timestep / 1000``), not
#: ``1000 t`` (``FluxPipeline``: ``timestep=timestep / 1000``).
FLOW_TIME_MODELS = ("FluxTransformer2DModel", "Flux2Transformer2DModel", "ChromaTransformer2DModel")

#: Conditioning inputs without a batch dimension: ``ClassifierFreeGuidance`` passes them to both
#: branches unchanged (Flux's rotary position ids are ``(sequence, 3)``).
UNBATCHED_COND = ("img_ids", "txt_ids")


def _diffusers_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _default_prediction_type(prediction: str | None, schedule: NoiseSchedule) -> str:
    """The prediction type a model trained with this config / schedule has when nothing says."""
    if prediction is not None:
        return str(prediction)
    if isinstance(schedule, FlowMatching):
        return "flow_prediction"
    raise ValueError(
        f"cannot tell what the network predicts: the scheduler config names no prediction_type and the schedule "
        f"{schedule!r} has no default one; pass prediction_type='epsilon' | 'v_prediction' | 'sample' | "
        "'flow_prediction' (what the model was trained to output)"
    )


def _forward_parameters(model: Any) -> list[str]:
    fn = getattr(model, "forward", model)
    try:
        return [p for p in inspect.signature(fn).parameters if p != "self"]
    except (TypeError, ValueError):
        return []


class DiffusersDenoiser(PredictionDenoiser):
    """A diffusers network as a fewstep denoiser ``D(x, t, **cond) -> x0_hat``.

    The schedule and prediction type come from the scheduler (or its config) the model was
    trained with, read key by key by :func:`fewstep.diffusers_config.read_config` (a key fewstep
    does not understand is an error, never dropped).  When neither ``prediction_type=`` nor the
    config says what the network predicts: a flow-matching schedule means ``flow_prediction``
    (diffusers' flow schedulers have no ``prediction_type``), a DDPM-family config means
    ``epsilon`` (diffusers' default), and anything else is a ``ValueError`` asking for it.

    **The network call** follows the pipelines of each model family:

    * UNets (first argument ``sample``) and any other module: ``model(x, timestep, **cond)`` with
      a 0-d float32 timestep (``schedule.model_timestep(t)``: the identity on discrete VP
      schedules, so fractional timesteps from log-SNR or Karras grids reach the network as they are);
    * transformers (first argument ``hidden_states``): by keyword,
      ``model(hidden_states=x, timestep=ts, **cond, return_dict=False)`` with ``ts`` a (B,)
      float32 tensor in the model's units: ``1000 t`` for flow models (SD3, Wan, LTX, HunyuanVideo,
      CogView4; times ``config.timestep_scale`` for SANA), ``t`` for Flux (its pipeline divides by
      1000).  ``timestep_scale=`` overrides the factor.  Flux's guidance-distilled embedding takes
      ``cond["guidance"]`` (a number or a (B,) tensor, Flux's ``guidance_scale``); its ``img_ids`` /
      ``txt_ids`` go in ``cond`` too.
    * EDM-preconditioned configs (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``,
      ``CosineDPMSolverMultistepScheduler``): the network sees ``c_in x`` and ``c_noise(sigma)``, and
      ``D = c_skip x + c_out F`` (Karras et al. 2022, Table 1; :class:`EDMPreconditioning`).

    Conditioning (``encoder_hidden_states``, ``pooled_projections``, ``class_labels``, ...)
    travels in ``cond``; classifier-free guidance is :class:`fewstep.models.ClassifierFreeGuidance`.
    """

    unbatched_cond = UNBATCHED_COND

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler: Any = None,
        *,
        schedule: NoiseSchedule | None = None,
        prediction_type: str | None = None,
        timestep_scale: float | None = None,
    ):
        config_prediction = None
        if schedule is None:
            if scheduler is None:
                raise ValueError(
                    "DiffusersDenoiser needs the model's noise schedule: pass the scheduler (or its config) it was "
                    "trained with, or schedule=fewstep.schedules.<...>"
                )
            from fewstep.diffusers_config import read_config

            read = read_config(scheduler)
            schedule, config_prediction = read.schedule, read.prediction_type
        elif scheduler is not None:
            from fewstep.diffusers_config import read_config

            config_prediction = read_config(scheduler).prediction_type
        prediction_type = _default_prediction_type(prediction_type if prediction_type is not None else config_prediction, schedule)
        precondition = None
        if isinstance(schedule, EDM) and schedule.precondition is not None:
            precondition = EDMPreconditioning(schedule.sigma_data, prediction_type)
        params = _forward_parameters(model)
        self._keyword = bool(params) and params[0] == "hidden_states"
        self._return_dict = "return_dict" in params
        self._guidance = "guidance" in params and bool(getattr(getattr(model, "config", None), "guidance_embeds", False))
        if timestep_scale is None:
            timestep_scale = 1.0
            if isinstance(schedule, FlowMatching) and type(model).__name__ in FLOW_TIME_MODELS:
                timestep_scale = 1.0 / schedule.num_train_timesteps
            elif self._keyword:
                timestep_scale = float(getattr(getattr(model, "config", None), "timestep_scale", 1.0) or 1.0)
        self.timestep_scale = float(timestep_scale)
        super().__init__(
            model, schedule, prediction_type, timestep_fn=self._timestep, output_fn=_diffusers_output, precondition=precondition
        )

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        ts = torch.as_tensor(self.schedule.model_timestep(t.to("cpu", torch.float64)))
        if self.timestep_scale != 1.0:
            ts = ts * self.timestep_scale
        return ts.to(device=t.device, dtype=torch.float32)

    def call_model(self, x: torch.Tensor, timestep: torch.Tensor, **cond: Any) -> Any:
        if not self._keyword:
            return self.model(x, timestep, **cond)
        batch = x.shape[0]
        ts = timestep.expand(batch) if timestep.ndim == 0 else timestep
        if self._guidance:
            g = cond.get("guidance")
            if g is None:
                raise ValueError(
                    f"{type(self.model).__name__} is guidance-distilled (config.guidance_embeds=True): pass "
                    "cond={'guidance': w, ...} with the embedded guidance scale (FluxPipeline's guidance_scale, e.g. 3.5)"
                )
            g = torch.as_tensor(g, dtype=torch.float32, device=x.device).flatten()
            cond = {**cond, "guidance": g.expand(batch) if g.numel() == 1 else g}
        if self._return_dict:
            cond = {**cond, "return_dict": False}
        return self.model(hidden_states=x, timestep=ts, **cond)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "DiffusersDenoiser":
        """The denoiser of a pipeline's ``unet`` (or ``transformer``) under its scheduler."""
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None:
            raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
        return cls(model, pipe.scheduler, **kwargs)

