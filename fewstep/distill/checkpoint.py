"""Atomic, resumable training checkpoints with a retention limit, safe to resume from.

A checkpoint is written into a hidden temporary folder, which the main process then renames to
``checkpoint-<step>``.  A rename within one filesystem is atomic, so a folder named
``checkpoint-*`` is always complete: a run killed while writing leaves only a temporary folder,
which the next run deletes.  ``resume="latest"`` picks the highest step.  What a checkpoint holds:

* ``accelerate``'s ``save_state``: ``model.safetensors`` (the student), ``optimizer.bin`` and
  ``scheduler.bin`` (``torch.save``), ``random_states_<rank>.pkl`` (``torch.save``), ``scaler.pt``
  under fp16; under FSDP the model and optimizer as ``torch.save`` files (``FULL_STATE_DICT`` or
  ``LOCAL_STATE_DICT``).  No object is registered with accelerate, so there is no
  ``custom_checkpoint_<n>.pkl``: accelerate 1.x reads those with ``torch.load(weights_only=False)``,
  which runs whatever a crafted file asks.
* further trainable networks of an objective (rCM's fake score, sCM's log-variance head): accelerate
  writes them as ``model_<i>.safetensors`` with ``optimizer_<i>.bin`` and ``scheduler_<i>.bin``, in
  the order of their names, which ``fewstep_state.json`` lists (``networks``).
* fewstep's own state: ``ema.safetensors`` (the EMA target network), ``sampling_ema.safetensors``
  (the sampling EMA's shadow weights), ``lora.safetensors`` (a LoRA student's trainable
  parameters, written instead of accelerate's ``model.safetensors``: the frozen base is not
  saved) and ``fewstep_state.json`` (step, skipped steps, objective, the position in a streaming
  data source, the training settings).

Before anything is loaded, :func:`verify_checkpoint` checks the folder: a ``custom_checkpoint_*.pkl``
or a ``torch.distributed.checkpoint`` folder (whose ``.metadata`` torch reads with ``pickle.load``)
is refused, and every ``torch.save`` file is unpickled once with ``weights_only=True`` and its
tensors memory-mapped (:func:`fewstep._util.load_torch_file`): a file that holds anything but
tensors, numbers and plain containers is refused, naming it.  A file that passes holds nothing
that can run code, however accelerate then reads it (1.15 reads all of them with
``weights_only=True`` as well).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewstep._util import PICKLE_SUFFIXES, atomic_write_json, fsync_dir, load_torch_file

__all__ = ["CheckpointDir", "verify_checkpoint", "check_output_dir", "STATE_FILE", "EMA_FILE", "STATE_FORMAT"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "fewstep_state.json"
EMA_FILE = "ema.safetensors"
STATE_FORMAT = "fewstep-checkpoint/1"
SAMPLING_EMA_FILE = "sampling_ema.safetensors"  # fewstep.distill.ema writes it
LORA_FILE = "lora.safetensors"  # the trainer's LoRA checkpoint hook writes it
_FOREIGN_FIX = (
    "fewstep resumes only checkpoints written by its own trainer (fewstep >= 0.1 with safetensors state); resume from "
    "another checkpoint, or start a new run in another output folder"
)


class CheckpointDir:
    """The ``checkpoints/`` folder of a run."""

    def __init__(self, root: str | os.PathLike, keep: int | None = 3):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep_checkpoints must be a positive integer or None (keep all), got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"checkpoint-{int(step):07d}"

    def temporary(self, step: int) -> Path:
        return self.root / f"{_TMP_PREFIX}{int(step):07d}"

    def complete(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def clean_temporary(self) -> None:
        """Delete what a killed run left half-written (main process only)."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    def commit(self, step: int) -> Path:
        """Rename the finished temporary folder of ``step`` into place and apply the retention limit
        (main process only)."""
        tmp, final = self.temporary(step), self.path(step)
        if final.exists():  # a re-run of the same step replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        if self.keep is not None:
            for _, old in self.complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def resolve(self, resume: str | os.PathLike | None) -> Path | None:
        """The checkpoint to resume from: ``None`` (start fresh), ``"latest"`` (the newest complete
        one, or a fresh start when there is none) or a path."""
        if resume is None or resume is False:
            return None
        if str(resume) == "latest":
            return self.latest()
        p = Path(resume)
        if not p.is_dir():
            raise ValueError(f"resume={str(resume)!r} is not a checkpoint folder; pass 'latest' or a checkpoint-<step> folder")
        return p


def write_state(folder: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write fewstep's own state of a checkpoint (``fewstep_state.json``)."""
    return atomic_write_json(Path(folder) / STATE_FILE, {"format": STATE_FORMAT, **dict(state)}, indent=1, sort_keys=True)


def _count(state: Mapping[str, Any], key: str, path: Path) -> int:
    v = state.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{path} is not a fewstep checkpoint state: {key!r} is {v!r}, not a count; {_FOREIGN_FIX}")
    return v


def verify_checkpoint(
    folder: str | os.PathLike,
    *,
    ema: bool | None = None,
    fsdp: bool | None = None,
    objective: str | None = None,
    sampling_ema: bool | None = None,
    lora: bool | None = None,
    networks: list[str] | None = None,
) -> dict[str, Any]:
    """Check a checkpoint folder before anything in it is loaded (see the module docstring) and
    return its ``fewstep_state.json``.  ``ema``, ``fsdp`` and ``objective`` describe the run about
    to resume (``None``: not known yet, not checked); a checkpoint of another kind is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a checkpoint folder; pass resume='latest' or a checkpoint-<step> folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        if re.fullmatch(r"custom_checkpoint_\d+\.pkl", p.name):
            raise ValueError(
                f"{p} is a pickled accelerate custom checkpoint, which accelerate would load with "
                "torch.load(weights_only=False): a crafted one runs code, so fewstep refuses to resume from "
                f"{folder} (nothing was loaded). fewstep's own checkpoints keep that state in {EMA_FILE} and {STATE_FILE}; "
                "a checkpoint written by an earlier fewstep cannot be resumed: start a new run in another output folder"
            )
        if p.name == ".metadata" or p.suffix == ".distcp":
            raise ValueError(
                f"{p} belongs to a torch.distributed.checkpoint (FSDP SHARDED_STATE_DICT) folder, whose metadata torch "
                "reads with pickle.load (a crafted one runs code), so fewstep refuses to resume from it; train under "
                "FSDP with fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config"
            )
    state_path = folder / STATE_FILE
    if state_path.is_symlink() or not state_path.is_file():
        raise ValueError(f"{folder} is not a fewstep checkpoint: {STATE_FILE} is missing; {_FOREIGN_FIX}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{state_path} is not readable JSON ({err}); {_FOREIGN_FIX}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else None
        raise ValueError(f"{state_path} is not a fewstep checkpoint state (format {fmt!r}, expected {STATE_FORMAT!r}); {_FOREIGN_FIX}")
    _count(state, "step", state_path)
    _count(state, "skipped", state_path)
    if not isinstance(state.get("ema"), bool) or not isinstance(state.get("objective"), str) or not isinstance(state.get("config", {}), dict):
        raise ValueError(f"{state_path} is not a fewstep checkpoint state ('ema', 'objective' or 'config' malformed); {_FOREIGN_FIX}")
    if objective is not None and state["objective"] != objective:
        raise ValueError(
            f"{folder} is a checkpoint of a {state['objective']!r} run, not of this {objective!r} run; resume it with the "
            "same objective, or start this run in another output folder"
        )
    if ema is not None and state["ema"] != ema:
        have = "has" if state["ema"] else "has no"
        raise ValueError(
            f"{folder} {have} an EMA target network, this run {'has' if ema else 'has none'} (target_ema); resume with the "
            "same objective settings, or start this run in another output folder"
        )
    if state["ema"] and not (folder / EMA_FILE).is_file():
        raise ValueError(f"{folder} lacks {EMA_FILE} (the EMA target network); {_FOREIGN_FIX}")
    for key, value, what in (("sampling_ema", sampling_ema, "a sampling EMA (sampling_ema)"), ("lora", lora, "LoRA adapters")):
        have = state.get(key, False)
        if not isinstance(have, bool):
            raise ValueError(f"{state_path} is not a fewstep checkpoint state ({key!r} malformed); {_FOREIGN_FIX}")
        if value is not None and have != value:
            raise ValueError(
                f"{folder} {'has' if have else 'has no'} {what}, this run {'has' if value else 'has none'}; resume with the "
                "same settings, or start this run in another output folder"
            )
    if state.get("sampling_ema") and not (folder / SAMPLING_EMA_FILE).is_file():
        raise ValueError(f"{folder} lacks {SAMPLING_EMA_FILE} (the sampling EMA); {_FOREIGN_FIX}")
    have_nets = state.get("networks", [])
    if not isinstance(have_nets, list) or not all(isinstance(n, str) for n in have_nets):
        raise ValueError(f"{state_path} is not a fewstep checkpoint state ('networks' malformed); {_FOREIGN_FIX}")
    if networks is not None and list(networks) != have_nets:
        raise ValueError(
            f"{folder} holds the trainable networks {['student', *have_nets]}, this run trains {['student', *networks]}; "
            "resume with the same objective settings, or start this run in another output folder"
        )
    for i in range(1, len(have_nets) + 1):
        if fsdp is not True and not (folder / f"model_{i}.safetensors").is_file():
            raise ValueError(f"{folder} lacks model_{i}.safetensors (the {have_nets[i - 1]!r} network); {_FOREIGN_FIX}")
    data = state.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{state_path} is not a fewstep checkpoint state ('data' malformed); {_FOREIGN_FIX}")
    names = {p.name for p in files}
    if state.get("lora"):
        if LORA_FILE not in names:
            raise ValueError(f"{folder} lacks {LORA_FILE} (the LoRA student's trainable parameters); {_FOREIGN_FIX}")
    elif fsdp is False and "model.safetensors" not in names:
        raise ValueError(f"{folder} lacks model.safetensors (the student's weights); {_FOREIGN_FIX}")
    elif fsdp is None and "model.safetensors" not in names and not any(n.startswith("pytorch_model_fsdp") for n in names):
        raise ValueError(f"{folder} holds no student weights (model.safetensors); {_FOREIGN_FIX}")
    for p in files:
        if p.name.lower().endswith(PICKLE_SUFFIXES):
            load_torch_file(
                p,
                what="part of a training checkpoint (tensors and numbers saved by torch.save)",
                fix=_FOREIGN_FIX,
                numpy=p.name.startswith("random_states_"),
                check_only=True,
            )
    return state


def check_output_dir(output_dir: str | os.PathLike, resume: str | os.PathLike | None) -> Path | None:
    """Refuse to start a run in a folder that already holds something unless it is resumed, and
    check the checkpoint to resume from (:func:`verify_checkpoint`) before any work.  Returns that
    checkpoint (``None``: a fresh start)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is a file; choose another output folder (--out)")
    if resume is None or resume is False:
        # the trainer's write probe (.write-test-<pid>) of another rank starting at the same time is not a run
        entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".write-test-")) if out.is_dir() else []
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            what = "holds a distillation run" if {"checkpoints", "student", "metrics.jsonl"} & set(entries) else "is not empty"
            raise ValueError(
                f"the output folder {out} {what} ({shown}); pass resume='latest' (fewstep distill --resume latest) to "
                "continue that run, or choose another output folder (--out): a new run there would mix two runs' files"
            )
        return None
    found = CheckpointDir(out / "checkpoints").resolve(resume)
    if found is not None:
        verify_checkpoint(found)
    return found
