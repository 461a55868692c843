r"""What all consistency objectives share: interval pairs on a time grid, the forward process, the
consistency map (to the boundary, or to a segment's edge), the distance and the loss.

With a grid ``t_max = tau_N > ... > tau_1 > tau_0`` (``tau_0`` the student's boundary) an
objective draws per sample an interval ``n``, noises clean data to ``x_{n+1} = alpha x_0 + sigma
eps`` at ``tau_{n+1}``, gets the point ``x_hat_n`` at ``tau_n`` (a teacher ODE step for the
distillation objectives, the same noise at the lower level for consistency training) and minimises

.. math::  \mathcal{L} = \mathbb{E}\big[\lambda_n\, d\big(f_\theta(x_{n+1}, \tau_{n+1}),\
           \mathrm{sg}(f_{\theta^-}(\hat x_n, \tau_n))\big)\big]

(Song et al. 2023, "Consistency Models", eq. 7), ``theta^-`` an EMA of ``theta`` or ``theta``
itself under stop-gradient.  ``f`` maps to the boundary, or (multistep / segment-wise
consistency, :mod:`fewstep.distill.mcd`) to the edge of the sample's segment with the registry's
DDIM step.  Subclasses (one file each) choose the grid, the second point, the distance and the
weighting, and name the registry sampler their student is meant for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fewstep.distill.data import randint, randn
from fewstep.distill.immiscible import noise_assignment as noise_assignment_option
from fewstep.distill.student import BoundaryCondition
from fewstep.distill.teacher import IntervalSolver
from fewstep.schedules import NoiseSchedule

__all__ = ["Batch", "Models", "Objective", "TrainableNetwork", "ConsistencyObjective", "LOSSES", "consistency_distance", "RandomState"]

LOSSES = ("l2", "pseudo_huber", "huber", "cauchy")


@dataclass
class Batch:
    """One micro-batch: clean data, its conditioning and one generator per sample."""

    x0: torch.Tensor
    cond: dict[str, Any]
    gens: list[torch.Generator]
    step: int


@dataclass
class Models:
    """The networks an objective calls: ``student`` (trained), ``target`` (no gradient; the EMA
    network, or the student itself under stop-gradient) and ``teacher`` (a denoiser, or None)."""

    student: Callable[..., torch.Tensor]
    target: Callable[..., torch.Tensor]
    teacher: Callable[..., torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    #: the objective's other trainable networks (:meth:`ConsistencyObjective.extra_networks`), as
    #: the trainer prepared them (DDP-wrapped under several processes), by name
    networks: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainableNetwork:
    """A trainable network of an objective besides the student (rCM's fake score, sCM's
    log-variance head), with its own optimizer: AdamW with these settings (``None``: the run's
    ``DistillConfig`` value).  The trainer prepares it with accelerate (DDP), checkpoints it with
    its optimizer and LR schedule, and steps it at the training steps whose :meth:`phase` names it."""

    module: torch.nn.Module
    lr: float | None = None
    adam_betas: tuple[float, float] | None = None
    weight_decay: float | None = None


@dataclass
class RandomState:
    """The global torch random state (CPU, and the CUDA device in use), saved to replay the same
    draws (dropout masks) in a second forward pass."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None = None

    @classmethod
    def save(cls, device: torch.device | str) -> "RandomState":
        device = torch.device(device)
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float) -> torch.Tensor:
    """Per-sample distance (B,) between two batches.

    * ``l2``: mean squared difference.
    * ``pseudo_huber``: ``sqrt(||a - b||^2 + c^2) - c`` over the whole sample (Song & Dhariwal
      2023, "Improved Techniques for Training Consistency Models", sec. 3.3).
    * ``huber``: the same per element, then the mean (LCM's training code, ``c = 0.001``).
    * ``cauchy``: ``log(1 + ||a - b||^2 / (2 c^2))`` over the whole sample (Dao et al. 2025,
      "Improved Training Technique for Latent Consistency Models", sec. 4.1; Barron's robust loss
      with shape 0): it grows only logarithmically, so outlying pairs weigh far less than under
      pseudo-Huber, whose tail is linear.
    """
    diff = (a - b).flatten(1).float()
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "pseudo_huber":
        return torch.sqrt(diff.square().sum(1) + c * c) - c
    if kind == "huber":
        return (torch.sqrt(diff.square() + c * c) - c).mean(1)
    if kind == "cauchy":
        return torch.log1p(diff.square().sum(1) / (2.0 * c * c))
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


class Objective(ABC):
    """What the trainer needs of any objective: a name and paper, :meth:`bind` once, :meth:`loss`
    per micro-batch, the student module it trains (:meth:`make_student`) and how that student is
    saved (:meth:`save_student`).  :class:`ConsistencyObjective` is the consistency family; objectives
    whose student is not a consistency function (BOOT's noise-to-trajectory generator, MMD's
    fine-tuned diffusion model) derive from this class directly."""

    name: ClassVar[str]
    paper: ClassVar[str]
    needs_teacher: ClassVar[bool] = True
    #: False for data-free objectives (BOOT): the trainer's data source then only supplies noise
    needs_data: ClassVar[bool] = True
    #: the registry sampler the student is meant for (recorded with the checkpoint)
    sampler: ClassVar[str] = "cm_multistep"
    #: EMA rate of a target network (0: none)
    target_ema: float = 0.0

    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        """Attach the schedule, the data shape and the number of training steps."""
        self.schedule = schedule
        self.data_shape = tuple(int(s) for s in data_shape)
        self.total_steps = int(total_steps)

    def sampler_options(self) -> dict[str, Any]:
        """Options of :attr:`sampler` the student needs (recorded with the checkpoint)."""
        return {}

    def extra_networks(self, student: Any, teacher: Any) -> dict[str, "TrainableNetwork"]:
        """Trainable networks besides the student, by name (called once, after :meth:`bind`, with
        the built student and the teacher); none by default."""
        return {}

    def phase(self, step: int) -> tuple[str, ...] | None:
        """The networks whose optimizers step at training step ``step`` (``"student"`` and names of
        :meth:`extra_networks`); ``None`` (default): all of them.  :meth:`loss` returns the loss of
        that phase (alternating updates, as rCM's student / fake-score steps)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the checkpoint metadata."""
        return {"objective": self.name, "paper": self.paper, "target_ema": self.target_ema}

    @abstractmethod
    def make_student(self, network: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                     guidance_embedding_dim: int | None = None) -> torch.nn.Module:
        """The trained module around ``network`` (it must expose ``network``, ``schedule``,
        ``prediction_type`` and ``describe()``)."""

    def save_student(self, folder: Any, student: torch.nn.Module, description: dict[str, Any],
                     scheduler_config: Any = None) -> Any:
        """Write the student folder (diffusers format + ``fewstep_student.json``)."""
        from fewstep.distill.export import save_student

        return save_student(folder, student, description, scheduler_config)

    @abstractmethod
    def loss(self, models: "Models", batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch (a scalar with gradient) and logs."""


class ConsistencyObjective(Objective):
    """Base class of the consistency objectives.  Construct with the options; the trainer then calls
    :meth:`bind` once (schedule, data shape, number of steps) and :meth:`loss` per micro-batch.

    ``noise_assignment`` (every objective): ``True``, ``"exact"``, ``"fp16"`` or a
    :class:`fewstep.distill.immiscible.NoiseAssignment` assigns each micro-batch's noises to its
    data before noising (immiscible diffusion, Li et al. 2024); ``None``: independent noise."""

    def __init__(self, *, loss: str = "l2", loss_c: float | None = None, target_ema: float = 0.95, boundary_scale: float = 10.0, sigma_data: float = 0.5,
                 noise_assignment: Any = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
        if not 0.0 <= float(target_ema) < 1.0:
            raise ValueError(f"target_ema must be in [0, 1) (0: stop-gradient target, no EMA network), got {target_ema}")
        self.loss_kind = loss
        self.loss_c = loss_c
        self.target_ema = float(target_ema)
        self.boundary_scale = float(boundary_scale)
        self.sigma_data = float(sigma_data)
        #: immiscible noise assignment (:mod:`fewstep.distill.immiscible`), or None: independent noise
        self.noise_assignment = noise_assignment_option(noise_assignment)
        self.schedule: NoiseSchedule | None = None
        self.data_shape: tuple[int, ...] = ()
        self.total_steps = 0
        self.skip = 1  # grid points spanned by one pair: tau_{n+skip} -> tau_n

    # -- set-up ---------------------------------------------------------------------------------
    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        """Attach the schedule and the data shape; subclasses build their grids here."""
        super().bind(schedule, data_shape, total_steps)
        if self.loss_c is None:
            d = math.prod(self.data_shape)
            self.loss_c = 0.00054 * math.sqrt(d) if self.loss_kind in ("pseudo_huber", "cauchy") else 0.001
        self.edge_solver = IntervalSolver("ddim", schedule)

    @abstractmethod
    def boundary_time(self) -> float:
        """The student's boundary ``tau_0``."""

    def boundary(self) -> BoundaryCondition:
        return BoundaryCondition(self.boundary_time(), self.boundary_scale, self.sigma_data)

    def make_student(self, network: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str,
                     guidance_embedding_dim: int | None = None) -> torch.nn.Module:
        """A :class:`ConsistencyStudent` with this objective's boundary condition."""
        from fewstep.distill.student import ConsistencyStudent

        return ConsistencyStudent(network, schedule, prediction_type, self.boundary(), guidance_embedding_dim)

    @abstractmethod
    def grid_at(self, step: int) -> torch.Tensor:
        """Increasing float64 grid ``tau_0 < ... < tau_N`` in use at training step ``step``."""

    def describe(self) -> dict[str, Any]:
        """Plain-data description for the checkpoint metadata."""
        return {
            "objective": self.name,
            "paper": self.paper,
            "loss": self.loss_kind,
            "loss_c": self.loss_c,
            "target_ema": self.target_ema,
            "noise_assignment": self.noise_assignment.describe() if self.noise_assignment is not None else None,
        }

    # -- per-batch pieces subclasses may change ---------------------------------------------------
    def draw_intervals(self, batch: Batch, grid: torch.Tensor) -> torch.Tensor:
        """(B,) interval indices ``n`` (the pair is ``tau_{n+skip} -> tau_n``); uniform by default."""
        return randint(batch.gens, len(grid) - self.skip)

    def weights(self, grid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights ``lambda_n``; 1 by default."""
        return torch.ones(n.shape, dtype=torch.float64)

    def edges(self, grid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(B,) grid index of the point the consistency map of interval ``n`` lands on (0: the
        boundary)."""
        return torch.zeros_like(n)

    def loss_scale(self, step: int) -> float:
        """The distance's ``c`` at training step ``step``: :attr:`loss_c` (sLCT adapts it)."""
        return float(self.loss_c)

    def draw_noise(self, batch: Batch) -> torch.Tensor:
        """The micro-batch's noise, one row per sample from its generator, then assigned to the
        data by :attr:`noise_assignment` when one is set (a permutation of the rows)."""
        eps = randn(batch.gens, batch.x0.shape[1:], device=batch.x0.device)
        return eps if self.noise_assignment is None else self.noise_assignment(batch.x0, eps)

    def auxiliary_loss(self, pred: torch.Tensor, batch: Batch, t_hi: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A term added to the consistency loss (sLCT's diffusion loss), from the student's
        prediction ``pred`` at ``x_{n+1}``; ``None`` by default."""
        return None, {}

    def draw_extras(self, batch: Batch) -> dict[str, Any]:
        """Extra per-sample draws (the guidance scale in LCD); passed on to the calls below."""
        return {}

    def network_cond(self, batch: Batch, extras: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of student and target calls."""
        return dict(batch.cond)

    @abstractmethod
    def lower_point(self, models: Models, batch: Batch, x_hi: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, eps: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """``x_hat_n`` at ``t_lo`` from ``x_{n+1}`` at ``t_hi`` (no gradient)."""

    # -- shared maths -------------------------------------------------------------------------------
    def noised(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The forward process ``alpha(t) x0 + sigma(t) eps`` with one time per sample."""
        la, ls = self.schedule.log_alpha_sigma(t.detach().to("cpu", torch.float64))
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = torch.exp(la).to(x0.device, torch.float32).reshape(shape)
        s = torch.exp(ls).to(x0.device, torch.float32).reshape(shape)
        return a * x0.float() + s * eps.float()

    def consistency_map(self, model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, t_edge: torch.Tensor, cond: dict[str, Any], at_boundary: torch.Tensor) -> torch.Tensor:
        """``f(x, t)``: the model's output where the edge is the boundary, else the registry DDIM
        step from ``t`` to ``t_edge`` with the model's output as data prediction (identity where
        ``t == t_edge``)."""
        if bool(at_boundary.all()):
            return model(x, t.to(x.device), **cond).float()
        return self.edge_solver(model, x, t, t_edge, cond).float()

    def prediction(self, models: Models, x_hi: torch.Tensor, t_hi: torch.Tensor, t_edge: torch.Tensor, cond: dict[str, Any], at_boundary: torch.Tensor) -> torch.Tensor:
        """The student's side of the distance (with gradient): its consistency map at ``x_{n+1}``."""
        return self.consistency_map(models.student, x_hi, t_hi, t_edge, cond, at_boundary)

    def reference(self, models: Models, x_lo: torch.Tensor, t_lo: torch.Tensor, t_edge: torch.Tensor, cond: dict[str, Any], at_boundary: torch.Tensor, x_hi: torch.Tensor, t_hi: torch.Tensor) -> torch.Tensor:
        """The target's side (called under ``no_grad``): the target network's consistency map at
        ``x_hat_n``.  ``x_hi``, ``t_hi`` let a subclass express it in another space (MCD: x-space)."""
        return self.consistency_map(models.target, x_lo, t_lo, t_edge, cond, at_boundary)

    def loss(self, models: Models, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted consistency loss of one micro-batch (a scalar with gradient) and logs.

        Student and target run from the same random state (saved before the student's forward and
        restored before the target's), so a network with dropout draws the same mask in both, as
        consistency_models' ``consistency_losses`` (``th.get_rng_state`` / ``th.set_rng_state``)
        and ECT do; without it the target would differ from the prediction by the dropout noise
        alone.  The student runs first, as there: under autocast, torch (2.6) caches the low-precision
        copy of a weight that requires grad, and a copy made first under ``no_grad`` (a target that
        is the student itself, LoRA) would cut the student's graph."""
        grid = self.grid_at(batch.step)
        n = self.draw_intervals(batch, grid)
        e = self.edges(grid, n)
        t_hi, t_lo, t_edge = grid[n + self.skip], grid[n], grid[e]
        eps = self.draw_noise(batch)
        extras = self.draw_extras(batch)
        cond = self.network_cond(batch, extras)
        x_hi = self.noised(batch.x0, t_hi, eps)
        with torch.no_grad():
            x_lo = self.lower_point(models, batch, x_hi, t_hi, t_lo, eps, extras)
        rng = RandomState.save(x_hi.device)
        pred = self.prediction(models, x_hi, t_hi, t_edge, cond, e == 0)
        rng.restore()
        with torch.no_grad():
            target = self.reference(models, x_lo, t_lo, t_edge, cond, e == 0, x_hi, t_hi)
        w = self.weights(grid, n).to(pred.device, torch.float32)
        per_sample = consistency_distance(pred, target.detach(), self.loss_kind, self.loss_scale(batch.step))
        loss = (w * per_sample).mean()
        extra, logs = self.auxiliary_loss(pred, batch, t_hi, n)
        if extra is not None:
            loss = loss + extra
        return loss, {"intervals": float(len(grid) - self.skip), **logs}
