"""Feature extractors for Fréchet distance and KID: images in, one feature vector per image out.

A *feature extractor* is any callable ``extractor(images) -> features`` with a string attribute
``name`` (the cache key of reference statistics: two extractors with the same name must give the
same features).  ``images`` are float tensors ``(N, C, H, W)`` in ``[-1, 1]`` (fewstep's and
diffusers' convention); features are float32 ``(N, F)`` on the CPU.  Three kinds ship:

* :class:`DigitsFeatures`: the penultimate layer (64 units) of a small CNN classifier trained on the
  train split of scikit-learn's 8x8 digits (``scripts/train_digits_features.py``), weights shipped
  in ``fewstep/eval/data/digits_features.safetensors``.  The default for the embedded digits model.
* :class:`InceptionFeatures`: the 2048-d pool features of the TF-Inception network that FID is
  defined with, through clean-fid's TorchScript port ``inception-2015-12-05.pt``, in clean-fid's
  ``clean`` mode (PIL bicubic resize to 299x299 outside the network; Parmar et al. 2022, "On
  Aliased Resizing and Surprising Subtleties in GAN Evaluation") or its ``legacy_tensorflow`` mode
  (the network's own TensorFlow-style resize: the numbers most papers report).  The weights are
  never downloaded: without the file the constructor raises :class:`InceptionWeightsMissing`,
  naming the file and where to put it.
* :class:`fewstep.eval.dinov2.DinoV2Features` (``dinov2``): DINOv2 ViT-L/14 class-token features
  with dgm-eval's preprocessing (Stein et al. 2023), and :class:`fewstep.eval.clip.ClipFeatures`
  (``clip``): CLIP image embeddings as CMMD uses them (Jayasumana et al. 2024); both from a local
  ``transformers`` folder (:func:`find_weights_folder`), never downloaded, with the same kind of
  missing-weights error (:class:`WeightsMissing`);
* :class:`CallableFeatures`: any user callable.

:func:`get_extractor` resolves the names used on the command line (``digits``, ``inception``,
``inception-tf``, ``dinov2``, ``clip``, ``module:attribute``).  Extractors with a classifier
(digits, Inception) also have ``logits_from_features`` (Inception Score).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fewstep._util import close_matches

__all__ = [
    "FeatureExtractor",
    "DigitsFeatureNet",
    "DigitsFeatures",
    "digits_features",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "WeightsMissing",
    "TransformersFeatures",
    "rgb_uint8",
    "find_weights_folder",
    "WEIGHTS_ENV",
    "CallableFeatures",
    "get_extractor",
    "to_uint8",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "INCEPTION_ENV",
    "EXTRACTOR_NAMES",
]

#: The TorchScript port of TF-Inception that clean-fid (and StyleGAN2-ADA's metrics) use.
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
#: Environment variable naming a local copy (the file itself, or a folder holding it).
INCEPTION_ENV = "FEWSTEP_INCEPTION_PATH"
_DIGITS_WEIGHTS = "digits_features.safetensors"
INCEPTION_MODES = ("clean", "legacy_tensorflow")
EXTRACTOR_NAMES = ("digits", "inception", "inception-clean", "inception-tf", "inception-legacy-tensorflow", "dinov2", "clip")
#: Environment variables naming the local weight folders of the transformers-based extractors.
WEIGHTS_ENV = {"dinov2": "FEWSTEP_DINOV2_PATH", "clip": "FEWSTEP_CLIP_PATH"}
#: What to save into such a folder (on a machine that may download), per extractor.
_WEIGHTS_SOURCE = {
    "dinov2": ("DINOv2 ViT-L/14", "transformers.Dinov2Model.from_pretrained('facebook/dinov2-large')"),
    "clip": ("CLIP ViT-L/14 at 336 px", "transformers.CLIPVisionModelWithProjection.from_pretrained('openai/clip-vit-large-patch14-336')"),
}


@runtime_checkable
class FeatureExtractor(Protocol):
    """``extractor(images (N, C, H, W) in [-1, 1]) -> (N, F) float32`` with a cache key ``name``."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: Any, who: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who} takes a torch.Tensor of images (N, C, H, W) in [-1, 1], got {type(images).__name__}")
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"{who} takes float images of shape (N, C, H, W) in [-1, 1], got {images.dtype} of shape {tuple(images.shape)}"
        )
    return images


def rgb_uint8(images: Any, who: str) -> torch.Tensor:
    """Float images (N, 1 or 3, H, W) in [-1, 1] to uint8 RGB (N, 3, H, W) on the CPU: grey is
    repeated to three channels (PIL's ``convert("RGB")``), values quantised as saving would."""
    x = _check_images(images, who)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{who} takes grey or RGB images (C = 1 or 3), got C = {x.shape[1]}")
    return to_uint8(x.cpu())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in ``[-1, 1]`` to uint8 ``[0, 255]`` exactly as saving them would (diffusers'
    ``numpy_to_pil``: ``round(255 * clamp((x + 1) / 2, 0, 1))``), so features of generated tensors
    equal features of the same images read back from PNG files."""
    x = (images.detach().to(torch.float32) / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Digits features
# ---------------------------------------------------------------------------------------------


class DigitsFeatureNet(nn.Module):
    """A small CNN for 8x8 grey digits: ``conv3x3(32) - conv3x3(64) - maxpool - conv3x3(64) -
    maxpool - linear(64)`` (the feature layer, after ReLU) ``- linear(10)`` (class logits)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _package_file(subpackage: str, relative: str) -> Path:
    try:
        return Path(str(importlib.resources.files(subpackage).joinpath(relative)))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - unusual importers
        return Path(__file__).resolve().parent / relative


def _sha256(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


class DigitsFeatures:
    """Features of the shipped digits classifier: ``(N, 1, 8, 8)`` in ``[-1, 1]`` to ``(N, 64)``.

    Pixels are clamped to ``[-1, 1]`` first (the image range; what saving the image would do).
    Features are multiplied by the ``feature_scale`` stored with the weights, which makes the
    train split's mean squared feature 1 (the scale KID's kernel ``(x.y/d + 1)^3`` expects).
    ``weights`` defaults to the file shipped in the package."""

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str | None = None):
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(weights) if weights is not None else _package_file("fewstep.eval", f"data/{_DIGITS_WEIGHTS}")
        if not path.is_file():
            raise FileNotFoundError(
                f"the digits feature network {path} is missing; reinstall fewstep or regenerate it with "
                "`python scripts/train_digits_features.py`"
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        self.net = DigitsFeatureNet(int(meta.get("width", 32)), int(meta.get("feature_dim", 64)))
        self.net.load_state_dict(load_file(str(path)), strict=True)
        self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.metadata = meta
        self.dim = int(meta.get("feature_dim", 64))
        self.scale = float(meta.get("feature_scale", 1.0))
        self.name = f"digits-cnn-{_sha256(path)}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _check_images(images, "DigitsFeatures")
        if tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"DigitsFeatures takes 8x8 grey images (N, 1, 8, 8), got shape {tuple(x.shape)}; "
                "use InceptionFeatures or your own extractor for other images"
            )
        with torch.no_grad():
            f = self.net.features(x.to(self.device, torch.float32).clamp(-1, 1)) * self.scale
        return f.cpu()

    def logits_from_features(self, features: Any) -> np.ndarray:
        """The classifier's 10 logits from features this extractor returned (scale undone)."""
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32) / self.scale
        with torch.no_grad():
            return self.net.logits(f.to(self.device)).cpu().double().numpy()

    def __repr__(self) -> str:
        return f"DigitsFeatures(name={self.name!r}, dim={self.dim})"


def digits_features(device: torch.device | str | None = None) -> DigitsFeatures:
    """The shipped digits feature extractor (``(N, 1, 8, 8)`` in ``[-1, 1]`` to ``(N, 64)``)."""
    return DigitsFeatures(device=device)


# ---------------------------------------------------------------------------------------------
# Inception through clean-fid
# ---------------------------------------------------------------------------------------------


class WeightsMissing(FileNotFoundError):
    """A feature network's weights are not on this machine (fewstep never downloads them)."""


class InceptionWeightsMissing(WeightsMissing):
    """The Inception TorchScript file is not on this machine (fewstep never downloads it)."""


def find_weights_folder(kind: str, path: str | os.PathLike | None = None) -> Path:
    """The local ``transformers`` folder (``config.json`` and ``*.safetensors``) of the ``dinov2``
    or ``clip`` extractor: ``path``, else ``$FEWSTEP_DINOV2_PATH`` / ``$FEWSTEP_CLIP_PATH``.
    Never downloads; raises :class:`WeightsMissing` saying what to put where."""
    env = WEIGHTS_ENV[kind]
    what, how = _WEIGHTS_SOURCE[kind]
    origin, given = ("argument", path) if path is not None else (f"${env}", os.environ.get(env))
    problem = "no folder given"
    if given:
        p = Path(given).expanduser()
        if not p.is_dir():
            problem = f"{p} ({origin}) is not a folder"
        elif not (p / "config.json").is_file():
            problem = f"{p} ({origin}) has no config.json"
        elif not list(p.glob("*.safetensors")):
            problem = f"{p} ({origin}) has no .safetensors weights (pickled .bin files are not loaded)"
        else:
            return p
    raise WeightsMissing(
        f"{what} weights not found: {problem}. fewstep never downloads them. On a machine with network access run "
        f"{how}.save_pretrained(FOLDER) (safetensors), copy FOLDER here and point {env}=FOLDER (or `--weights-path "
        f"FOLDER`, or path=FOLDER) at it."
    )


class TransformersFeatures:
    """The part the ``transformers``-based extractors share: the network ``transformers.<cls_name>``
    from the local folder of :func:`find_weights_folder` (``local_files_only``, safetensors only;
    eval mode, no gradients), a cache key ``<kind>-<digest of config and weights>``, and batched
    calls of :meth:`forward` on :meth:`preprocess`'d uint8 RGB images.  Subclasses set ``kind``,
    ``cls_name`` and ``dim`` and write the two methods."""

    kind = ""
    cls_name = ""

    def __init__(self, path: str | os.PathLike | None = None, device: torch.device | str | None = None, batch_size: int = 32):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.path = find_weights_folder(self.kind, path)
        try:
            import transformers
        except ImportError as err:
            raise ImportError(f"the {self.kind} extractor needs transformers: pip install 'fewstep[features]' ({err})") from None
        model = getattr(transformers, self.cls_name).from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.batch_size = int(batch_size)
        h = hashlib.sha256()
        for p in sorted([self.path / "config.json", *self.path.glob("*.safetensors")]):
            h.update(p.name.encode() + b"\0" + _sha256(p, 64).encode())
        self.name = f"{self.kind}-{h.hexdigest()[:12]}"

    def preprocess(self, u8: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        u8 = rgb_uint8(images, type(self).__name__)
        feats = []
        with torch.no_grad():
            for i in range(0, u8.shape[0], self.batch_size):
                feats.append(self.forward(self.preprocess(u8[i : i + self.batch_size]).to(self.device)).float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path='{self.path}', dim={self.dim})"


def cleanfid_inception_location() -> Path:
    """Where clean-fid itself keeps (and would download) ``inception-2015-12-05.pt``."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def find_inception(path: str | os.PathLike | None = None) -> Path:
    """The Inception file to use: ``path`` (a file, or a folder holding ``inception-2015-12-05.pt``),
    else ``$FEWSTEP_INCEPTION_PATH``, else clean-fid's own location.  Never downloads; raises
    :class:`InceptionWeightsMissing` saying which file to put where."""
    tried: list[str] = []
    candidates: list[tuple[str, str]] = []
    if path is not None:
        candidates.append(("argument", str(path)))
    elif os.environ.get(INCEPTION_ENV):
        candidates.append((f"${INCEPTION_ENV}", os.environ[INCEPTION_ENV]))
    else:
        candidates.append(("clean-fid's location", str(cleanfid_inception_location())))
    for origin, c in candidates:
        p = Path(c).expanduser()
        if p.is_dir():
            p = p / INCEPTION_FILE
        if p.is_file():
            return p
        tried.append(f"{p} ({origin})")
    raise InceptionWeightsMissing(
        f"Inception weights not found: looked for {'; '.join(tried)}. fewstep never downloads them. "
        f"Copy {INCEPTION_FILE} (from {INCEPTION_URL}, about 95 MB) to {cleanfid_inception_location()} "
        f"(where clean-fid looks), or point {INCEPTION_ENV}=/path/to/{INCEPTION_FILE} (or "
        "`--inception-path` / InceptionFeatures(path=...)) at a local copy. "
        "Without it, use the digits extractor or your own (extractor='module:callable')."
    )


class InceptionFeatures:
    """2048-d TF-Inception pool features through clean-fid's TorchScript port, from a local file.

    Args:
        mode: ``"clean"`` (clean-fid's default: PIL bicubic resize of each channel to 299x299 in
            float, then the network's layers on ``(x - 128) / 128``) or ``"legacy_tensorflow"``
            (the network's own TensorFlow-compatible resize: the FID most papers report).
        path: the file (or a folder holding it); default ``$FEWSTEP_INCEPTION_PATH``, then
            clean-fid's location (:func:`cleanfid_inception_location`).
        device, batch_size: where and in what batches the network runs.
        workers: threads for clean mode's PIL resizing (PIL releases the GIL while resizing);
            default ``min(8, os.cpu_count())``.

    Images are quantised to uint8 as saving would (:func:`to_uint8`) and grey images are repeated
    to RGB (PIL's ``convert("RGB")``), so a tensor and the same images in a folder give the same
    features, equal to clean-fid's ``get_folder_features`` on that folder.
    """

    dim = 2048

    def __init__(
        self,
        mode: str = "clean",
        path: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        workers: int | None = None,
    ):
        if mode not in INCEPTION_MODES:
            raise ValueError(f"unknown Inception mode {mode!r}{close_matches(mode, INCEPTION_MODES)}; use 'clean' or 'legacy_tensorflow'")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.mode = mode
        self.path = find_inception(path)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.batch_size = int(batch_size)
        self.workers = int(workers) if workers is not None else min(8, os.cpu_count() or 1)
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; the file format is what it is
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as err:  # a truncated download, or not TorchScript at all
            raise ValueError(
                f"{self.path} is not a loadable TorchScript Inception file ({type(err).__name__}: {err}); "
                f"replace it with a complete copy of {INCEPTION_URL}"
            ) from None
        if not hasattr(self.net, "layers"):
            raise ValueError(f"{self.path} has no `layers` submodule: it is not clean-fid's {INCEPTION_FILE}")
        self.name = f"inception-{mode}-{_sha256(self.path)}"
        self._resize = None
        if mode == "clean":
            from cleanfid.resize import build_resizer

            self._resize = build_resizer("clean")

    def _prepare(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) to the float32 batch clean-fid feeds its network."""
        if self._resize is None:  # legacy_tensorflow: the network resizes
            return u8.to(torch.float32)
        hwc = list(u8.permute(0, 2, 3, 1).numpy())
        if self.workers > 1 and len(hwc) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.workers) as pool:
                resized = list(pool.map(self._resize, hwc))
        else:
            resized = [self._resize(img) for img in hwc]
        out = np.stack(resized)  # (B, 299, 299, 3) float32 in [0, 255]
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        u8 = rgb_uint8(images, "InceptionFeatures")
        feats = []
        with torch.no_grad():
            for i in range(0, u8.shape[0], self.batch_size):
                b = self._prepare(u8[i : i + self.batch_size]).to(self.device)
                if self.mode == "clean":
                    f = self.net.layers.forward((b - 128) / 128)
                else:
                    f = self.net(b, return_features=True)
                feats.append(f.reshape(b.shape[0], self.dim).float().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)

    def logits_from_features(self, features: Any) -> np.ndarray:
        """The 1008 class logits of pool features this extractor returned: ``features @ W^T``
        with the output layer's weight and *without its bias*, as the Inception Score of Salimans
        et al. computes them (``no_output_bias=True`` in StyleGAN2-ADA's TorchScript call)."""
        w = self.net.output.weight.detach().to("cpu", torch.float64).numpy()
        return np.asarray(features, dtype=np.float64) @ w.T

    def __repr__(self) -> str:
        return f"InceptionFeatures(mode={self.mode!r}, path='{self.path}')"


# ---------------------------------------------------------------------------------------------
# User callables and name resolution
# ---------------------------------------------------------------------------------------------


class CallableFeatures:
    """Any callable ``fn(images) -> (N, F)`` (tensor or array) as a feature extractor.

    ``name`` is the cache key; it defaults to the callable's module and qualified name, so change
    it when the callable's behaviour changes (new weights), or cached statistics go stale."""

    def __init__(self, fn: Callable[[torch.Tensor], Any], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"a feature extractor must be callable, got {type(fn).__name__}")
        self.fn = fn
        if name is None:
            name = getattr(fn, "name", None) or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.name = str(name)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.fn(images)
        f = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out), dtype=torch.float32)
        if f.ndim != 2 or f.shape[0] != images.shape[0]:
            raise ValueError(
                f"feature extractor {self.name!r} returned shape {tuple(f.shape)} for {images.shape[0]} images; "
                "it must return one feature vector per image, shape (N, F)"
            )
        return f

    def __repr__(self) -> str:
        return f"CallableFeatures(name={self.name!r})"


def import_object(spec: str) -> Any:
    """``"package.module:attribute"`` (attribute may be dotted) to the object it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:attribute', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} from {spec!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def get_extractor(
    extractor: str | FeatureExtractor | Callable[[torch.Tensor], Any] = "digits",
    *,
    inception_path: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> FeatureExtractor:
    """A feature extractor from a name or an object.

    ``"digits"``: :class:`DigitsFeatures`; ``"inception"`` / ``"inception-clean"``: Inception in
    clean-fid's clean mode; ``"inception-tf"`` / ``"inception-legacy-tensorflow"``: its
    legacy_tensorflow mode; ``"dinov2"`` / ``"clip"``: the transformers-based extractors from
    ``weights_path`` (or their environment variable); ``"module:attribute"``: an object imported from Python (a class is
    instantiated without arguments); an object with ``name`` is used as it is; any other callable
    is wrapped in :class:`CallableFeatures`."""
    if isinstance(extractor, str):
        key = extractor.strip().lower()
        if key == "digits":
            return DigitsFeatures(device=device)
        if key in ("inception", "inception-clean"):
            return InceptionFeatures("clean", inception_path, device)
        if key in ("inception-tf", "inception-legacy-tensorflow", "inception-legacy_tensorflow"):
            return InceptionFeatures("legacy_tensorflow", inception_path, device)
        if key == "dinov2":
            from fewstep.eval.dinov2 import DinoV2Features

            return DinoV2Features(weights_path, device=device)
        if key == "clip":
            from fewstep.eval.clip import ClipFeatures

            return ClipFeatures(weights_path, device=device)
        if ":" in extractor:
            obj = import_object(extractor.strip())
            if isinstance(obj, type):
                obj = obj()
            if isinstance(obj, FeatureExtractor):
                return obj
            return CallableFeatures(obj, name=extractor.strip())
        raise ValueError(
            f"unknown feature extractor {extractor!r}{close_matches(key, EXTRACTOR_NAMES)}; use one of "
            f"{', '.join(EXTRACTOR_NAMES)}, or 'module:callable' for your own"
        )
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if callable(extractor):
        return CallableFeatures(extractor)
    raise TypeError(f"extractor must be a name, a feature extractor or a callable, got {type(extractor).__name__}")
