"""The model's own exact-ODE samples: the target a few-step sampler of a neural model approximates.

A deterministic sampler approximates the probability-flow ODE of the *model*; the model's own
many-step solution from the same noise is what it would produce with no discretisation error.
The Fréchet distance between a sampler's samples and those exact-ODE samples, in some feature
space, therefore measures the sampler alone, in distribution: it is zero for an exact solver at
any sample count (pairing the same noises removes the sampling floor that FID to data has), and
the model's own error, which no sampler can remove, does not enter it.  FID to data stays beside
it in the report, since it is what users compare with papers.

* :data:`EXACT_ODE` is the reference of the tuning benchmark (``benchmarks/tuned_plans.py``):
  ``dpmpp_3m`` at 500 NFE on the model's default grid.
* :data:`REPORT_ODE` is the cheaper reference of ``fewstep report``'s default study (the study's
  time budget); ``benchmarks/RESULTS.md`` records how close it is to :data:`EXACT_ODE` next to the
  distances it is used to measure.
"""

from __future__ import annotations

from typing import Any

import torch

import fewstep

__all__ = ["EXACT_ODE", "REPORT_ODE", "exact_ode_samples"]

#: (sampler, NFE) of the exact-ODE reference of the tuning benchmark.
EXACT_ODE = ("dpmpp_3m", 500)
#: (sampler, NFE) of the report's exact-ODE reference.
REPORT_ODE = ("dpmpp_3m", 100)


def exact_ode_samples(denoiser: Any, noise: torch.Tensor, reference: tuple[str, int] = EXACT_ODE, **kwargs: Any) -> torch.Tensor:
    """The model's many-step ODE solution from ``noise`` (``fewstep.sample`` with ``reference``'s
    sampler and NFE; ``kwargs`` go to ``fewstep.sample``, e.g. ``schedule=``)."""
    sampler, nfe = reference
    if fewstep.spec(sampler).stochastic:
        raise ValueError(f"an exact-ODE reference needs a deterministic sampler, not {sampler!r}")
    with torch.no_grad():
        return fewstep.sample(denoiser, noise, sampler, int(nfe), **kwargs)
