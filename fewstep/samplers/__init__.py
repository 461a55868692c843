"""The sampler registry and the pull-style front door.

Importing this package registers the built-in families (one module each)."""

from fewstep.samplers import ddim, deis, dpm_solver  # noqa: F401  (registration)
from fewstep.samplers import cfg_pp, consistency, dc_solver, edm, momentum, plan, scm, time_shift, unipc  # noqa: F401  (registration)
from fewstep.samplers import ancestral, er_sde, gradient_estimation, ipndm, res  # noqa: F401  (registration)
from fewstep.samplers.brownian import BrownianNoise
from fewstep.samplers.core import steps_to_nfe
from fewstep.samplers.core import NonFiniteError, Program, SampleInfo, UnguidedWarning, prepare, sample
from fewstep.samplers.plan import SamplingPlan
from fewstep.samplers.registry import SamplerSpec, available, spec
from fewstep.samplers.tuning import tune

__all__ = ["available", "spec", "sample", "prepare", "steps_to_nfe", "BrownianNoise", "tune", "Program", "SamplerSpec", "SampleInfo", "NonFiniteError", "UnguidedWarning", "SamplingPlan"]
