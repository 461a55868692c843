"""Multistep (segment-wise) consistency distillation, MCD (Heek, Hoogeboom & Salimans 2024,
"Multistep Consistency Models", Algorithm 2; Xie et al. 2024, MLCM).

The grid's ``N`` intervals are split into ``S`` segments of ``N / S`` intervals; the student is
consistent only within a segment: ``f_theta(x_t, t)`` is the DDIM step from ``t`` to the lower
edge of ``t``'s segment with the student's data prediction (the registry's ``ddim``, driven by
:class:`fewstep.distill.teacher.IntervalSolver`), so ``f`` is the identity on every edge and no
separate boundary condition is needed between segments.  The pair and the teacher step are those
of :class:`fewstep.distill.cd.CD`.  ``S = 1`` is consistency distillation.

The student samples by stepping from edge to edge (``S`` steps, the registry's ``mcd`` sampler);
a budget of 1, 2, 4 or 8 steps takes every ``S/k``-th edge, or splits segments, through the same
sampler.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep.distill.cd import CD

__all__ = ["MCD"]


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

    def edge_times(self) -> list[float]:
        """Segment edges, noisiest first (``S + 1`` times, the last one clean data)."""
        return self.grid[:: self.per_segment].flip(0).tolist()

    def sampler_options(self) -> dict[str, Any]:
        """``mcd``'s ``edges``: the segment edges the student was trained on."""
        return {"edges": self.edge_times()}

    def describe(self) -> dict[str, Any]:
        """The CD description plus the segments."""
        return {**super().describe(), "segments": self.segments, "edges": self.edge_times()}
