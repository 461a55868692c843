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

__all__ = ["BrownianNoise", "BrownianTree"]


def _torchsde():
    try:
        import torchsde
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "BrownianNoise needs torchsde, an optional dependency: pip install 'fewstep[sde]' (or pip install torchsde)"
        ) from err
    return torchsde


class BrownianTree:
    """A batch of Brownian paths over ``[lo, hi]`` (k-diffusion's ``BatchedBrownianTree``):
    ``tree(a, b)`` is ``(W(b) - W(a)) / sqrt(|b - a|)`` of ``x``'s shape.  ``seed`` an int (one
    path for the whole tensor) or one int per sample (one path each, of ``x[0]``'s shape)."""

    def __init__(self, x: torch.Tensor, lo: float, hi: float, seed: int | Sequence[int] | None = None, tol: float = 1e-6):
        torchsde = _torchsde()
        if not 0 <= lo < hi:
            raise ValueError(f"a Brownian tree needs 0 <= sigma_min < sigma_max, got {lo}, {hi}")
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        self.batched = not isinstance(seed, int)
        if self.batched and len(seed) != x.shape[0]:
            raise ValueError(f"got {len(seed)} seeds for a batch of {x.shape[0]} samples; pass one per sample")
        w0 = torch.zeros_like(x[0] if self.batched else x)
        t0, t1 = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
        self.lo, self.hi = float(lo), float(hi)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, tol=tol) for s in (seed if self.batched else [seed])]
        self._shape, self._dtype, self._device = x.shape, x.dtype, x.device
        self._cache: dict[float, torch.Tensor] = {}
        self._cache_size = max(64, (1 << 27) // max(1, x.numel() * x.element_size()))  # about 128 MB of path values
        self.key = (self.lo, self.hi, tuple(x.shape), x.dtype, x.device, tol, tuple(seed) if self.batched else seed)

    def __call__(self, a: float, b: float) -> torch.Tensor:
        if a == b:
            raise ValueError(f"a Brownian increment over an empty interval (sigma = {a:.6g})")
        return (self._w(b) - self._w(a)) / math.sqrt(abs(b - a))

    def _w(self, tau: float) -> torch.Tensor:
        """``W(tau) - W(lo)``, remembered: a run at another step count on a nested grid, or a second
        draw over an overlapping interval, reuses the path's values instead of querying the tree
        again (the tree's queries are its cost, about 5 ms each)."""
        w = self._cache.get(tau)
        if w is None:
            w = torch.zeros(self._shape, dtype=self._dtype, device=self._device) if tau == self.lo else (
                torch.stack([tree(self.lo, tau) for tree in self.trees]) if self.batched else self.trees[0](self.lo, tau))
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[tau] = w
        return w


class BrownianNoise(NoiseSource):
    """Noise from a Brownian tree (k-diffusion's ``BrownianTreeNoiseSampler``).

    Args:
        seed: an int (one tree for the whole batch, k-diffusion's default), or one int per sample
            (one tree each: results do not depend on batching), or ``None`` (a seed drawn from
            torch's global generator at the first run).  One source passed to several runs (other
            step counts, other samplers) gives them the same path, and reuses its values.
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
        self._tree: BrownianTree | None = None

    def begin(self, program: "Program", x: torch.Tensor) -> None:
        times = [program.schedule.t_min, program.schedule.t_max, *program.grid.tolist()]
        levels = [p.ksigma for p in points(program.schedule, times)]
        finite = [v for v in levels if math.isfinite(v)]
        lo = self.sigma_min if self.sigma_min is not None else min(v for v in finite if v > 0)
        hi = self.sigma_max if self.sigma_max is not None else max(finite)
        # torchsde rounds the tree's ends to tol; ends chosen here are put on that grid outwards, so
        # no query falls outside the rounded tree (ends given by the caller are used as given, as
        # k-diffusion does, for equal noise)
        if self.sigma_min is None:
            lo = math.floor(lo / self.tol) * self.tol if lo > self.tol else lo
        if self.sigma_max is None:
            hi = math.ceil(hi / self.tol) * self.tol
        if not 0 < lo < hi:
            raise ValueError(f"BrownianNoise needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
        if self.seed is None and self._tree is None:
            self.seed = int(torch.randint(0, 2**63 - 1, ()).item())  # one path for every run of this source
        seed = tuple(self.seed) if isinstance(self.seed, list) else self.seed
        key = (float(lo), float(hi), tuple(x.shape), x.dtype, x.device, self.tol, seed)
        if self._tree is None or self._tree.key != key:  # the same path again: keep the tree and its values
            self._tree = BrownianTree(x, float(lo), float(hi), self.seed, self.tol)

    def interval(self, x: torch.Tensor, s: Point, t: Point) -> torch.Tensor:
        tree = self._tree
        if tree is None:
            raise RuntimeError("BrownianNoise.begin(program, x) must run first (fewstep.sample and run_program call it)")
        a, b = (tree.hi if math.isinf(v) else v for v in (s.ksigma, t.ksigma))
        for v in (a, b):
            if not tree.lo * (1 - 1e-12) <= v <= tree.hi * (1 + 1e-12) and v != 0.0:
                raise ValueError(f"BrownianNoise: sigma={v:.6g} is outside the tree's interval [{tree.lo:.6g}, {tree.hi:.6g}]")
        a, b = (min(max(v, tree.lo), tree.hi) for v in (a, b))  # clean data (sigma = 0) is the tree's lower end
        return tree(a, b).to(device=x.device, dtype=x.dtype)
