"""The distilled student on disk: diffusers format plus a small JSON naming how to sample it.

Layout of a saved student folder::

    unet/                       network.save_pretrained(...)  (config.json + safetensors)
    scheduler/                  FewstepScheduler config: the schedule and the recorded sampler
    fewstep_student.json        objective, schedule, parameterisation (prediction type, boundary
                                condition), guidance convention, sampler name and options

:func:`load_student` rebuilds the consistency function (:class:`ConsistencyStudent`) and
:meth:`DistilledStudent.sample` runs it with the recorded registry sampler, so nobody repeats the
training choices at sampling time.

:func:`save_student` writes the whole folder under a unique temporary name next to it and then
swaps it into place, so a reader never sees one save's network with another's JSON, and a folder
that is not a student folder is never replaced.  :func:`load_student` loads safetensors weights
only (a pickled ``.bin`` is refused with how to convert it) and network classes from diffusers
and fewstep only.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fewstep
from fewstep._util import atomic_write_json, default_permissions, fsync_dir, require_safetensors
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


def _check_student_target(folder: Path) -> None:
    """``folder`` may be replaced by a new student: absent, empty, or a student folder."""
    if folder.is_symlink():
        raise ValueError(f"{folder} is a symbolic link; save the student to a real folder (fewstep never replaces a link)")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder; choose another place for the student")
    if folder.is_dir() and any(folder.iterdir()):
        meta = folder / STUDENT_META
        if meta.is_symlink() or not meta.is_file():
            raise ValueError(
                f"{folder} is not empty and is not a fewstep student folder (no regular {STUDENT_META}); fewstep replaces "
                "only student folders: choose another folder, or empty this one"
            )


def save_student(
    folder: str | os.PathLike,
    student: ConsistencyStudent,
    description: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``student`` to ``folder`` (see the module docstring).

    ``description`` must hold ``sampler`` and ``sampler_options`` and may hold anything else
    JSON-serialisable (objective, training settings).  The network must be a diffusers model
    (``save_pretrained``).  The folder is written under a unique temporary name next to
    ``folder`` and swapped into place; an existing ``folder`` is replaced only if it is empty or a
    student folder (a regular ``fewstep_student.json``), never a link, a file or another folder."""
    folder = Path(folder)
    net = student.network
    if not hasattr(net, "save_pretrained"):
        raise TypeError(f"{type(net).__name__} has no save_pretrained; the student network must be a diffusers model")
    meta = {
        "format": FORMAT_VERSION,
        "fewstep_version": fewstep.__version__,
        "network": {"class": _class_path(net), "subfolder": _NETWORK_DIR},
        **student.describe(),
        **dict(description),
    }
    if "sampler" not in meta:
        raise ValueError("the description must name the sampler the student is meant for")
    given, folder = folder, Path(os.path.abspath(folder))
    _check_student_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        net.save_pretrained(tmp / _NETWORK_DIR, safe_serialization=True)
        sched = scheduler_config_for(student.schedule, student.prediction_type, scheduler_config)
        if sched is not None:
            from fewstep import FewstepScheduler

            FewstepScheduler(
                **sched,
                sampler=meta["sampler"],
                sampler_options=dict(meta.get("sampler_options") or {}),
                boundary_condition=student.boundary.config(),
            ).save_config(tmp / "scheduler")
        atomic_write_json(tmp / STUDENT_META, meta, indent=1, sort_keys=True)
        os.chmod(tmp, default_permissions(folder=True))
        _swap_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return given


def _swap_into_place(new: Path, folder: Path) -> None:
    """Move the finished folder ``new`` to ``folder``: the old one (checked replaceable) is moved
    aside under a unique name first and deleted after.  A concurrent save that got there first is
    moved aside in turn (the last save wins); readers see the old student, the new one or, for the
    instant between the two renames, none."""
    for _ in range(100):
        _check_student_target(folder)
        aside = None
        if folder.exists():
            aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            try:
                os.replace(folder, aside / "student")
            except FileNotFoundError:  # another save moved it away first
                pass
        try:
            os.replace(new, folder)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
            continue  # another save put its folder there in between: try again
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(folder.parent)
        return
    raise RuntimeError(f"could not move the new student into {folder}: other processes keep saving there")


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
    """Load a folder written by :func:`save_student` (or ``fewstep distill``).  Only safetensors
    weights are read (a folder with only a pickled ``.bin`` is refused with how to convert it) and
    only diffusers / fewstep network classes are imported."""
    folder = Path(folder)
    path = folder / STUDENT_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a fewstep student folder: {STUDENT_META} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if int(meta.get("format", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format {meta['format']}; this fewstep reads up to {FORMAT_VERSION}: upgrade fewstep")
        network = meta["network"]
        cls_path, sub = str(network["class"]), str(network["subfolder"])
        b = meta["boundary"]
        boundary = BoundaryCondition(float(b["boundary_time"]), float(b["scale"]), float(b["sigma_data"]))
        schedule = from_config(meta["schedule"])
        prediction_type = str(meta["prediction_type"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as err:
        if "upgrade fewstep" in str(err):
            raise
        raise ValueError(
            f"{path} is not a valid fewstep student description ({type(err).__name__}: {err}); save the student again "
            "with fewstep.distill.save_student (or fewstep distill)"
        ) from None
    net_dir = folder / sub
    if Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise ValueError(f"{path} names the network folder {sub!r}, which is not inside {folder}")
    cls = _import_class(cls_path)
    require_safetensors(net_dir, "the student network folder")
    net = cls.from_pretrained(net_dir, use_safetensors=True, local_files_only=True)
    net = net.to(device=device, dtype=dtype if dtype is not None else torch.float32).eval()
    student = ConsistencyStudent(net, schedule, prediction_type, boundary, meta.get("guidance_embedding_dim"))
    return DistilledStudent(student.eval(), meta)
