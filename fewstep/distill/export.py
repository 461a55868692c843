"""The distilled student on disk: diffusers format plus a small JSON naming how to sample it.

Layout of a saved student folder::

    unet/                       network.save_pretrained(...)  (config.json + safetensors); or, for
    pytorch_lora_weights.safetensors   a LoRA student, its adapter in diffusers' LoRA format, which
                                ``pipe.load_lora_weights(folder)`` then ``pipe.fuse_lora()`` read
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
from fewstep.distill.student import ConsistencyStudent, boundary_from_config
from fewstep.schedules import NoiseSchedule, VPDiscrete, from_config

__all__ = ["STUDENT_META", "STUDENT_KINDS", "LORA_WEIGHTS", "save_student", "save_lora_student", "load_student", "DistilledStudent", "scheduler_config_for", "lora_state_dict"]

#: diffusers' LoRA file name: ``pipe.load_lora_weights(student_folder)`` finds it
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

STUDENT_META = "fewstep_student.json"
#: ``student_kind`` of fewstep_student.json -> the module class a loaded student is rebuilt as
#: (``consistency``: :class:`ConsistencyStudent` with its recorded boundary condition)
STUDENT_KINDS = {
    "consistency": "fewstep.distill.student:ConsistencyStudent",
    "diffusion": "fewstep.distill.mmd:TunedDenoiser",
    "boot": "fewstep.distill.boot:BootStudent",
}
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


def _student_meta(student: ConsistencyStudent, description: Mapping[str, Any], network: Mapping[str, Any]) -> dict[str, Any]:
    meta = {
        "format": FORMAT_VERSION,
        "fewstep_version": fewstep.__version__,
        "network": dict(network),
        **student.describe(),
        **dict(description),
    }
    if "sampler" not in meta:
        raise ValueError("the description must name the sampler the student is meant for")
    return meta


def _write_student_folder(folder: str | os.PathLike, student: ConsistencyStudent, meta: Mapping[str, Any],
                          scheduler_config: Mapping[str, Any] | None, write_network: Any) -> Path:
    """Write ``folder`` under a temporary name next to it (``write_network(tmp)`` writes the
    weights) and swap it into place."""
    folder = Path(folder)
    given, folder = folder, Path(os.path.abspath(folder))
    _check_student_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write_network(tmp)
        # a student a diffusers loop cannot drive (BOOT's generator of noise) gets no scheduler
        sched = scheduler_config_for(student.schedule, student.prediction_type, scheduler_config) if getattr(student, "push_style", True) else None
        if sched is not None:
            from fewstep import FewstepScheduler

            boundary = getattr(student, "boundary", None)  # none for a fine-tuned diffusion model (MMD)
            if getattr(boundary, "kind", None) == "trigflow":
                boundary = None  # a TrigFlow (sCM) student's prediction is its consistency function: no c_skip / c_out
            FewstepScheduler(
                **sched,
                sampler=meta["sampler"],
                sampler_options=dict(meta.get("sampler_options") or {}),
                **({"boundary_condition": boundary.config()} if boundary is not None else {}),
            ).save_config(tmp / "scheduler")
        atomic_write_json(tmp / STUDENT_META, dict(meta), indent=1, sort_keys=True)
        os.chmod(tmp, default_permissions(folder=True))
        _swap_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return given


def lora_state_dict(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of a network carrying peft LoRA adapters (diffusers' peft
    integration), in peft's key format, with each layer's scaling ``lora_alpha / r`` folded into
    ``lora_B``: diffusers' ``load_lora_weights`` of a file without alphas sets ``lora_alpha = r``
    (scaling 1) on every diffusers version fewstep supports, so the file reproduces the trained
    adapter whatever ``lora_alpha`` was.  DoRA adapters are refused (their magnitude vectors do not
    fold)."""
    from peft.utils import get_peft_model_state_dict

    sd = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(network).items()}
    if any("magnitude" in k for k in sd):
        raise ValueError("DoRA adapters (use_dora=True) cannot be saved in diffusers' plain LoRA format; train with use_dora=False")
    for name, mod in network.named_modules():
        scaling = getattr(mod, "scaling", None)
        key = f"{name}.lora_B.weight"
        if isinstance(scaling, dict) and key in sd:
            if len(scaling) != 1:
                raise ValueError(f"{name} carries {len(scaling)} adapters; fewstep saves a student with one LoRA adapter")
            sd[key] = sd[key] * float(next(iter(scaling.values())))
    return sd


def save_lora_student(
    folder: str | os.PathLike,
    student: ConsistencyStudent,
    description: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a LoRA student: its adapter as ``pytorch_lora_weights.safetensors`` in diffusers'
    LoRA format (the base weights are not written: they are the teacher's), the scheduler and
    ``fewstep_student.json``.  ``pipe.load_lora_weights(folder)`` and ``pipe.fuse_lora()`` then
    give the student in any diffusers pipeline of the teacher; :func:`load_student` with
    ``base=`` the teacher's network gives the consistency function."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    net = student.network
    sd = lora_state_dict(net)
    meta = _student_meta(student, description, {"class": _class_path(net), "subfolder": None,
                                                 "lora": {"weights": LORA_WEIGHTS, "format": "diffusers", "alpha": "folded into lora_B"}})

    def write(tmp: Path) -> None:
        StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp), unet_lora_layers=sd, safe_serialization=True)
        if not (tmp / LORA_WEIGHTS).is_file():
            raise RuntimeError(f"internal error: diffusers did not write {LORA_WEIGHTS}")

    return _write_student_folder(folder, student, meta, scheduler_config, write)


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
    net = student.network
    if not hasattr(net, "save_pretrained"):
        raise TypeError(f"{type(net).__name__} has no save_pretrained; the student network must be a diffusers model")
    if getattr(net, "peft_config", None):
        raise ValueError("the student carries LoRA adapters: save it with save_lora_student (diffusers' LoRA format)")
    meta = _student_meta(student, description, {"class": _class_path(net), "subfolder": _NETWORK_DIR})
    return _write_student_folder(folder, student, meta, scheduler_config,
                                 lambda tmp: net.save_pretrained(tmp / _NETWORK_DIR, safe_serialization=True))


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

    denoiser: torch.nn.Module  # ConsistencyStudent, TunedDenoiser (MMD) or BootStudent
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
        """``fewstep.sample`` with the recorded sampler and options (``options`` override them);
        a BOOT student, a generator of noise rather than a denoiser, runs its own one evaluation."""
        with torch.no_grad():
            if hasattr(self.denoiser, "generate"):
                return self.denoiser.generate(noise, nfe, cond=cond, **options)
            return fewstep.sample(self.denoiser, noise, self.sampler, nfe, cond=cond, generator=generator, **{**self.sampler_options, **options})


def load_student(folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 base: torch.nn.Module | str | os.PathLike | None = None) -> DistilledStudent:
    """Load a folder written by :func:`save_student` / :func:`save_lora_student` (or ``fewstep
    distill``).  Only safetensors weights are read (a folder with only a pickled ``.bin`` is
    refused with how to convert it) and only diffusers / fewstep network classes are imported.
    A LoRA student needs ``base``: the teacher's network (a module, copied, or its diffusers model
    folder); the adapter is loaded with diffusers' LoRA loader and fused."""
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
        if not isinstance(network.get("lora", {}), dict):
            raise ValueError("'network.lora' is not an object")
        kind = str(meta.get("student_kind", "consistency"))
        if kind not in STUDENT_KINDS:
            raise ValueError(f"unknown student_kind {kind!r} (this fewstep reads {', '.join(STUDENT_KINDS)})")
        if kind == "consistency":
            boundary = boundary_from_config(dict(meta["boundary"]))
        schedule = from_config(meta["schedule"])
        prediction_type = str(meta["prediction_type"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as err:
        if "upgrade fewstep" in str(err):
            raise
        raise ValueError(
            f"{path} is not a valid fewstep student description ({type(err).__name__}: {err}); save the student again "
            "with fewstep.distill.save_student (or fewstep distill)"
        ) from None
    cls = _import_class(cls_path)
    if network.get("lora"):
        net = _lora_network(folder, cls, base)
    else:
        net_dir = folder / sub
        if Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise ValueError(f"{path} names the network folder {sub!r}, which is not inside {folder}")
        require_safetensors(net_dir, "the student network folder")
        net = cls.from_pretrained(net_dir, use_safetensors=True, local_files_only=True)
    net = net.to(device=device, dtype=dtype if dtype is not None else torch.float32).eval()
    if kind == "consistency":
        student = ConsistencyStudent(net, schedule, prediction_type, boundary, meta.get("guidance_embedding_dim"))
    else:
        module, _, name = STUDENT_KINDS[kind].partition(":")
        student = getattr(importlib.import_module(module), name)(net, schedule, prediction_type)
    return DistilledStudent(student.eval(), meta)


def _lora_network(folder: Path, cls: type, base: Any) -> torch.nn.Module:
    """The base network with the folder's LoRA adapter loaded by diffusers and fused."""
    import copy

    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if base is None:
        raise ValueError(f"{folder} holds a LoRA adapter, not a whole network: pass base= the teacher's network "
                         "(a module or its diffusers model folder), or load it with pipe.load_lora_weights(folder)")
    if isinstance(base, torch.nn.Module):
        net = copy.deepcopy(base)
    else:
        require_safetensors(Path(base), "the LoRA student's base network folder")
        net = cls.from_pretrained(base, use_safetensors=True, local_files_only=True)
    if getattr(net, "peft_config", None):
        raise ValueError("base= carries adapters already; pass the teacher's plain network")
    if not (folder / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} lacks {LORA_WEIGHTS}, the LoRA student's adapter")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(folder), weight_name=LORA_WEIGHTS)[:2]
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=net)
    net.fuse_lora()
    net.unload_lora()
    return net
