"""fewstep: few-step sampling, distillation and evaluation for diffusion and consistency models."""

from fewstep import schedules
from fewstep.samplers import available, sample, spec

__version__ = "0.1.0"

__all__ = ["sample", "available", "spec", "schedules", "FewstepScheduler", "__version__"]


def __getattr__(name: str):
    # diffusers is imported only when the scheduler adapter is asked for.
    if name == "FewstepScheduler":
        from fewstep.samplers.diffusers_adapter import FewstepScheduler

        return FewstepScheduler
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
