"""Denoisers for diffusers models (``UNet2DModel``, ``UNet2DConditionModel``, and anything called
as ``model(sample, timestep, **cond)``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fewstep.models.prediction import PredictionDenoiser
from fewstep.schedules import FlowMatching, NoiseSchedule, from_diffusers

__all__ = ["DiffusersDenoiser"]


def _diffusers_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _default_prediction_type(config: Mapping[str, Any], schedule: NoiseSchedule) -> str:
    """The prediction type a model trained with ``config`` / ``schedule`` has when nothing says."""
    if config.get("prediction_type") is not None:
        return str(config["prediction_type"])
    if isinstance(schedule, FlowMatching):
        return "flow_prediction"
    if config.get("beta_schedule") is not None or config.get("trained_betas") is not None:
        return "epsilon"
    raise ValueError(
        f"cannot tell what the network predicts: the scheduler config names no prediction_type and the schedule "
        f"{schedule!r} has no default one; pass prediction_type='epsilon' | 'v_prediction' | 'sample' | "
        "'flow_prediction' (what the model was trained to output)"
    )


class DiffusersDenoiser(PredictionDenoiser):
    """A diffusers network as a fewstep denoiser.

    The schedule and prediction type come from the scheduler (or its config) the model was
    trained with.  When neither ``prediction_type=`` nor the config's ``prediction_type`` says what
    the network predicts: a flow-matching schedule means ``flow_prediction`` (diffusers' flow
    schedulers have no ``prediction_type``), a DDPM-family config (``beta_schedule`` or
    ``trained_betas``) means ``epsilon`` (diffusers' default), and anything else is a
    ``ValueError`` asking for ``prediction_type=``.  Schedule time is mapped to the model's timestep by
    ``schedule.model_timestep`` (the identity for discrete DDPM-family schedules, so fractional
    timesteps from log-SNR or Karras grids reach the network as they are).  The timestep is
    passed as a float32 tensor, which is what diffusers' sinusoidal embeddings compute in.

    Conditioning (``encoder_hidden_states``, ``class_labels``, ...) travels in ``cond``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler: Any = None,
        *,
        schedule: NoiseSchedule | None = None,
        prediction_type: str | None = None,
    ):
        config: Mapping[str, Any] = {}
        if scheduler is not None:
            config = dict(scheduler.config) if hasattr(scheduler, "config") else dict(scheduler)
        if schedule is None:
            if scheduler is None:
                raise ValueError(
                    "DiffusersDenoiser needs the model's noise schedule: pass the scheduler (or its config) it was "
                    "trained with, or schedule=fewstep.schedules.<...>"
                )
            schedule = from_diffusers(config)
        if prediction_type is None:
            prediction_type = _default_prediction_type(config, schedule)
        super().__init__(model, schedule, prediction_type, timestep_fn=self._timestep, output_fn=_diffusers_output)

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.schedule.model_timestep(t)).to(torch.float32)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> "DiffusersDenoiser":
        """The denoiser of a pipeline's ``unet`` (or ``transformer``) under its scheduler."""
        model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if model is None:
            raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
        return cls(model, pipe.scheduler, **kwargs)
