"""Consistency distillation and its relatives: objectives (CD, LCD, MCD, iCT, sLCT; continuous-time
sCM and rCM; BOOT, data-free; MMD finetuning through the sampler), immiscible noise assignment,
the student parameterisations, one trainer on ``accelerate`` (several trainable networks where an
objective needs them), atomic checkpoints and students saved in diffusers format.

Quick start (the exact digits mixture as teacher, a small MLP student)::

    from fewstep.distill import CD, Distiller, DistillConfig, MixtureData, MLPNet, load_student
    from fewstep.models import GaussianMixture
    from fewstep.eval.exact import default_schedule

    gm = GaussianMixture.digits()
    teacher = gm.denoiser(default_schedule())
    run = Distiller(CD(), MixtureData(gm), teacher, MLPNet(dim=64), prediction_type="sample",
                    config=DistillConfig(output_dir="out", steps=500)).train()
    student = load_student(run.student_dir)          # diffusers format + fewstep_student.json
    x = student.sample(torch.randn(16, 64), nfe=2)    # with the sampler it was trained for
"""

import importlib
from typing import Any

# Names are imported on first use, so `fewstep --help` and `fewstep samplers` do not load
# diffusers and accelerate.
_WHERE = {
    "CD": "cd",
    "LCD": "lcd",
    "GuidedTeacher": "lcd",
    "MCD": "mcd",
    "ICT": "ict",
    "SLCT": "slct",
    "NoiseAssignment": "immiscible",
    "BOOT": "boot",
    "BootStudent": "boot",
    "NoiseData": "boot",
    "MMD": "mmd",
    "TunedDenoiser": "mmd",
    "Objective": "objective",
    "SCM": "scm",
    "LogVarianceHead": "scm",
    "RCM": "rcm",
    "TrigFlowBoundary": "student",
    "TrainableNetwork": "objective",
    "ConsistencyObjective": "objective",
    "consistency_distance": "objective",
    "BoundaryCondition": "student",
    "ConsistencyStudent": "student",
    "guidance_embedding": "student",
    "IntervalSolver": "teacher",
    "AdaptersOff": "teacher",
    "Distiller": "trainer",
    "DistillConfig": "trainer",
    "DistillResult": "trainer",
    "lcd_student_network": "trainer",
    "TensorData": "data",
    "MixtureData": "data",
    "sample_generators": "data",
    "MLPNet": "networks",
    "ImageTextFolder": "stream",
    "TarShards": "stream",
    "HFImageText": "stream",
    "ImageTextData": "stream",
    "LatentShards": "stream",
    "precompute": "stream",
    "PipelineEncoder": "encode",
    "SamplingEMA": "ema",
    "save_lora_student": "export",
    "ValidationImages": "validate",
    "CheckpointDir": "checkpoint",
    "save_student": "export",
    "load_student": "export",
    "DistilledStudent": "export",
    "QualityProbe": "validate",
}

__all__ = sorted([*_WHERE, "OBJECTIVES"])


def __getattr__(name: str) -> Any:
    if name == "OBJECTIVES":
        return {k: __getattr__(v) for k, v in (("cd", "CD"), ("lcd", "LCD"), ("mcd", "MCD"), ("ict", "ICT"), ("slct", "SLCT"),
                                                ("scm", "SCM"), ("rcm", "RCM"), ("boot", "BOOT"), ("mmd", "MMD"))}
    if name in _WHERE:
        return getattr(importlib.import_module(f"fewstep.distill.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fewstep.distill' has no attribute {name!r}")
