r"""Noise assignment: pair a minibatch's noises with its data by minimising the total distance.

Immiscible diffusion (Li, Jiang, Kodaira, Tomizuka, Keutzer & Xu 2024, "Immiscible Diffusion:
Accelerating Diffusion Training with Noise Assignment", NeurIPS 2024, sec. 3.3 / Algorithm 1)
draws the minibatch's noises ``eps_1..eps_B`` i.i.d. as usual and, before noising, gives data
``x_i`` the noise ``eps_{pi(i)}`` of the permutation

.. math::  \pi^\star = \arg\min_{\pi} \sum_i \lVert x_i - \epsilon_{\pi(i)} \rVert_2 ,

a linear assignment problem solved exactly with :func:`scipy.optimize.linear_sum_assignment`
(the Jonker-Volgenant algorithm; ties broken the same way every time, so the assignment is a
deterministic function of the batch).  Minibatch optimal-transport coupling (Pooladian et al. 2023,
"Multisample Flow Matching", and Tong et al. 2024, "Improving and Generalizing Flow-Based Generative
Models with Minibatch Optimal Transport", as used by sLCT, :mod:`fewstep.distill.slct`) is the same
problem with the squared distance ``||x_i - eps_j||^2`` (the W2 cost), ``cost="sqeuclidean"``.

**The noise stays Gaussian.**  The assignment only permutes the batch's noises, so the set of noises
is unchanged, and as the data items are exchangeable (drawn i.i.d.) and the assignment is
equivariant, the noise a given item receives is marginally ``N(0, I)``; what changes is its
dependence on that item (``tests/test_immiscible.py`` checks the marginal with a
Kolmogorov-Smirnov test).  Permuting ``eps`` leaves every other per-sample draw (interval,
guidance scale) where it was.

**Precision.**  ``method="exact"`` builds the cost matrix in float64 from the data and noise as
given.  ``method="fp16"`` is the authors' quantised variant: their Stable Diffusion code computes
the distances in float16 after scaling data and noise by 0.1 (against overflow), which is faster on
GPUs for large batches and may pick a slightly different (near-optimal) permutation;
the assignment itself is exact on those costs.  ``block_size=k`` is fewstep's approximation for
batches too large for one ``O(B^3)`` assignment: the batch is split into consecutive blocks of ``k``
items (the last one shorter) and each block is assigned on its own (cost ``O(B k^2)``); every noise
is still used exactly once.

**Processes.**  fewstep assigns within each process's micro-batch (the batch one ``objective.loss``
call sees): no communication, and the assignment of a micro-batch depends on that micro-batch alone,
so a run on 2 processes with ``grad_accum=1`` and one on 1 process with ``grad_accum=2`` (the same
micro-batches) train the same student.  The authors' Stable Diffusion script instead gathers every
rank's noise and assigns over the global batch on rank 0; with ``P`` processes fewstep's coupling is
therefore that of a batch ``P`` times smaller (a weaker coupling, as the paper's batch-size ablation
shows), which is the price of no communication.  The improved paper's KNN variant (pick the nearest
of ``k`` fresh noises per item) is not implemented: it does not keep the noise Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["NoiseAssignment", "ASSIGNMENT_METHODS", "ASSIGNMENT_COSTS", "noise_assignment"]

ASSIGNMENT_METHODS = ("exact", "fp16")
ASSIGNMENT_COSTS = ("l2", "sqeuclidean")
#: scale applied to data and noise before float16 distances (the authors' Stable Diffusion code)
FP16_SCALE = 0.1


@dataclass(frozen=True)
class NoiseAssignment:
    """Assign a batch's noises to its data (see the module docstring).

    Args:
        method: ``"exact"`` (float64 costs) or ``"fp16"`` (the paper's quantised float16 costs).
        cost: ``"l2"`` (immiscible diffusion's ``||x - eps||``) or ``"sqeuclidean"`` (optimal
            transport's ``||x - eps||^2``, sLCT).
        block_size: assign within consecutive blocks of this many items (large batches); ``None``:
            the whole batch at once.
    """

    method: str = "exact"
    cost: str = "l2"
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ASSIGNMENT_METHODS:
            raise ValueError(f"unknown noise assignment method {self.method!r}; choose from {', '.join(ASSIGNMENT_METHODS)}")
        if self.cost not in ASSIGNMENT_COSTS:
            raise ValueError(f"unknown assignment cost {self.cost!r}; choose from {', '.join(ASSIGNMENT_COSTS)}")
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
            raise ValueError(f"block_size must be an integer >= 2 (or None: the whole batch), got {b!r}")

    def cost_matrix(self, x0: torch.Tensor, eps: torch.Tensor) -> np.ndarray:
        """(B, B) float64 costs ``C[i, j] = ||x_i - eps_j||`` (or its square)."""
        if x0.shape != eps.shape:
            raise ValueError(f"data {tuple(x0.shape)} and noise {tuple(eps.shape)} must have the same shape")
        if self.method == "fp16":
            a = (FP16_SCALE * x0.detach().flatten(1)).half()
            b = (FP16_SCALE * eps.detach().flatten(1)).half()
            d = torch.linalg.vector_norm(a.unsqueeze(1) - b.unsqueeze(0), dim=2).double() / FP16_SCALE
        else:
            a, b = x0.detach().flatten(1).double(), eps.detach().flatten(1).double()
            d = torch.cdist(a, b)
        d = d.square() if self.cost == "sqeuclidean" else d
        return d.cpu().numpy()

    def permutation(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B,) int64 on the CPU: ``perm[i]`` is the noise given to data item ``i`` (every noise
        used once)."""
        from scipy.optimize import linear_sum_assignment

        n = x0.shape[0]
        k = n if self.block_size is None else self.block_size
        perm = np.empty(n, dtype=np.int64)
        for start in range(0, n, k):
            stop = min(start + k, n)
            rows, cols = linear_sum_assignment(self.cost_matrix(x0[start:stop], eps[start:stop]))
            perm[start + rows] = start + cols
        return torch.from_numpy(perm)

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The noises reordered so that row ``i`` is the one assigned to ``x0[i]``."""
        if not torch.isfinite(x0).all() or not torch.isfinite(eps).all():
            return eps  # non-finite data: no assignment; the trainer's non-finite guard skips the step
        return eps[self.permutation(x0, eps).to(eps.device)]

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "cost": self.cost, "block_size": self.block_size}


def noise_assignment(value: Any, cost: str = "l2") -> NoiseAssignment | None:
    """The option as objectives take it: ``None``/``False`` (independent noise), ``True`` (exact
    assignment with ``cost``), a method name (``"exact"``, ``"fp16"``) or a :class:`NoiseAssignment`."""
    if value is None or value is False:
        return None
    if value is True:
        return NoiseAssignment(cost=cost)
    if isinstance(value, str):
        return NoiseAssignment(method=value, cost=cost)
    if isinstance(value, NoiseAssignment):
        return value
    raise TypeError(f"noise assignment must be None, a bool, one of {', '.join(ASSIGNMENT_METHODS)} or a NoiseAssignment, "
                    f"got {type(value).__name__}")
