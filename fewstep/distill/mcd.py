"""Multistep (segment-wise) consistency distillation, MCD (Heek, Hoogeboom & Salimans 2024,
"Multistep Consistency Models", Algorithm 2; Xie et al. 2024, MLCM).

The grid's ``N`` intervals are split into ``S`` segments of ``N / S`` intervals; the student is
consistent only within a segment: ``f_theta(x_t, t)`` is the DDIM step from ``t`` to the lower
edge of ``t``'s segment with the student's data prediction (the registry's ``ddim``, driven by
:class:`fewstep.distill.teacher.IntervalSolver`), so ``f`` is the identity on every edge and no
separate boundary condition is needed between segments.  The pair and the teacher step are those
of :class:`fewstep.distill.cd.CD`.  ``S = 1`` is consistency distillation.

**The loss is measured in x-space**, as in Heek et al.'s Algorithm 2: the target's map to the
edge, ``z_ref = DDIM_{s -> t_e}(x_hat_s, sg(f_theta-(x_hat_s, s)))``, is turned into the data
prediction that the student's own DDIM step from ``(x_t, t)`` would need to land on it,

.. math::  \hat x_{ref} = \frac{z_{ref} - (\sigma_e / \sigma_t)\, x_t}{\alpha_e - \alpha_t \sigma_e / \sigma_t},

and compared with the student's data prediction ``x_hat = f_theta(x_t, t)``.  Comparing the two
edge points instead (z-space) scales the squared distance by ``(alpha_e - alpha_t sigma_e /
sigma_t)^2``, which vanishes as ``t`` approaches its segment's lower edge: the first intervals of
every segment but the last would carry almost no weight.  On the last segment (edge = clean data,
``sigma_e = 0``) both are the same.

The student samples by stepping from edge to edge (``S`` steps, the registry's ``mcd`` sampler);
a budget of 1, 2, 4 or 8 steps takes every ``S/k``-th edge, or splits segments, through the same
sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.distill.cd import CD
from fewstep.distill.objective import Models

__all__ = ["MCD", "ddim_inverse"]


class MCD(CD):
    """Segment-wise consistency distillation; ``segments`` must divide ``num_intervals``.  The grid
    ends on clean data (``end="zero"``), the last edge."""

    name = "mcd"
    paper = "Heek, Hoogeboom & Salimans 2024, Multistep Consistency Models, Algorithm 2"
    sampler = "mcd"

    def __init__(self, num_intervals: int = 32, segments: int = 4, **kwargs: Any):
        if kwargs.get("end", "zero") != "zero":
            raise ValueError("MCD's grid ends on clean data (end='zero'): its last segment edge is the data")
        super().__init__(num_intervals, **kwargs)
        if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1 or num_intervals % segments:
            raise ValueError(f"segments must be a positive integer dividing num_intervals={num_intervals}, got {segments!r}")
        self.segments = segments
        self.per_segment = num_intervals // segments

    def edges(self, grid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The lower edge of each interval's segment (a grid index)."""
        return torch.div(n, self.per_segment, rounding_mode="floor") * self.per_segment

    def prediction(self, models: Models, x_hi: torch.Tensor, t_hi: torch.Tensor, t_edge: torch.Tensor, cond: dict[str, Any], at_boundary: torch.Tensor) -> torch.Tensor:
        """The student's data prediction ``x_hat = f_theta(x_t, t)`` (x-space)."""
        return models.student(x_hi, t_hi.to(x_hi.device), **cond).float()

    def reference(self, models: Models, x_lo: torch.Tensor, t_lo: torch.Tensor, t_edge: torch.Tensor, cond: dict[str, Any], at_boundary: torch.Tensor, x_hi: torch.Tensor, t_hi: torch.Tensor) -> torch.Tensor:
        """``x_hat_ref``: the target's map to the edge, inverted through the DDIM step from
        ``(x_t, t)`` to the edge (module docstring)."""
        z_ref = super().reference(models, x_lo, t_lo, t_edge, cond, at_boundary, x_hi, t_hi)
        return ddim_inverse(self.schedule, z_ref, x_hi, t_hi, t_edge)

    def edge_times(self) -> list[float]:
        """Segment edges, noisiest first (``S + 1`` times, the last one clean data)."""
        return self.grid[:: self.per_segment].flip(0).tolist()

    def sampler_options(self) -> dict[str, Any]:
        """``mcd``'s ``edges``: the segment edges the student was trained on."""
        return {"edges": self.edge_times()}

    def describe(self) -> dict[str, Any]:
        """The CD description plus the segments."""
        return {**super().describe(), "segments": self.segments, "edges": self.edge_times()}


def ddim_inverse(schedule: Any, z_edge: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_edge: torch.Tensor) -> torch.Tensor:
    """The data prediction ``x`` whose DDIM step from ``(x_t, t)`` lands on ``z_edge`` at ``t_edge``:
    ``(z_edge - (sigma_e / sigma_t) x_t) / (alpha_e - alpha_t sigma_e / sigma_t)`` per sample
    (Heek et al. 2024, Algorithm 2), in float64 coefficients."""
    tt = t.detach().to("cpu", torch.float64)
    te = t_edge.detach().to("cpu", torch.float64)
    a_t, s_t = schedule.alpha(tt), schedule.sigma(tt)
    a_e, s_e = schedule.alpha(te), schedule.sigma(te)
    r = s_e / s_t
    c = a_e - a_t * r
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    r = r.to(x_t.device, torch.float32).reshape(shape)
    c = c.to(x_t.device, torch.float32).reshape(shape)
    return (z_edge.float() - r * x_t.float()) / c
