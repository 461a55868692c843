"""One trainer for every consistency objective, on ``accelerate``.

:class:`Distiller` owns the student (a :class:`ConsistencyStudent`), its target network (an EMA
copy, or the student under stop-gradient), the frozen teacher and the optimizer, and runs
``objective.loss`` per micro-batch.  What it takes care of, the same for every objective:

* **Processes.**  ``accelerate`` prepares the student (DDP across GPUs and machines; FSDP through
  an accelerate config, for objectives without an EMA network), the optimizer and the LR schedule.
  The global batch is split over processes and micro-batches; every sample's random draws come
  from ``(seed, step, global sample index)`` (:mod:`fewstep.distill.data`), the global torch RNG
  of rank ``r`` is reseeded from ``(seed, r, step)`` each step, so one process and several give
  the same run.
* **Precision.**  ``precision="bf16"``/``"fp16"``: autocast over student, target and teacher
  calls, fp32 master weights (the optimizer updates fp32 parameters; fp16 uses a gradient
  scaler), the frozen teacher stored in the autocast dtype.  Gradient accumulation and clipping,
  gradient checkpointing (``enable_gradient_checkpointing``), attention through PyTorch SDPA by
  default or xformers when installed and working, optional ``torch.compile`` of the student.
* **Non-finite guard.**  A non-finite loss on any rank is summed over ranks before the backward
  pass, so every rank skips the same step (the optimizer is not touched); ``max_nonfinite``
  consecutive skips stop the run with an explanation.
* **Checkpoints.**  Atomic, with ``resume="latest"`` and a retention limit
  (:mod:`fewstep.distill.checkpoint`); a run killed at any moment resumes from its last checkpoint
  and continues exactly as if it had not stopped.  Nothing is unpickled on resume: the EMA target
  and the counters are fewstep's own safetensors / JSON files, and every ``torch.save`` file of
  the checkpoint is verified with ``weights_only=True`` before accelerate reads it.  A folder that
  already holds something is refused unless the run resumes (``resume=``); a resume whose
  settings differ from the checkpoint's says which value is used (the checkpoint's learning
  rate, betas and weight decay, which its optimizer state carries; this run's other settings).
* **Data.**  In-memory sources draw from the per-sample generators; streaming sources
  (:mod:`fewstep.distill.stream`) are read by position, decoded in DataLoader workers and
  encoded on the training device, and their position is saved with every checkpoint.
* **Averages.**  The target EMA of the loss and a separate sampling EMA (:mod:`fewstep.distill.ema`),
  which is validated and exported by default.
* **Result.**  The student in diffusers format plus the JSON naming its sampler, or for a LoRA
  student its adapter in diffusers' LoRA format (:mod:`fewstep.distill.export`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep._dist import launched_distributed
from fewstep._util import atomic_write_text, derived_seed
from fewstep.distill.checkpoint import EMA_FILE, LORA_FILE, SAMPLING_EMA_FILE, CheckpointDir, check_output_dir, verify_checkpoint, write_state
from fewstep.distill.data import DataSource, sample_generators
from fewstep.distill.ema import SamplingEMA, ema_update
from fewstep.distill.export import save_lora_student
from fewstep.distill.objective import Batch, ConsistencyObjective, Models, Objective, TrainableNetwork
from fewstep.distill.student import ConsistencyStudent
from fewstep.distill.teacher import AdaptersOff
from fewstep.models.diffusers_models import DiffusersDenoiser
from fewstep.models.prediction import check_prediction_type
from fewstep.schedules import NoiseSchedule

__all__ = ["DistillConfig", "Distiller", "DistillResult", "PRECISIONS", "ATTENTION", "LORA_FILE"]

#: the trainable (LoRA) parameters of a LoRA student in a checkpoint, instead of model.safetensors


PRECISIONS = ("no", "bf16", "fp16")
ATTENTION = ("auto", "sdpa", "xformers", "keep")
EXPORTS = ("sampling_ema", "online")
OPTIMIZERS = ("adamw", "adamw8bit")
#: tracker name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass
class DistillConfig:
    """Training settings (everything but the models, the data and the objective).

    ``batch_size`` is the global batch (all processes and accumulation steps together); it must
    be divisible by ``processes * grad_accum``."""

    output_dir: str | os.PathLike = "distill-out"
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    precision: str = "no"
    gradient_checkpointing: bool = False
    attention: str = "auto"
    compile: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 3
    resume: str | os.PathLike | None = None
    seed: int = 0
    max_nonfinite: int = 10
    log_every: int = 50
    validate_every: int = 0
    progress: bool = True
    cpu: bool = False
    #: rate of the sampling EMA (evaluated and exported; None: none, the online weights are exported)
    sampling_ema: float | None = 0.9999
    #: what the student folder holds: "sampling_ema" (default when there is one) or "online"
    export: str = "sampling_ema"
    #: TF32 matrix products and convolutions on Ampere+ GPUs (no effect on CPUs)
    tf32: bool = False
    #: "adamw", or "adamw8bit" (bitsandbytes' 8-bit AdamW; needs bitsandbytes and a GPU)
    optimizer: str = "adamw"
    #: trackers besides the CSV / JSONL metrics that are always written: "tensorboard", "wandb"
    log_with: tuple[str, ...] = ()
    #: DataLoader workers of streaming sources (decoding, resizing, cropping)
    num_workers: int = 2

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} ('no' is fp32), got {self.precision!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.sampling_ema is not None and not 0.0 < float(self.sampling_ema) < 1.0:
            raise ValueError(f"sampling_ema must be in (0, 1), or None for no sampling EMA, got {self.sampling_ema}")
        if self.export not in EXPORTS:
            raise ValueError(f"export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes); use optimizer='adamw'")
        bad = [t for t in self.log_with if t not in TRACKERS]
        if bad:
            raise ValueError(f"log_with: unknown tracker {bad[0]!r}; choose from {', '.join(TRACKERS)} (CSV is always written)")
        missing = [t for t in self.log_with if importlib.util.find_spec(TRACKERS[t]) is None]
        if missing:
            raise ValueError(f"log_with={missing[0]!r} needs the {TRACKERS[missing[0]]} package (pip install {TRACKERS[missing[0]]}); "
                             "metrics.csv and metrics.jsonl are written either way")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")


@dataclass
class DistillResult:
    step: int
    losses: list[float]
    student_dir: Path | None
    skipped_steps: int
    resumed_from: Path | None
    attention: str
    processes: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)


class _Counters:
    """Trainer counters, saved with every checkpoint (in ``fewstep_state.json``)."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped = 0


#: Settings recorded with a checkpoint that change the run when they change on resume (the
#: optimizer's own hyperparameters are compared with its saved state instead).
_RUN_SETTINGS = ("batch_size", "grad_accum", "warmup_steps", "grad_clip", "precision", "seed")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"the output folder {str(folder)!r} is not writable ({err.strerror or err}); choose another output_dir") from None


class Distiller:
    """Distil (or, for iCT, train) a consistency student.

    Args:
        objective: a :class:`ConsistencyObjective` (``CD``, ``LCD``, ``MCD``, ``ICT``).
        data: a :class:`fewstep.distill.data.DataSource` of clean training data.
        teacher: the teacher denoiser ``D(x, t, **cond)`` (e.g. :class:`fewstep.models.DiffusersDenoiser`
            or the exact :class:`fewstep.models.MixtureDenoiser`); ``None`` only for iCT.
        student: ``None`` (a copy of the teacher's network), an ``nn.Module`` network, or a ready
            :class:`ConsistencyStudent`.  To start from the teacher's weights but predict another
            quantity (v-prediction conditions one-step students of eps teachers far better at
            low SNR), pass ``copy.deepcopy(teacher.model)`` with ``prediction_type="v_prediction"``.
        prediction_type: what the student network predicts; default the teacher's.  Giving one
            that differs from the teacher's while initialising from the teacher is an error.
        schedule: the noise schedule; default the teacher's (required for iCT).
        lora: a ``peft.LoraConfig``: the student is the teacher's own network with these adapters,
            the teacher the same network with the adapters switched off (needs ``target_ema = 0``);
            under bf16/fp16 the frozen base is stored in that dtype, the adapters stay fp32;
            checkpoints hold the adapters only and the student folder holds them in diffusers'
            LoRA format (``pipe.load_lora_weights``).
        guidance_embedding_dim: for LCD students built from the teacher, the size of the guidance
            embedding (``time_cond_proj_dim``; LCM: 256).
        scheduler_config: the teacher's diffusers scheduler config, recorded with the student.
        validator: ``validator(student, step) -> dict`` of quality numbers, run on the main
            process every ``config.validate_every`` steps and at the end.
        callback: ``callback(step, loss)`` after every training step (on every process).
        config: :class:`DistillConfig`.
    """

    def __init__(
        self,
        objective: Objective,
        data: DataSource,
        teacher: Callable[..., torch.Tensor] | None = None,
        student: torch.nn.Module | ConsistencyStudent | None = None,
        *,
        prediction_type: str | None = None,
        schedule: NoiseSchedule | None = None,
        lora: Any = None,
        guidance_embedding_dim: int | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        validator: Callable[[ConsistencyStudent, int], dict[str, float]] | None = None,
        callback: Callable[[int, float], None] | None = None,
        config: DistillConfig | None = None,
    ):
        self.config = config or DistillConfig()
        self.config.check()
        _check_fsdp_device()  # before anything is written
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be a fewstep.distill objective (CD, LCD, MCD, ICT, BOOT, MMD), got {type(objective).__name__}")
        if not hasattr(data, "shape") or not (hasattr(data, "sample") or getattr(data, "streaming", False)):
            raise TypeError("data must be a fewstep.distill data source (TensorData, MixtureData, ImageTextData, LatentShards, "
                            "or an object with .shape and .sample)")
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"the {objective.name} objective distils a teacher: pass teacher=... (a denoiser); only 'ict' trains without one")
        if lora is not None and objective.target_ema != 0.0:
            raise ValueError("LoRA distillation uses the student itself as its target: set target_ema=0 on the objective")
        self.objective = objective
        self.data = data
        self.lora = lora
        if getattr(objective, "uncond", False) is None:  # LCD without uncond=: the data's empty-prompt inputs
            made = getattr(data, "unconditional", None)
            if made is None:
                raise ValueError(
                    f"{objective.name} needs the teacher's unconditional inputs for classifier-free guidance: pass uncond=... "
                    "to the objective, or use a data source that encodes prompts (ImageTextData, LatentShards), which builds "
                    "the empty-prompt inputs"
                )
            objective.uncond = dict(made())
        self.validator = validator
        self.callback = callback
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.schedule = schedule if schedule is not None else getattr(teacher, "schedule", None)
        if self.schedule is None:
            raise ValueError("pass schedule=... (the teacher has no .schedule, or there is no teacher)")
        if teacher is not None and getattr(teacher, "schedule", self.schedule) is not self.schedule and schedule is not None:
            if teacher.schedule.config() != schedule.config():
                raise ValueError("the schedule given differs from the teacher's; the student must use its teacher's noise schedule")
        self.teacher = teacher
        self.objective.bind(self.schedule, data.shape, self.config.steps)
        self.student = self._build_student(student, prediction_type, lora, guidance_embedding_dim)
        if getattr(self.objective, "guidance_embedding", False) and not self.student.guidance_embedding_dim:
            raise ValueError(
                "LCD with guidance_embedding=True needs a student that takes the guidance scale: a UNet2DConditionModel "
                "with time_cond_proj_dim set (pass guidance_embedding_dim=256 to build it from the teacher), or use "
                "LCD(guidance_embedding=False)"
            )
        self.extras = self._extra_networks()
        self.out = Path(self.config.output_dir)
        check_output_dir(self.out, self.config.resume)  # an existing run needs resume=; its checkpoint is verified
        _check_writable(self.out)
        self.checkpoints = CheckpointDir(self.out / "checkpoints", self.config.keep_checkpoints)

    # -- construction ----------------------------------------------------------------------------
    def _build_student(self, student: Any, prediction_type: str | None, lora: Any, emb_dim: int | None) -> ConsistencyStudent:
        teacher_pt = getattr(self.teacher, "prediction_type", None)
        if isinstance(student, ConsistencyStudent):
            if not isinstance(self.objective, ConsistencyObjective):
                raise TypeError(f"the {self.objective.name} objective does not train a consistency function: pass the network "
                                "(an nn.Module), not a ConsistencyStudent")
            if prediction_type is not None and prediction_type != student.prediction_type:
                raise ValueError(f"prediction_type={prediction_type!r} differs from the student's {student.prediction_type!r}")
            if student.boundary.config() != self.objective_boundary().config():
                raise ValueError(
                    f"the student's boundary condition {student.boundary} differs from what the {self.objective.name} objective "
                    f"trains ({self.objective_boundary()}); build the student with objective.boundary() after bind, or pass the network"
                )
            return student
        if student is None:
            net = getattr(self.teacher, "model", None)
            if not isinstance(net, torch.nn.Module) or teacher_pt is None:
                raise ValueError(
                    "the student is initialised from the teacher, but the teacher has no network (.model) and prediction type; "
                    "pass student=<nn.Module> and prediction_type=..."
                )
            if prediction_type is not None and check_prediction_type(prediction_type, self.schedule) != teacher_pt:
                raise ValueError(
                    f"prediction_type={prediction_type!r} does not match the teacher's network, which predicts {teacher_pt!r}; "
                    "a student initialised from the teacher predicts what the teacher predicts"
                )
            prediction_type = teacher_pt
            if lora is not None:
                net = self._add_lora(net, lora)
            elif emb_dim:
                net = lcd_student_network(net, emb_dim, self.config.seed)
            else:
                net = copy.deepcopy(net)
        else:
            if not isinstance(student, torch.nn.Module):
                raise TypeError(f"student must be None, an nn.Module or a ConsistencyStudent, got {type(student).__name__}")
            if lora is not None:
                raise ValueError("lora=... adds adapters to the teacher's network: leave student=None")
            net = student
            if prediction_type is None:
                if teacher_pt is None:
                    raise ValueError("pass prediction_type=... for the student network (the teacher does not say what it predicts)")
                prediction_type = teacher_pt
        check_prediction_type(prediction_type, self.schedule)
        net.train()
        emb = getattr(getattr(net, "config", None), "time_cond_proj_dim", None) if getattr(self.objective, "guidance_embedding", False) else None
        return self.objective.make_student(net, self.schedule, prediction_type, emb)

    def _extra_networks(self) -> dict[str, TrainableNetwork]:
        """The objective's trainable networks besides the student (sorted by name: the order they
        are prepared, saved and loaded in), checked."""
        extras = self.objective.extra_networks(self.student, self.teacher)
        if not isinstance(extras, Mapping):
            raise TypeError(f"{type(self.objective).__name__}.extra_networks must return a dict of name -> TrainableNetwork")
        for name, net in extras.items():
            if not (isinstance(name, str) and name.isidentifier()) or name == "student":
                raise ValueError(f"extra network names must be identifiers other than 'student', got {name!r}")
            if not isinstance(net, TrainableNetwork) or not isinstance(net.module, torch.nn.Module):
                raise TypeError(f"extra network {name!r} must be a TrainableNetwork holding an nn.Module")
            if not any(p.requires_grad for p in net.module.parameters()):
                raise ValueError(f"extra network {name!r} has no trainable parameters")
        if extras and self.lora is not None:
            raise ValueError(f"the {self.objective.name} objective trains further networks ({', '.join(sorted(extras))}); "
                             "LoRA students cannot be combined with them yet: train the full student (lora=None)")
        return {k: extras[k] for k in sorted(extras)}

    def objective_boundary(self) -> Any:
        """The boundary condition the (bound) objective trains."""
        return self.objective.boundary()

    def _add_lora(self, net: torch.nn.Module, lora: Any) -> torch.nn.Module:
        if not hasattr(net, "add_adapter"):
            raise TypeError(f"{type(net).__name__} cannot carry peft adapters (no add_adapter); LoRA needs a diffusers model")
        net.requires_grad_(False)
        net.add_adapter(lora)
        self.teacher = DiffusersDenoiser(AdaptersOff(net), schedule=self.schedule, prediction_type=self.teacher.prediction_type)
        return net

    # -- GPU knobs ---------------------------------------------------------------------------------
    def _set_attention(self, net: torch.nn.Module) -> str:
        """Put every diffusers ``Attention`` block of ``net`` on PyTorch's SDPA kernel, or on
        xformers' (``auto``: when installed and working); ``keep`` leaves them alone."""
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        blocks = [m for m in net.modules() if isinstance(m, Attention)]
        mode = self.config.attention
        if mode == "keep" or not blocks:
            return "keep"
        if mode in ("auto", "xformers"):
            try:
                import xformers  # noqa: F401

                net.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as err:  # not installed, no CUDA, or an incompatible build
                if mode == "xformers":
                    raise ValueError(f"attention='xformers' is not available here ({err}); use attention='sdpa'") from None
        for m in blocks:
            m.set_processor(AttnProcessor2_0())
        return "sdpa"

    # -- the run -------------------------------------------------------------------------------------
    def train(self) -> DistillResult:
        """Run (or resume) training; returns the final step, the losses and the student folder.

        The phases, each its own method so that objectives with more networks can extend them:
        :meth:`_accelerator`, the networks (student, target, sampling EMA), :meth:`_optimizer`,
        the checkpoint hooks, resume or :meth:`_preflight`, the loop (:meth:`_micro_batch` per
        micro-batch), :meth:`_checkpoint` and :meth:`_finish`."""
        from tqdm.auto import tqdm

        cfg = self.config
        acc = self._accelerator()
        world, rank = acc.num_processes, acc.process_index
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(
                f"batch_size={cfg.batch_size} (global) must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}"
            )
        local = cfg.batch_size // (world * cfg.grad_accum)
        device = acc.device
        student = self.student.to(device)
        fsdp = str(acc.distributed_type).endswith("FSDP")
        if fsdp:
            self._check_fsdp(acc)
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        if self.lora is not None and weight_dtype != torch.float32:
            # the frozen base in the autocast dtype, the adapters (trainable) in fp32, as diffusers' LoRA scripts
            for p in student.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(weight_dtype)
        attention = self._set_attention(student.network)
        if self.teacher is not None and isinstance(getattr(self.teacher, "model", None), torch.nn.Module) and not isinstance(self.teacher.model, AdaptersOff):
            self.teacher.model.to(device=device, dtype=weight_dtype).eval().requires_grad_(False)
            self._set_attention(self.teacher.model)
        if cfg.gradient_checkpointing:
            if not hasattr(student.network, "enable_gradient_checkpointing"):
                raise ValueError(f"{type(student.network).__name__} has no enable_gradient_checkpointing(); turn gradient_checkpointing off")
            student.network.enable_gradient_checkpointing()
        target = None
        if self.objective.target_ema > 0:
            # train mode: the target draws the student's dropout mask (the objective replays the RNG state),
            # as consistency_models' CMTrainLoop keeps target_model.train()
            target = copy.deepcopy(student).requires_grad_(False).train()
        if cfg.compile:
            if not hasattr(student.network, "compile"):
                raise ValueError("compile=True needs torch >= 2.2 (nn.Module.compile)")
            student.network.compile()
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the student has no trainable parameters")
        opt = self._optimizer(params)
        warm = max(int(cfg.warmup_steps), 0)
        ramp = (lambda k: min(1.0, (k + 1) / warm)) if warm else (lambda k: 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
        # every trainable network with its own optimizer and LR schedule, prepared together (DDP),
        # so accelerate's save_state / load_state hold them all (model_1.safetensors, optimizer_1.bin, ...)
        extra_parts: list[Any] = []
        for net in self.extras.values():
            module = net.module.to(device).train()
            eparams = [p for p in module.parameters() if p.requires_grad]
            eopt = self._optimizer(eparams, net)
            extra_parts += [module, eopt, torch.optim.lr_scheduler.LambdaLR(eopt, ramp)]
        model, opt, sched, *prepared = acc.prepare(student, opt, sched, *extra_parts)
        names = list(self.extras)
        networks = {n: prepared[3 * i] for i, n in enumerate(names)}
        optimizers = {"student": opt, **{n: prepared[3 * i + 1] for i, n in enumerate(names)}}
        schedulers = {"student": sched, **{n: prepared[3 * i + 2] for i, n in enumerate(names)}}
        net_params = {"student": params, **{n: [p for p in networks[n].parameters() if p.requires_grad] for n in names}}
        wrapped = [model, *networks.values()]
        counters = _Counters()  # saved by fewstep itself, as are the EMA weights: nothing is pickled
        inner = acc.unwrap_model(model)
        ema = SamplingEMA(inner, cfg.sampling_ema) if cfg.sampling_ema is not None else None
        models = Models(student=model, target=target if target is not None else inner, teacher=self.teacher, extras={"device": device},
                        networks=networks)
        if self.lora is not None:
            self._lora_checkpoint_hooks(acc, inner)

        if acc.is_main_process:
            self.checkpoints.clean_temporary()
        acc.wait_for_everyone()
        resumed = self.checkpoints.resolve(cfg.resume)
        if resumed is not None:
            saved = verify_checkpoint(resumed, ema=target is not None, fsdp=fsdp, objective=self.objective.name,
                                      sampling_ema=ema is not None, lora=self.lora is not None, networks=names)
            acc.load_state(str(resumed))
            if target is not None:
                from safetensors.torch import load_file  # (load_model's device= needs safetensors > 0.4.1)

                target.load_state_dict(load_file(str(resumed / EMA_FILE), device=str(device)), strict=True)
            if ema is not None:
                ema.load(resumed / SAMPLING_EMA_FILE, device)
            if self._streaming:
                self.data.check_resume(saved.get("data"))
            counters.step, counters.skipped = saved["step"], saved["skipped"]
            if acc.is_main_process:
                self._report_changes(resumed, saved, opt)
        else:
            self._preflight(models, acc, local)
        stream = None
        if self._streaming:
            stream = self.data.open(rank=rank, world=world, local=local, grad_accum=cfg.grad_accum, seed=cfg.seed,
                                    start_step=counters.step, num_workers=cfg.num_workers)
        if acc.is_main_process:
            _trim_metrics(self.out / "metrics.jsonl", counters.step)
            _trim_metrics(self.out / "metrics.csv", counters.step)
        if cfg.log_with:
            acc.init_trackers("fewstep-distill", config=_tracker_config(cfg, self.objective))
        start = counters.step
        bar = tqdm(total=cfg.steps, initial=start, desc=f"distill {self.objective.name}", disable=not (cfg.progress and acc.is_main_process))
        losses: list[float] = []
        history: list[dict[str, Any]] = []
        consecutive_bad = 0
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            torch.manual_seed(derived_seed("distill-rank", cfg.seed, rank, step))
            active = self._phase(step)
            skipped = False
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                ids = [(micro * world + rank) * local + i for i in range(local)]
                gens = sample_generators(cfg.seed, step, ids)
                batch = self._micro_batch(gens, step, device, stream)
                with acc.autocast():
                    loss, _ = self.objective.loss(models, batch)
                bad = acc.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "sum")
                if float(bad) > 0:
                    skipped = True
                    for _ in range(micro + 1, cfg.grad_accum):  # the stream stays at the step's end on every rank
                        self._micro_batch(gens, step, device, stream, consume_only=True)
                    break
                last = micro == cfg.grad_accum - 1
                with contextlib.ExitStack() as hold:
                    if not last:
                        for m in wrapped:
                            hold.enter_context(acc.no_sync(m))
                    acc.backward(loss / cfg.grad_accum)
                step_loss += float(acc.reduce(loss.detach().reshape(1), "mean")) / cfg.grad_accum
            if not skipped and cfg.grad_clip is not None:
                for name in active:  # each network's gradient clipped on its own
                    norm = acc.clip_grad_norm_(net_params[name], cfg.grad_clip)
                    if norm is not None and not bool(torch.isfinite(torch.as_tensor(norm))) and cfg.precision != "fp16":
                        skipped = True  # identical on every rank: the gradients are already averaged
            if skipped:
                for o in optimizers.values():
                    o.zero_grad(set_to_none=True)
                counters.skipped += 1
                consecutive_bad += 1
                if consecutive_bad > cfg.max_nonfinite:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (step {step}). Common causes: "
                        "a learning rate too high, fp16 overflow (try precision='bf16'), or NaN in the data or the teacher."
                    )
            else:
                consecutive_bad = 0
                for name in active:
                    optimizers[name].step()
                    schedulers[name].step()
                for o in optimizers.values():  # a network outside the phase may have gradients: dropped
                    o.zero_grad(set_to_none=True)
                if "student" in active:
                    if target is not None:
                        ema_update(target, inner, self.objective.target_ema)
                    if ema is not None:
                        ema.update(inner)
            counters.step = step + 1
            losses.append(step_loss if not skipped else math.nan)
            bar.update(1)
            if self.callback is not None:
                self.callback(step + 1, losses[-1])
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                recent = [v for v in losses[-cfg.log_every :] if math.isfinite(v)]
                row = {"step": step + 1, "loss": float(np.mean(recent)) if recent else math.nan, "lr": sched.get_last_lr()[0],
                       "skipped": counters.skipped, "seconds": time.perf_counter() - t0}
                history.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                if acc.is_main_process:
                    self._log_row(row)
                if cfg.log_with:
                    acc.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            if cfg.validate_every and self.validator is not None and (step + 1) % cfg.validate_every == 0 and step + 1 < cfg.steps:
                if acc.is_main_process:
                    self._validate(inner, ema, step + 1, history, bar)
                acc.wait_for_everyone()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                self._checkpoint(acc, step + 1, counters, target, ema, names)
        bar.close()
        student_dir = self._finish(acc, model, inner, ema, history)
        if cfg.log_with:
            acc.end_training()
        return DistillResult(counters.step, losses, student_dir, counters.skipped, resumed, attention, world, history)

    # -- the phases ------------------------------------------------------------------------------
    @property
    def _streaming(self) -> bool:
        return bool(getattr(self.data, "streaming", False))

    def _accelerator(self) -> Any:
        """The ``accelerate.Accelerator`` of the run (precision, CPU, trackers), TF32 set."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        _check_fsdp_device()
        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") not in (None, cfg.precision) and not launched_distributed():
            AcceleratorState._reset_state()  # several trainers with different precisions in one process
        try:
            acc = Accelerator(mixed_precision=cfg.precision, cpu=cfg.cpu, log_with=list(cfg.log_with) or None,
                              project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")))
        except ValueError as err:
            raise ValueError(f"precision={cfg.precision!r} cannot run here: {err}") from None
        if cfg.precision != "no" and not acc.native_amp:
            warnings.warn(f"precision={cfg.precision!r} has no autocast on {acc.device.type} here; training runs in fp32", stacklevel=3)
        if cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return acc

    def _check_fsdp(self, acc: Any) -> None:
        """What fewstep's trainer supports under FSDP (see docs/design.md, Scale)."""
        if self.extras:
            raise ValueError(f"the {self.objective.name} objective trains several networks ({', '.join(['student', *self.extras])}); "
                             "fewstep runs that under DDP only (accelerate launch --multi_gpu), not FSDP")
        if self.objective.target_ema or self.config.sampling_ema is not None:
            raise ValueError(
                "an EMA network (target_ema > 0, or sampling_ema) needs the full parameters on every rank, which FSDP "
                "shards: use DDP (accelerate launch --multi_gpu), or target_ema=0 and sampling_ema=None under FSDP"
            )
        if "SHARDED" in str(getattr(getattr(acc.state, "fsdp_plugin", None), "state_dict_type", "")).upper():
            raise ValueError(
                "FSDP with SHARDED_STATE_DICT writes torch.distributed.checkpoint folders, whose metadata torch reads back "
                "with pickle.load (a crafted file runs code), so fewstep could not resume them safely; set "
                "fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config (or FSDP_STATE_DICT_TYPE=FULL_STATE_DICT)"
            )

    def _optimizer(self, params: list[torch.nn.Parameter], net: TrainableNetwork | None = None) -> torch.optim.Optimizer:
        """AdamW, or bitsandbytes' 8-bit AdamW (``optimizer="adamw8bit"``); an extra network's own
        settings replace the run's where it gives them."""
        cfg = self.config
        lr = cfg.lr if net is None or net.lr is None else float(net.lr)
        betas = cfg.adam_betas if net is None or net.adam_betas is None else tuple(net.adam_betas)
        wd = cfg.weight_decay if net is None or net.weight_decay is None else float(net.weight_decay)
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb  # checked installed by DistillConfig.check

            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)

    def _phase(self, step: int) -> tuple[str, ...]:
        """The networks stepped at ``step`` (:meth:`ConsistencyObjective.phase`), checked."""
        active = self.objective.phase(step)
        every = ("student", *self.extras)
        if active is None:
            return every
        unknown = [n for n in active if n not in every]
        if unknown or not active:
            raise ValueError(f"{type(self.objective).__name__}.phase({step}) named {list(active)}; it must name some of {list(every)}")
        return tuple(active)

    def _lora_checkpoint_hooks(self, acc: Any, inner: ConsistencyStudent) -> None:
        """Checkpoints of a LoRA student hold its trainable parameters only (``lora.safetensors``),
        not the frozen base: accelerate's model weights are taken out of ``save_state`` and the
        adapters read back on ``load_state`` (diffusers' LoRA scripts do the same with these hooks)."""
        from safetensors.torch import load_file, save_file

        names = [n for n, p in inner.named_parameters() if p.requires_grad]

        def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
            if acc.is_main_process:
                tensors = {n: p.detach().float().contiguous().cpu() for n, p in inner.named_parameters() if p.requires_grad}
                save_file(tensors, str(Path(output_dir) / LORA_FILE))
            weights.clear()

        def load_hook(models: list[Any], input_dir: str) -> None:
            path = Path(input_dir) / LORA_FILE
            tensors = load_file(str(path))
            if set(tensors) != set(names):
                raise ValueError(f"{path} does not hold this student's LoRA parameters; resume with the same LoRA settings")
            params = dict(inner.named_parameters())
            with torch.no_grad():
                for n, v in tensors.items():
                    if v.shape != params[n].shape:
                        raise ValueError(f"{path}: {n} has shape {tuple(v.shape)}, the adapter's is {tuple(params[n].shape)}")
                    params[n].copy_(v.to(params[n].dtype))
            models.clear()

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    def _micro_batch(self, gens: list[torch.Generator], step: int, device: Any, stream: Any, consume_only: bool = False) -> Batch | None:
        """The next micro-batch: drawn from the per-sample generators (``TensorData``, ...), or
        the next one of this rank's stream, encoded on ``device`` (streaming sources)."""
        if stream is None:
            if consume_only:
                return None
            x0, cond = self.data.sample(gens, device)
        else:
            raw = next(stream)
            if consume_only:
                return None
            x0, cond = self.data.prepare(raw, gens, device)
        return Batch(x0, cond, gens, step)

    def _log_row(self, row: Mapping[str, Any]) -> None:
        """Append a row to ``metrics.jsonl`` and ``metrics.csv`` (main process)."""
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        path = self.out / "metrics.csv"
        fields = ["step", "loss", "lr", "skipped", "seconds"]
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(dict(row))

    def _preflight(self, models: Models, acc: Any, local: int) -> None:
        """One loss evaluation without gradient on real data, so a student that cannot take the
        data, a teacher of the wrong shape or missing conditioning fail before any step."""
        # A stream no step uses; the full micro-batch, so a compiled student sees training shapes.
        gens = sample_generators(self.config.seed, 2**62, range(local))
        if self._streaming:
            x0, cond = self.data.prepare(self.data.read(range(local), self.config.seed), gens, acc.device)
        else:
            x0, cond = self.data.sample(gens, acc.device)
        try:
            with torch.no_grad(), acc.autocast():
                self.objective.loss(models, Batch(x0, cond, gens, 0))
        except RuntimeError as err:
            raise ValueError(
                f"the student or the teacher cannot process data of shape {tuple(x0.shape[1:])} "
                f"({type(self.student.network).__name__}): {str(err).splitlines()[0]}"
            ) from None

    def _validate(self, inner: ConsistencyStudent, ema: SamplingEMA | None, step: int, history: list[dict[str, Any]], bar: Any) -> None:
        """Run the validator on the main process (callers hold the other ranks at a barrier), on
        the weights that would be exported (the sampling EMA by default)."""
        was = inner.training
        inner.eval()
        use_ema = ema is not None and self.config.export == "sampling_ema"
        with torch.no_grad(), (ema.applied(inner) if use_ema else _null()):
            scores = self.validator(inner, step)
        inner.train(was)
        row = {"step": step, "validation": scores}
        history.append(row)
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float))))
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _report_changes(self, resumed: Path, saved: Mapping[str, Any], opt: Any) -> None:
        """Warn about every setting of this run that differs from the checkpoint's, saying which
        value the resumed run uses."""
        cfg = self.config
        group = opt.param_groups[0]
        kept = {"lr": group.get("initial_lr", group["lr"]), "adam_betas": tuple(group["betas"]), "weight_decay": group["weight_decay"]}
        asked = {"lr": cfg.lr, "adam_betas": tuple(cfg.adam_betas), "weight_decay": cfg.weight_decay}
        for name, value in kept.items():
            if not _same(value, asked[name]):
                warnings.warn(
                    f"resuming from {resumed}: its optimizer state trains with {name}={value!r}, this run asks for "
                    f"{name}={asked[name]!r}; the checkpoint's {name}={value!r} is used (the saved optimizer and LR schedule "
                    f"carry it). To train with {name}={asked[name]!r}, start a new run in another output folder",
                    stacklevel=3,
                )
        before = saved.get("config") or {}
        for name in _RUN_SETTINGS:
            now = getattr(cfg, name)
            if name in before and not _same(before[name], now):
                warnings.warn(
                    f"resuming from {resumed}: it was trained with {name}={before[name]!r}, this run uses {name}={now!r} from "
                    "here on (the resumed run will differ from an uninterrupted one)",
                    stacklevel=3,
                )

    def _checkpoint(self, acc: Any, step: int, counters: _Counters, target: torch.nn.Module | None, ema: SamplingEMA | None,
                    networks: list[str] | None = None) -> None:
        tmp = self.checkpoints.temporary(step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            if target is not None:
                from safetensors.torch import save_model

                save_model(target, str(tmp / EMA_FILE))
            if ema is not None:
                ema.save(tmp / SAMPLING_EMA_FILE)
            settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()
                        if k in (*_RUN_SETTINGS, "lr", "adam_betas", "weight_decay", "steps")}
            write_state(tmp, {"step": counters.step, "skipped": counters.skipped, "objective": self.objective.name,
                              "ema": target is not None, "sampling_ema": ema is not None, "lora": self.lora is not None,
                              "networks": list(networks or []),
                              "data": self.data.position(counters.step, self.config.batch_size) if self._streaming else None,
                              "config": settings})
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.checkpoints.commit(step)
        acc.wait_for_everyone()

    def _finish(self, acc: Any, model: Any, inner: ConsistencyStudent, ema: SamplingEMA | None, history: list[dict[str, Any]]) -> Path | None:
        """Write the student folder (main process): the sampling EMA's weights by default
        (``export``), a LoRA student as its adapter in diffusers' LoRA format."""
        state = acc.get_state_dict(model)  # gathered under FSDP; every rank takes part
        folder = self.out / "student"
        if acc.is_main_process:
            final = inner
            if str(acc.distributed_type).endswith("FSDP"):
                final = copy.deepcopy(self.student).cpu()
                final.load_state_dict(state)
            use_ema = ema is not None and self.config.export == "sampling_ema"
            with torch.no_grad(), (ema.applied(final) if use_ema else _null()):
                if self.validator is not None:
                    self._validate(final, None, self.config.steps, history, _Printer())
                description = {
                    **self.objective.describe(),
                    "sampler": self.objective.sampler,
                    "sampler_options": self.objective.sampler_options(),
                    "exported": "sampling_ema" if use_ema else "online",
                    "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
                }
                description["training"]["output_dir"] = str(self.config.output_dir)
                description["training"]["resume"] = str(self.config.resume) if self.config.resume is not None else None
                if self.lora is not None:
                    save_lora_student(folder, final, description, self.scheduler_config)
                else:
                    self.objective.save_student(folder, final, description, self.scheduler_config)
        acc.wait_for_everyone()
        return folder


def _same(a: Any, b: Any) -> bool:
    """Equal settings (numbers to float rounding; tuples and lists alike)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` / ``metrics.csv`` up to ``step`` (a resumed run rewrites
    the later ones; a fresh start keeps none), dropping a line a kill cut short."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    if path.suffix == ".csv":
        header, body = (lines[0], lines[1:]) if lines else ("", [])
        fields = header.split(",")
        for line in body:
            row = dict(zip(fields, line.split(",")))
            if len(row) == len(fields) and row.get("step", "").isdigit() and int(row["step"]) <= step:
                kept.append(line)
        kept = [header] + kept if kept else []
    else:
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
    if step == 0 or not kept:
        path.unlink()
    else:
        atomic_write_text(path, "\n".join(kept) + "\n")


class _Printer:
    def write(self, text: str) -> None:
        print(text, flush=True)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _check_fsdp_device() -> None:
    """Under ``accelerate launch`` with an FSDP config, refuse CPU-only processes clearly (torch and
    accelerate would refuse later with less helpful messages)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and not _accelerator_device():
        raise ValueError(
            "FSDP needs GPUs (or another accelerator): torch's FullyShardedDataParallel refuses CPU-only processes "
            "('FSDP needs a non-CPU accelerator device'), and so does accelerate's FSDP plugin. On CPUs train with DDP "
            "(accelerate launch --multi_gpu --num_processes N, which starts N gloo processes on a CPU-only machine, or torchrun); "
            "on GPUs see examples/accelerate/fsdp_8gpu.yaml"
        )


def _accelerator_device() -> bool:
    """Whether this process has an accelerator FSDP can shard onto (CUDA, XPU, NPU, MLU)."""
    if torch.cuda.is_available():
        return True
    return any(bool(getattr(getattr(torch, name, None), "is_available", lambda: False)()) for name in ("xpu", "npu", "mlu"))


def _tracker_config(cfg: DistillConfig, objective: ConsistencyObjective) -> dict[str, Any]:
    """Flat scalar settings for TensorBoard / W&B."""
    flat = {f"objective/{k}": v for k, v in objective.describe().items() if isinstance(v, (int, float, str, bool))}
    flat.update({k: (str(v) if not isinstance(v, (int, float, str, bool)) else v) for k, v in asdict(cfg).items()})
    return flat


def lcd_student_network(teacher_network: torch.nn.Module, embedding_dim: int = 256, seed: int = 0) -> torch.nn.Module:
    """LCD's student: the teacher's ``UNet2DConditionModel`` with a guidance-embedding input
    (``time_cond_proj_dim = embedding_dim``) and the teacher's weights.  The new projection
    ``time_embedding.cond_proj`` keeps ``torch.nn.Linear``'s default initialisation (Kaiming-uniform,
    bound ``1/sqrt(embedding_dim)``), as LCM's training code leaves it (diffusers'
    ``train_lcm_distill_sd_wds.py`` builds the student from the teacher's config with
    ``time_cond_proj_dim`` and loads the teacher's weights with ``strict=False``), drawn from a
    generator seeded from ``seed`` so the run is reproducible.  The student therefore does not start
    exactly as its teacher: the guidance embedding perturbs the time embedding from step 0, which is
    what the recipe trains with."""
    cfg = getattr(teacher_network, "config", None)
    if cfg is None or "time_cond_proj_dim" not in cfg:
        raise TypeError(
            f"{type(teacher_network).__name__} takes no guidance embedding (no time_cond_proj_dim in its config); "
            "LCD with a guidance embedding needs a diffusers UNet2DConditionModel"
        )
    student = type(teacher_network).from_config(dict(cfg), time_cond_proj_dim=int(embedding_dim))
    missing, unexpected = student.load_state_dict(teacher_network.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise ValueError(f"could not copy the teacher's weights into the LCD student (missing {missing}, unexpected {unexpected})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed("lcd-cond-proj", seed))
        student.time_embedding.cond_proj.reset_parameters()  # torch.nn.Linear's own initialisation, as LCM's
    return student.to(next(teacher_network.parameters()).device)
