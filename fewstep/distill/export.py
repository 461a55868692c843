"""The distilled student on disk: diffusers format plus a small JSON naming how to sample it.

Layout of a saved student folder::

    unet/                       network.save_pretrained(...)  (config.json + safetensors)
    scheduler/                  FewstepScheduler config: the schedule and the recorded sampler
    fewstep_student.json        objective, schedule, parameterisation (prediction type, boundary
                                condition), guidance convention, sampler name and options

:func:`load_student` rebuilds the consistency function (:class:`ConsistencyStudent`) and
:meth:`DistilledStudent.sample` runs it with the recorded registry sampler, so nobody repeats the
training choices at sampling time.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fewstep
from fewstep.distill.student import BoundaryCondition, ConsistencyStudent
from fewstep.schedules import NoiseSchedule, VPDiscrete, from_config

__all__ = ["STUDENT_META", "save_student", "load_student", "DistilledStudent", "scheduler_config_for"]

STUDENT_META = "fewstep_student.json"
FORMAT_VERSION = 1
_NETWORK_DIR = "unet"
_TRUSTED_PREFIXES = ("diffusers.", "fewstep.")


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(_TRUSTED_PREFIXES):
        raise ValueError(
            f"refusing to import network class {path!r} named in {STUDENT_META}: only diffusers and fewstep "
            "classes are loaded automatically; load the network yourself and build ConsistencyStudent"
        )
    return getattr(importlib.import_module(module), name)


def scheduler_config_for(schedule: NoiseSchedule, prediction_type: str, base: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """A :class:`fewstep.FewstepScheduler` config (without the sampler) for a discrete VP schedule:
    the teacher's diffusers scheduler config when given, else ``trained_betas`` recovered from
    ``alphas_cumprod``; ``None`` for other schedules (they have no diffusers push-style loop here)."""
    if not isinstance(schedule, VPDiscrete):
        return None
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr", "steps_offset")
    if base is not None:
        cfg = {k: base[k] for k in keys if k in base and base[k] is not None}
    else:
        ac = schedule.alphas_cumprod
        betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
        cfg = {"num_train_timesteps": len(ac), "trained_betas": betas.tolist()}
    cfg["prediction_type"] = prediction_type
    return cfg


def save_student(
    folder: str | os.PathLike,
    student: ConsistencyStudent,
    description: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``student`` to ``folder`` (see the module docstring).

    ``description`` must hold ``sampler`` and ``sampler_options`` and may hold anything else
    JSON-serialisable (objective, training settings).  The network must be a diffusers model
    (``save_pretrained``)."""
    folder = Path(folder)
    net = student.network
    if not hasattr(net, "save_pretrained"):
        raise TypeError(f"{type(net).__name__} has no save_pretrained; the student network must be a diffusers model")
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(folder / _NETWORK_DIR, safe_serialization=True)
    meta = {
        "format": FORMAT_VERSION,
        "fewstep_version": fewstep.__version__,
        "network": {"class": _class_path(net), "subfolder": _NETWORK_DIR},
        **student.describe(),
        **dict(description),
    }
    if "sampler" not in meta:
        raise ValueError("the description must name the sampler the student is meant for")
    sched = scheduler_config_for(student.schedule, student.prediction_type, scheduler_config)
    if sched is not None:
        from fewstep import FewstepScheduler

        FewstepScheduler(
            **sched,
            sampler=meta["sampler"],
            sampler_options=dict(meta.get("sampler_options") or {}),
            boundary_condition=student.boundary.config(),
        ).save_config(folder / "scheduler")
    tmp = folder / (STUDENT_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, folder / STUDENT_META)
    return folder


@dataclass
class DistilledStudent:
    """A loaded student: the consistency function and what it was saved with."""

    denoiser: ConsistencyStudent
    meta: dict[str, Any]

    @property
    def sampler(self) -> str:
        return str(self.meta["sampler"])

    @property
    def sampler_options(self) -> dict[str, Any]:
        return dict(self.meta.get("sampler_options") or {})

    def sample(
        self,
        noise: torch.Tensor,
        nfe: int,
        *,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """``fewstep.sample`` with the recorded sampler and options (``options`` override them)."""
        with torch.no_grad():
            return fewstep.sample(self.denoiser, noise, self.sampler, nfe, cond=cond, generator=generator, **{**self.sampler_options, **options})


def load_student(folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DistilledStudent:
    """Load a folder written by :func:`save_student` (or ``fewstep distill``)."""
    folder = Path(folder)
    path = folder / STUDENT_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fewstep student folder: {STUDENT_META} is missing")
    meta = json.loads(path.read_text())
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format {meta['format']}; this fewstep reads up to {FORMAT_VERSION}: upgrade fewstep")
    cls = _import_class(meta["network"]["class"])
    net = cls.from_pretrained(folder / meta["network"]["subfolder"])
    net = net.to(device=device, dtype=dtype if dtype is not None else torch.float32).eval()
    b = meta["boundary"]
    student = ConsistencyStudent(
        net,
        from_config(meta["schedule"]),
        meta["prediction_type"],
        BoundaryCondition(float(b["boundary_time"]), float(b["scale"]), float(b["sigma_data"])),
        meta.get("guidance_embedding_dim"),
    )
    return DistilledStudent(student.eval(), meta)
