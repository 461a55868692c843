"""Brownian-tree noise: the noise of a step is the increment of one fixed Brownian path over the
step, so a stochastic sampler converges as its step count grows and gives (nearly) the same image at
different step counts.

:class:`BrownianNoise` has k-diffusion's ``BrownianTreeNoiseSampler`` semantics (Crowson,
k-diffusion ``sampling.py``; the same in ComfyUI and in diffusers' ``DPMSolverSDEScheduler``): a
``torchsde.BrownianTree`` (Li, Wong, Chen & Duvenaud 2020, "Scalable Gradients for Stochastic
Differential Equations"; Kidger et al. 2021, "Efficient and Accurate Gradients for Neural SDEs")
over the noise levels ``[sigma_min, sigma_max]`` of the run, seeded by ``seed``, and the noise of a
step from ``sigma`` to ``sigma_next`` is ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)``,
a standard normal.  ``sigma`` is the k-diffusion noise level of the step's points
(:attr:`fewstep.samplers.core.Point.ksigma`: ``sigma / alpha`` for VP, the time for EDM and flow),
so on the same sigmas and seed the noise equals k-diffusion's (tested).

Two draws of one step over overlapping intervals are correlated as the Brownian path says (DPM++
SDE draws ``(sigma, sigma_mid)`` and ``(sigma, sigma_next)``).  The tree spans the schedule's
``[k_sigma(t_min), k_sigma(t_max)]`` (widened to the grid's levels if these go further), so runs of
one schedule at different step counts share the path; pass ``sigma_min`` / ``sigma_max`` to pin it
yourself (k-diffusion takes the grid's smallest positive and largest sigma).  A zero-SNR end
(``sigma = inf``) is taken at the tree's upper end.

torchsde is an optional dependency (``pip install "fewstep[sde]"``); it resolves times to
``tol`` (absolute, default k-diffusion's ``1e-6``), so increments over steps shorter than about
``100 tol`` in sigma lose accuracy; pass a smaller ``tol`` for very fine grids at low noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fewstep.samplers.core import NoiseSource, Point, points

if TYPE_CHECKING:
    from fewstep.samplers.core import Program

__all__ = ["BrownianNoise"]


def _torchsde():
    try:
        import torchsde
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "BrownianNoise needs torchsde, an optional dependency: pip install 'fewstep[sde]' (or pip install torchsde)"
        ) from err
    return torchsde


class BrownianNoise(NoiseSource):
    """Noise from a Brownian tree (k-diffusion's ``BrownianTreeNoiseSampler``).

    Args:
        seed: an int (one tree for the whole batch, k-diffusion's default), or one int per sample
            (one tree each: results do not depend on batching), or ``None`` (a seed drawn from
            torch's global generator).
        sigma_min, sigma_max: the tree's interval in k-diffusion noise levels; default: the
            schedule's range, widened to the run's grid.
        tol: the tree's time resolution (torchsde's ``tol``), absolute in sigma.
    """

    def __init__(
        self,
        seed: int | Sequence[int] | None = None,
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        tol: float = 1e-6,
    ):
        super().__init__(None)
        if seed is not None and not isinstance(seed, int):
            seed = [int(s) for s in seed]
        if isinstance(seed, bool):
            raise TypeError("seed must be an int, a sequence of ints (one per sample) or None")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.seed = seed
        self.sigma_min, self.sigma_max, self.tol = sigma_min, sigma_max, float(tol)
        self._trees: list | None = None

    def begin(self, program: "Program", x: torch.Tensor) -> None:
        torchsde = _torchsde()
        times = [program.schedule.t_min, program.schedule.t_max, *program.grid.tolist()]
        levels = [p.ksigma for p in points(program.schedule, times)]
        finite = [v for v in levels if math.isfinite(v)]
        lo = self.sigma_min if self.sigma_min is not None else min(v for v in finite if v > 0)
        hi = self.sigma_max if self.sigma_max is not None else max(finite)
        if not 0 < lo < hi:
            raise ValueError(f"BrownianNoise needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
        self.lo, self.hi = float(lo), float(hi)
        seeds = self.seed
        if seeds is None:
            seeds = int(torch.randint(0, 2**63 - 1, ()).item())
        self._batched = not isinstance(seeds, int)
        if self._batched and len(seeds) != x.shape[0]:
            raise ValueError(f"BrownianNoise got {len(seeds)} seeds for a batch of {x.shape[0]} samples; pass one per sample")
        w0 = torch.zeros_like(x[0] if self._batched else x)
        t0, t1 = torch.as_tensor(self.lo, dtype=torch.float64), torch.as_tensor(self.hi, dtype=torch.float64)
        self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, tol=self.tol) for s in (seeds if self._batched else [seeds])]

    def interval(self, x: torch.Tensor, s: Point, t: Point) -> torch.Tensor:
        if self._trees is None:
            raise RuntimeError("BrownianNoise.begin(program, x) must run first (fewstep.sample and run_program call it)")
        a, b = (self.hi if math.isinf(v) else v for v in (s.ksigma, t.ksigma))
        for v in (a, b):
            if not self.lo * (1 - 1e-12) <= v <= self.hi * (1 + 1e-12) and v != 0.0:
                raise ValueError(f"BrownianNoise: sigma={v:.6g} is outside the tree's interval [{self.lo:.6g}, {self.hi:.6g}]")
        a, b = (min(max(v, self.lo), self.hi) for v in (a, b))  # clean data (sigma = 0) is the tree's lower end
        if a == b:
            raise ValueError(f"BrownianNoise: the step from sigma={s.ksigma:.6g} to {t.ksigma:.6g} is empty inside the tree's interval")
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * sign
        w = w if self._batched else w[0]
        return (w / math.sqrt(hi - lo)).to(device=x.device, dtype=x.dtype)
