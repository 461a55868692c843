"""Atomic, resumable training checkpoints with a retention limit.

A checkpoint is written by ``accelerate``'s ``save_state`` (model, optimizer, LR schedule, gradient
scaler, registered objects such as the EMA target and the trainer's counters; sharded states
under FSDP) into a hidden temporary folder, which the main process then renames to
``checkpoint-<step>``.  A rename within one filesystem is atomic, so a folder named
``checkpoint-*`` is always complete: a run killed while writing leaves only a temporary folder,
which the next run deletes.  ``resume="latest"`` picks the highest step.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

__all__ = ["CheckpointDir"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"


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
        _fsync_dir(self.root)
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
