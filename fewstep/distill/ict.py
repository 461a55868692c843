r"""Improved consistency training, iCT (Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models", ICLR 2024): consistency training without a teacher.

* The pair shares its noise: ``x_{n+1} = alpha x_0 + sigma_{n+1} eps`` and ``x_n = alpha x_0 +
  sigma_n eps`` (the one-step Euler/DDIM solution with the true ``x_0`` as denoiser).
* No EMA target: ``theta^- = stopgrad(theta)`` (sec. 3.2).
* Pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (sec. 3.3).
* Loss weight ``lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)`` (sec. 3.4).
* Lognormal noise sampling: interval ``n`` has probability proportional to
  ``erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_n - P_mean) / (sqrt 2 P_std))``,
  ``P_mean = -1.1``, ``P_std = 2`` (sec. 3.5).
* Discretisation curriculum: ``N(k) = min(s_0 2^{floor(k / K')}, s_1) + 1`` points on a Karras
  grid (rho = 7) from ``t_max`` to ``t_min``, ``K' = floor(K / (log2 floor(s_1 / s_0) + 1))``,
  ``s_0 = 10``, ``s_1 = 1280`` (sec. 3.4, eq. 7).

``sigma`` in the interval probabilities and the weights is the noise level of the equivalent
variance-exploding process, ``sigma / alpha`` of the schedule (the schedule's own ``sigma`` on EDM),
so those parts of the recipe carry over to every schedule.  The boundary condition does not: it is
the student's ``c_skip = sigma_d^2 / (u^2 + sigma_d^2)`` with ``u = kappa (tau(t) - tau(t_min))``
measured in *model timesteps* ``tau`` (:mod:`fewstep.distill.student`), ``kappa = boundary_scale``
(default 1) and boundary ``t_min``.  That is CM's ``c_skip`` only where ``tau`` is the noise level
itself (``EDM``); on ``VPDiscrete`` (``tau`` the training index) and ``VPContinuous``
(``tau = 1000 t``) ``kappa = 1`` lets ``c_skip`` fall to 0.2 one model timestep above the boundary,
far faster in noise level than CM's.  Sampled with ``cm_multistep``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fewstep.distill.data import rand
from fewstep.distill.objective import Batch, ConsistencyObjective, Models
from fewstep.schedules import NoiseSchedule, time_grid

__all__ = ["ICT"]


class ICT(ConsistencyObjective):
    """Improved consistency training (no teacher); ``target_ema`` is fixed at 0.
    ``noise_assignment``: immiscible noise assignment of each micro-batch
    (:mod:`fewstep.distill.immiscible`; ``None``: independent noise, the paper's)."""

    name = "ict"
    paper = "Song & Dhariwal 2023, Improved Techniques for Training Consistency Models"
    needs_teacher = False
    sampler = "cm_multistep"

    def __init__(
        self,
        *,
        s0: int = 10,
        s1: int = 1280,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        rho: float = 7.0,
        loss: str = "pseudo_huber",
        loss_c: float | None = None,
        boundary_scale: float = 1.0,
        sigma_data: float = 0.5,
        noise_assignment: Any = None,
    ):
        super().__init__(loss=loss, loss_c=loss_c, target_ema=0.0, boundary_scale=boundary_scale, sigma_data=sigma_data,
                         noise_assignment=noise_assignment)
        if not (isinstance(s0, int) and isinstance(s1, int) and 1 <= s0 <= s1):
            raise ValueError(f"need integers 1 <= s0 <= s1 for the curriculum, got s0={s0!r}, s1={s1!r}")
        if not p_std > 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.s0, self.s1, self.p_mean, self.p_std, self.rho = s0, s1, float(p_mean), float(p_std), float(rho)
        self._grids: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def bind(self, schedule: NoiseSchedule, data_shape: Sequence[int], total_steps: int) -> None:
        """Attach the schedule and shape; the curriculum's stage length ``K'`` follows from
        ``total_steps`` (``K``)."""
        super().bind(schedule, data_shape, total_steps)
        self._grids = {}
        self.stage_steps = max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))

    def num_points(self, step: int) -> int:
        """``N(k)``: grid points at training step ``k``."""
        return min(self.s0 * 2 ** (int(step) // self.stage_steps), self.s1) + 1

    def _at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(grid, its noise levels ``sigma / alpha``, the cumulative interval probabilities) at
        ``step``, built once per number of points."""
        n = self.num_points(step)
        if n not in self._grids:
            grid = time_grid(self.schedule, n - 1, "karras", end="min", rho=self.rho).flip(0)
            sig = torch.exp(-torch.as_tensor(self.schedule.lambda_(grid), dtype=torch.float64))  # sigma / alpha
            z = (torch.log(sig) - self.p_mean) / (math.sqrt(2.0) * self.p_std)
            p = torch.special.erf(z[1:]) - torch.special.erf(z[:-1])
            cdf = torch.cumsum(p / p.sum(), 0)
            self._grids[n] = (grid, sig, cdf)
        return self._grids[n]

    def interval_probabilities(self, step: int) -> torch.Tensor:
        """(N - 1,) float64: the probability of each interval ``[sigma_n, sigma_{n+1}]`` of the grid
        at ``step`` under the lognormal noise distribution (sec. 3.5)."""
        cdf = self._at(step)[2]
        return torch.diff(cdf, prepend=cdf.new_zeros(1))

    def grid_at(self, step: int) -> torch.Tensor:
        """The Karras grid of ``N(step)`` points, increasing from ``t_min`` to ``t_max``."""
        return self._at(step)[0]

    def boundary_time(self) -> float:
        """``t_min``: consistency training needs a noisy boundary (CM's epsilon)."""
        return float(self.schedule.t_min)

    def draw_intervals(self, batch: Batch, grid: torch.Tensor) -> torch.Tensor:
        """One interval per sample, drawn with :meth:`interval_probabilities` (inverse CDF of a
        uniform from the sample's generator)."""
        cdf = self._at(batch.step)[2]
        return torch.searchsorted(cdf, rand(batch.gens), right=True).clamp(max=len(cdf) - 1)

    def weights(self, grid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``lambda_n = 1 / (sigma_{n+1} - sigma_n)`` in the noise levels ``sigma / alpha`` (sec. 3.4)."""
        sig = self._grids[len(grid)][1]
        return 1.0 / (sig[n + 1] - sig[n])

    def lower_point(self, models: Models, batch: Batch, x_hi: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, eps: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """The same clean data and noise at the lower time: ``alpha(t_n) x_0 + sigma(t_n) eps``."""
        return self.noised(batch.x0, t_lo, eps)

    def sampler_options(self) -> dict[str, Any]:
        """``cm_multistep`` must stop at the student's boundary ``t_min``."""
        return {"boundary_time": self.boundary_time()}

    def describe(self) -> dict[str, Any]:
        """The base description plus the curriculum and the noise distribution."""
        return {
            **super().describe(),
            "curriculum": {"s0": self.s0, "s1": self.s1, "stage_steps": self.stage_steps},
            "noise": {"p_mean": self.p_mean, "p_std": self.p_std, "rho": self.rho},
        }
