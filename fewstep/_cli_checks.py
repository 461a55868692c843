"""Checks of command-line values, run before any model is loaded, data read or work started.

Two kinds:

* argparse ``type=`` functions (:func:`positive_int`, :func:`seed`, :func:`nfe_list`, ...): a
  bad value ends in argparse's own ``fewstep CMD: error: argument --x: ...`` with exit code 2;
* checks of what the values point at (:func:`output_file`, :func:`output_dir`, :func:`device`,
  :func:`image_folder`, :func:`model_spec`, ...), called by each command right after parsing; they
  raise :class:`UsageError`, which :func:`fewstep.cli.main` prints as one line (exit code 2).

Every message names the argument, the value and what to do instead.  Nothing here loads a model,
reads more than an image header, or leaves a file behind (writability is tested by creating and
removing a probe file).

:func:`raised_in_user_code` tells the CLI whether an exception came out of the user's own code
(a ``--model module:attribute`` denoiser, a ``--extractor module:callable``), whose traceback is
kept, from fewstep's own checks of the user's input, which become a one-line message.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import site
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "positive_int",
    "nonnegative_int",
    "int_at_least",
    "positive_float",
    "unit_interval",
    "seed",
    "number_range",
    "nfe_list",
    "shape_list",
    "name_list",
    "output_file",
    "output_dir",
    "device",
    "image_folder",
    "image_zip",
    "sampler_budget",
    "module_spec",
    "model_spec",
    "existing_path",
    "raised_in_user_code",
    "MAX_SEED",
]

#: Seeds go to ``torch.Generator.manual_seed`` and ``numpy.random.default_rng``: 0 to 2**63 - 1.
MAX_SEED = 2**63 - 1
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class UsageError(ValueError):
    """A command-line value that cannot work: printed as ``fewstep CMD: error: MESSAGE``, exit 2."""


# ---------------------------------------------------------------------------------------------
# argparse types
# ---------------------------------------------------------------------------------------------


def _int(text: str, what: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (an explicit 0 is an error, never replaced by a default)."""
    v = _int(text, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def nonnegative_int(text: str) -> int:
    v = _int(text, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def sampler_budget(text: str) -> tuple[str, int]:
    """``SAMPLER:NFE`` (e.g. ``dpmpp_3m:100``): a name and a positive NFE (the name is checked
    against the registry later, with the other names)."""
    name, sep, nfe = str(text).strip().partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected SAMPLER:NFE, e.g. dpmpp_3m:100, got {text!r}")
    return name.strip(), positive_int(nfe)


def int_at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        v = _int(text, f"an integer >= {low}")
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return v

    parse.__name__ = f"int>={low}"
    return parse


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return v


def unit_interval(text: str) -> float:
    """A number in [0, 1)."""
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def number_range(text: str) -> tuple[float, float]:
    """``LO,HI``: two finite numbers with ``0 <= LO <= HI``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 <= LO <= HI, got {text!r}")
    return lo, hi


def seed(text: str) -> int:
    """A seed: an integer from 0 to 2**63 - 1."""
    v = _int(text, f"an integer seed from 0 to {MAX_SEED}")
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED} (2**63 - 1), got {text!r}")
    return v


def _ints(text: str, what: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    try:
        vals = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    bad = [v for v in vals if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r} ({bad[0]} is not positive)")
    return vals


def nfe_list(text: str) -> list[int]:
    """Comma-separated NFE budgets: positive integers, each once."""
    vals = _ints(text, "comma-separated positive integers")
    dup = sorted({v for v in vals if vals.count(v) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"NFE {', '.join(map(str, dup))} given more than once in {text!r}; list each budget once")
    return vals


def shape_list(text: str) -> list[int]:
    """A sample shape, e.g. ``3,32,32``."""
    return _ints(text, "a sample shape as comma-separated positive integers, e.g. 3,32,32")


def name_list(text: str) -> list[str]:
    """Comma-separated names, at least one, each once."""
    vals = [v.strip() for v in str(text).split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    dup = sorted({v for v in vals if vals.count(v) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"{', '.join(dup)} given more than once in {text!r}; list each name once")
    return vals


# ---------------------------------------------------------------------------------------------
# What the values point at
# ---------------------------------------------------------------------------------------------


def _probe_writable(folder: Path, arg: str, value: Any) -> None:
    """Create and remove a file in ``folder`` (``os.access`` says yes to root on a read-only mount)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fewstep-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise UsageError(
            f"{arg} {str(value)!r}: cannot write in {str(folder)!r} ({err.strerror or err}); choose a folder you can write to"
        ) from None


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def _creatable(path: Path, arg: str, value: Any) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder."""
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise UsageError(f"{arg} {str(value)!r}: {str(anc)!r} is not a folder, so nothing can be created under it; choose another path")
    _probe_writable(anc, arg, value)


def output_file(path: Any, arg: str) -> Path:
    """A file the command will write: not a folder, not a special file, in a writable folder."""
    p = Path(path).expanduser()
    if str(path).strip() == "":
        raise UsageError(f"{arg} is empty; give a file name")
    if p.is_dir():
        raise UsageError(f"{arg} {str(path)!r} is a folder; give a file name (e.g. {str(p / 'plan.json')!r})")
    if p.exists() or p.is_symlink():
        if not p.is_file():
            raise UsageError(f"{arg} {str(path)!r} exists and is not a regular file; choose another file name")
        _probe_writable(p.absolute().parent, arg, path)
        if not os.access(p, os.W_OK):
            raise UsageError(f"{arg} {str(path)!r} exists and is read-only; choose another file name or make it writable")
        return p
    _creatable(p, arg, path)
    return p


def output_dir(path: Any, arg: str) -> Path:
    """A folder the command will write into: an existing writable folder, or one that can be created."""
    p = Path(path).expanduser()
    if str(path).strip() == "":
        raise UsageError(f"{arg} is empty; give a folder name")
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise UsageError(f"{arg} {str(path)!r} exists and is not a folder; choose a folder name (or move the file away)")
        _probe_writable(p, arg, path)
        return p
    _creatable(p, arg, path)
    return p


def existing_path(path: Any, arg: str, *, folder: bool | None = None, what: str = "") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{arg} {str(path)!r}: no such {'folder' if folder else 'file' if folder is False else 'file or folder'}"
                         + (f"; {what}" if what else ""))
    if folder is True and not p.is_dir():
        raise UsageError(f"{arg} {str(path)!r} is not a folder" + (f"; {what}" if what else ""))
    if folder is False and not p.is_file():
        raise UsageError(f"{arg} {str(path)!r} is not a regular file" + (f"; {what}" if what else ""))
    return p


def device(text: str | None, arg: str = "--device") -> str | None:
    """A torch device that exists on this machine (``None`` stays ``None``)."""
    if text is None:
        return None
    import torch

    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{arg} {text!r} is not a device ({first}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return str(text).strip()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{arg} {text!r}: no CUDA device is available; use {arg} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(
                f"{arg} {text!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}); use one of those"
            )
        return str(text).strip()
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"{arg} {text!r}: no Apple MPS device is available; use {arg} cpu")
        return str(text).strip()
    backend = getattr(torch, dev.type, None) if dev.type in ("xpu", "mtia", "hpu") else None
    if backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise UsageError(f"{arg} {text!r}: no {dev.type} device is available; use {arg} cpu")
        return str(text).strip()
    raise UsageError(f"{arg} {text!r}: fewstep cannot run on {dev.type!r} devices; use cpu, cuda, cuda:N or mps")


def image_folder(folder: Any, arg: str, *, same_size: bool, limit: int = 5, shape: tuple[int, int, int] | None = None,
                 shape_reason: str = "") -> int:
    """Every image file under ``folder`` opens with PIL (header only; nothing is decoded); with
    ``same_size``, all share one size and channel count as :func:`fewstep._util.load_images`
    needs; with ``shape`` (C, H, W), every image has it (``shape_reason`` says why).  Returns the
    number of images."""
    from PIL import Image

    from fewstep._util import IMAGE_EXTENSIONS, image_files

    p = Path(folder).expanduser()
    if not p.is_dir():
        raise UsageError(f"{arg} {str(folder)!r} is not a folder")
    try:
        files = image_files(p)
    except ValueError:
        raise UsageError(f"{arg} {str(folder)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under it; "
                         "point it at a folder of real images") from None
    bad: list[str] = []
    shapes: dict[tuple[int, int, int], Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
                key = (1 if im.mode == "L" else 3, h, w)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            bad.append(f"{f.relative_to(p)} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
            continue
        shapes.setdefault(key, f)
    if bad:
        shown = "; ".join(bad[:limit]) + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")
        raise UsageError(f"{arg} {str(folder)!r}: {len(bad)} of {len(files)} image files cannot be read as images: {shown}. "
                         "Remove or replace them")
    if same_size and len(shapes) > 1:
        shown = ", ".join(f"{c}x{h}x{w} ({f.relative_to(p)})" for (c, h, w), f in list(shapes.items())[:limit])
        raise UsageError(f"{arg} {str(folder)!r}: the images differ in size or channels ({shown}); "
                         "resize / convert them to one size and mode first")
    other = {k: f for k, f in shapes.items() if shape is not None and k != tuple(shape)}
    if other:
        shown = ", ".join(f"{c}x{h}x{w} ({f.relative_to(p)})" for (c, h, w), f in list(other.items())[:limit])
        raise UsageError(f"{arg} {str(folder)!r}: {shape_reason} takes {'x'.join(map(str, shape))} images, found {shown}; "
                         "use an extractor that resizes (inception, dinov2, clip) or resize the images")
    return len(files)


def image_zip(path: Any, arg: str, limit: int = 5) -> int:
    """A ``.zip`` archive whose image members all open with PIL (header only); returns their count."""
    import io
    import zipfile

    from PIL import Image

    from fewstep._util import IMAGE_EXTENSIONS

    p = Path(path).expanduser()
    try:
        with zipfile.ZipFile(p) as z:
            names = sorted(i.filename for i in z.infolist() if not i.is_dir() and Path(i.filename).suffix.lower() in IMAGE_EXTENSIONS)
            bad: list[str] = []
            for name in names:
                try:
                    with Image.open(io.BytesIO(z.read(name))):
                        pass
                except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                    bad.append(f"{name} ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    except (OSError, zipfile.BadZipFile) as err:
        raise UsageError(f"{arg} {str(path)!r} is not a readable zip archive ({err})") from None
    if not names:
        raise UsageError(f"{arg} {str(path)!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the archive")
    if bad:
        shown = "; ".join(bad[:limit]) + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")
        raise UsageError(f"{arg} {str(path)!r}: {len(bad)} of {len(names)} images in the archive cannot be read: {shown}")
    return len(names)


def module_spec(spec: str, arg: str) -> None:
    """``module:attribute`` names an importable module (found without running it where possible)."""
    module, sep, attr = str(spec).strip().partition(":")
    if not sep or not _IDENT.match(module) or not _IDENT.match(attr):
        raise UsageError(f"{arg} {spec!r}: expected 'module:attribute' (e.g. mypackage.models:denoiser)")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing or fails to import
        found = None
    if found is None:
        raise UsageError(
            f"{arg} {spec!r}: no module named {module!r} on the Python path; run from the folder that holds it, "
            "add that folder to PYTHONPATH, or install the package"
        )


def model_spec(spec: str, arg: str, names: Sequence[str], what: str) -> str:
    """``--model``: one of ``names``, a saved diffusers pipeline folder, or ``module:attribute``.
    Returns the kind: ``"name"``, ``"folder"`` or ``"python"``."""
    text = str(spec).strip()
    if text.lower() in names:
        return "name"
    p = Path(text).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise UsageError(f"{arg} {text!r} is a folder without model_index.json, so not a saved diffusers pipeline; "
                             "save one with pipeline.save_pretrained(folder)")
        return "folder"
    if p.exists():
        raise UsageError(f"{arg} {text!r} is a file; {what}")
    if ":" in text and "/" not in text.partition(":")[0] and "\\" not in text.partition(":")[0]:
        module_spec(text, arg)
        return "python"
    raise UsageError(f"{arg} {text!r}: no such folder; {what}")


# ---------------------------------------------------------------------------------------------
# Whose exception is it?
# ---------------------------------------------------------------------------------------------


def _library_roots() -> list[str]:
    roots = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            roots.add(sysconfig.get_paths()[key])
        except KeyError:
            pass
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs without it
        pass
    try:
        roots.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover
        pass
    return [os.path.realpath(r) for r in roots if r]


def _module_dirs(modules: Iterable[str]) -> list[str]:
    """Folders of the top-level packages of the user's ``module:attribute`` specs that are loaded."""
    out = []
    for m in modules:
        top = sys.modules.get(m.split(".")[0])
        if top is None:
            continue
        locs = list(getattr(top, "__path__", []) or [])
        if not locs and getattr(top, "__file__", None):
            locs = [os.path.dirname(top.__file__) if os.path.basename(top.__file__) == "__init__.py" else top.__file__]
        out += [os.path.realpath(loc) for loc in locs]
    return out


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def raised_in_user_code(err: BaseException, user_modules: Iterable[str] = ()) -> bool:
    """Whether ``err`` (or an exception it was raised from or during) went through the user's own
    code.  User code enters the command line only through ``module:attribute`` values
    (``user_modules``, their module names): without any, nothing is the user's.  With some, a
    frame counts when it lies in one of those modules' packages (wherever installed) or outside
    fewstep, the standard library and the installed packages (a helper module the user's module
    imported from their own folder)."""
    import fewstep

    user_modules = list(user_modules)
    if not user_modules:
        return False
    own = os.path.realpath(os.path.dirname(fewstep.__file__))
    libs = _library_roots()
    users = _module_dirs(user_modules)
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename
            if not name.startswith("<"):
                path = os.path.realpath(name)
                if _inside(path, users):
                    return True
                if not _inside(path, [own]) and not _inside(path, libs):  # fewstep first: it may live in site-packages
                    return True
            tb = tb.tb_next
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return False
