r"""Improved latent consistency training, sLCT (Dao, Doan, Liu, Le & Metaxas 2025, "Improved
Training Technique for Latent Consistency Models", ICLR 2025; code: quandao10/sLCT).

iCT (:mod:`fewstep.distill.ict`: shared-noise pairs, stop-gradient target, lognormal intervals,
``1 / (sigma_{n+1} - sigma_n)`` weights, the doubling curriculum) with four changes for latent data,
whose impulsive outliers (sec. 3) make iCT's pseudo-Huber loss unstable.  Each is switchable for
ablation; all four are on by default:

* **Cauchy loss** (sec. 4.1, ``loss="cauchy"``): ``d(a, b) = log(1 + ||a - b||^2 / (2 c^2))``
  (:func:`fewstep.distill.objective.consistency_distance`) in place of pseudo-Huber
  ``sqrt(||a - b||^2 + c^2) - c``: the penalty of a large residual grows like ``log r`` rather than
  ``r``, so a few outlying pairs no longer dominate the gradient.
* **Diffusion loss at early timesteps** (sec. 4.2, ``diffusion_weight``, ``diffusion_sigma``):
  ``L = L_CT + lambda_diff * mean_b [ 1{sigma_{n+1} <= sigma_diff} ||f_theta(x_{n+1}) - x_0||^2 ]``
  (squared error averaged over elements), the denoising regression to the clean data at small noise
  levels only, where the consistency function is close to the posterior mean that this loss
  targets; ``sigma`` is the VE noise level ``sigma / alpha`` as in iCT.  ``diffusion_weight=0``
  turns it off.
* **Optimal-transport coupling** (sec. 4.3, ``ot``): each micro-batch's noises are assigned to its
  data by minimising ``sum_i ||x_i - eps_pi(i)||^2`` (exact linear assignment,
  :mod:`fewstep.distill.immiscible`, the same code as immiscible diffusion with the squared cost);
  the noise stays marginally standard normal.  ``ot=False`` turns it off; ``"fp16"`` or a
  :class:`~fewstep.distill.immiscible.NoiseAssignment` choose another assignment.
* **Adaptive scaling-c** (sec. 4.4, ``c_schedule="adaptive"``): the robust loss's ``c`` follows the
  discretisation curriculum, ``c(k) = c_0 s_0 / (N(k) - 1)`` with ``N(k)`` iCT's grid points at
  step ``k`` and ``c_0`` (``loss_c``, default iCT's ``0.00054 sqrt(d)``) the value of the first
  stage.  A consistency pair's residual shrinks with the interval width, ``~ 1 / N``; with ``c``
  fixed every residual would fall below ``c`` late in training and the Cauchy loss would act as a
  plain squared loss, losing its robustness.  ``c_schedule="fixed"`` keeps ``c = c_0``.

Not implemented: the paper's Non-scaling LayerNorm (sec. 4.5) is an architecture change of its DiT,
not of the objective.

**What is fewstep's, not the paper's.**  The authors' repository publishes network and evaluation
code but not the training loss, so the exact form of the scaling-c rule (``c_0 s_0 / (N - 1)`` here)
and the defaults of the diffusion loss (``lambda_diff = 1``, ``sigma_diff = 0.2``) could not be
checked against a reference implementation; they are fewstep's reading of secs. 4.2 and 4.4 and are
recorded with every checkpoint (:meth:`SLCT.describe`).  The noise distribution defaults to iCT's
(``P_mean = -1.1``, ``P_std = 2``); the paper's latent ImageNet runs use ``P_mean = -0.8``,
``P_std = 1.5`` (its evaluation scripts), which the arguments take.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.distill.ict import ICT
from fewstep.distill.immiscible import noise_assignment as noise_assignment_option
from fewstep.distill.objective import Batch

__all__ = ["SLCT", "C_SCHEDULES", "INGREDIENTS"]

C_SCHEDULES = ("adaptive", "fixed")
#: the switchable ingredients, by the names ``fewstep distill --slct-without`` takes
INGREDIENTS = ("cauchy", "diffusion", "ot", "adaptive_c")


class SLCT(ICT):
    """Improved latent consistency training (no teacher).

    Args:
        loss: the consistency distance; ``"cauchy"`` (sLCT), or iCT's ``"pseudo_huber"`` to ablate.
        ot: optimal-transport coupling of noise and data: ``True`` (exact, squared cost), ``False``,
            ``"exact"``, ``"fp16"`` or a :class:`~fewstep.distill.immiscible.NoiseAssignment`.
        diffusion_weight: ``lambda_diff`` of the early-timestep diffusion loss (0: off).
        diffusion_sigma: it applies where the pair's upper noise level ``sigma / alpha <= diffusion_sigma``.
        c_schedule: ``"adaptive"`` (``c_0 s_0 / (N(k) - 1)``) or ``"fixed"`` (``c_0``).
        loss_c: ``c_0`` (default ``0.00054 sqrt(d)``).
        s0, s1, p_mean, p_std, rho, boundary_scale, sigma_data: as :class:`~fewstep.distill.ict.ICT`.
    """

    name = "slct"
    paper = "Dao et al. 2025, Improved Training Technique for Latent Consistency Models"

    def __init__(
        self,
        *,
        loss: str = "cauchy",
        ot: Any = True,
        diffusion_weight: float = 1.0,
        diffusion_sigma: float = 0.2,
        c_schedule: str = "adaptive",
        loss_c: float | None = None,
        **ict: Any,
    ):
        if "noise_assignment" in ict:
            raise TypeError("SLCT couples noise and data with ot=... (its optimal-transport coupling), not noise_assignment=")
        if c_schedule not in C_SCHEDULES:
            raise ValueError(f"c_schedule must be one of {', '.join(C_SCHEDULES)}, got {c_schedule!r}")
        if not float(diffusion_weight) >= 0:
            raise ValueError(f"diffusion_weight must be >= 0 (0: no diffusion loss), got {diffusion_weight}")
        if not float(diffusion_sigma) > 0:
            raise ValueError(f"diffusion_sigma must be a positive noise level, got {diffusion_sigma}")
        super().__init__(loss=loss, loss_c=loss_c, noise_assignment=noise_assignment_option(ot, cost="sqeuclidean"), **ict)
        self.diffusion_weight = float(diffusion_weight)
        self.diffusion_sigma = float(diffusion_sigma)
        self.c_schedule = c_schedule

    @classmethod
    def without(cls, ingredients: Any = (), **options: Any) -> "SLCT":
        """sLCT with the named ingredients (of :data:`INGREDIENTS`) switched off: ``cauchy`` ->
        pseudo-Huber, ``diffusion`` -> no diffusion loss, ``ot`` -> independent noise,
        ``adaptive_c`` -> fixed ``c``.  With all four off it is iCT."""
        off = set(ingredients)
        bad = sorted(off - set(INGREDIENTS))
        if bad:
            raise ValueError(f"unknown sLCT ingredient {bad[0]!r}; choose from {', '.join(INGREDIENTS)}")
        if "cauchy" in off:
            options["loss"] = "pseudo_huber"
        if "diffusion" in off:
            options["diffusion_weight"] = 0.0
        if "ot" in off:
            options["ot"] = False
        if "adaptive_c" in off:
            options["c_schedule"] = "fixed"
        return cls(**options)

    def loss_scale(self, step: int) -> float:
        """``c(k) = c_0 s_0 / (N(k) - 1)`` (adaptive) or ``c_0`` (fixed)."""
        if self.c_schedule == "fixed":
            return float(self.loss_c)
        return float(self.loss_c) * self.s0 / (self.num_points(step) - 1)

    def auxiliary_loss(self, pred: torch.Tensor, batch: Batch, t_hi: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, float]]:
        """``lambda_diff * mean_b [1{sigma_{n+1} <= sigma_diff} mean((f_theta(x_{n+1}) - x_0)^2)]``."""
        if self.diffusion_weight == 0:
            return None, {}
        sig = torch.exp(-torch.as_tensor(self.schedule.lambda_(t_hi.detach().cpu().double()), dtype=torch.float64))
        mask = (sig <= self.diffusion_sigma).to(pred.device, torch.float32)
        per_sample = (pred - batch.x0.float()).flatten(1).square().mean(1)
        term = (mask * per_sample).mean()
        return self.diffusion_weight * term, {"diffusion_loss": float(term.detach()), "diffusion_fraction": float(mask.mean())}

    def describe(self) -> dict[str, Any]:
        """iCT's description plus the four ingredients' settings."""
        return {
            **super().describe(),
            "diffusion_loss": {"weight": self.diffusion_weight, "sigma": self.diffusion_sigma},
            "c_schedule": self.c_schedule,
        }
