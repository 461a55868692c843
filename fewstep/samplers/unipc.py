"""UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023) in data prediction, B(h) variants ``bh1`` / ``bh2``
(the paper's UniP-p and UniC-p with the data-prediction model).

With ``h = lambda_t - lambda_s``, ``z = -h`` and the history ``m_0 = D(x_s)``, ``m_k`` at
``lambda_{s_k}`` (``r_k = (lambda_{s_k} - lambda_s) / h``, ``D1_k = (m_k - m_0) / r_k``):

* **UniP-p**, the predictor:
  ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) m_0 - alpha_t B(h) sum_k rho_k D1_k``;
* **UniC-p**, the corrector, after evaluating ``m_t`` at the predicted ``x_t``: the same step from
  ``x_s`` with the new point added, ``... - alpha_t B(h) (sum_k rho^c_k D1_k + rho^c_p (m_t - m_0))``.
  It reuses ``m_t`` for the next predictor, so the corrector costs no evaluation, and the next
  step starts from the corrected state.

``rho`` solves ``R rho = b`` with ``R_{jk} = r_k^{j-1}`` (``r_p = 1``) and
``b_j = z phi_{j+1}(z) j! / B(h)``; ``B(h) = z`` (``bh1``) or ``e^z - 1`` (``bh2``).  As in the
authors' code (and diffusers), UniP-2 uses ``rho = 1/2`` and UniC-1 ``rho = 1/2`` instead of the
solve.  Every coefficient is a float64 number computed once per program; the routine only forms
linear combinations.  The DC-Solver (:mod:`fewstep.samplers.dc_solver`) adds its compensation to
the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.samplers._expint import combine, e1, multistep_orders, phi, ratio
from fewstep.samplers.core import Eval, NoiseSource, Point, Program, Routine, Setup
from fewstep.samplers.registry import register

__all__ = ["UniStep", "unipc_weights", "unipc_steps", "unipc_routine", "arrive", "predict", "history_depth", "VARIANTS"]

VARIANTS = ("bh1", "bh2")
_PAPER = "Zhao et al. 2023, UniPC (arXiv:2302.04867), UniP-p / UniC-p with B(h) = h or e^h - 1"


def unipc_weights(pts: Sequence[Point], i: int, order: int, variant: str, corrector: bool) -> tuple[float, list[float]]:
    """UniP (``corrector=False``) or UniC (``corrector=True``) of the given order for the step from
    ``pts[i]`` to ``pts[i+1]``.

    Returns ``(c_x, w)``: the predictor is ``c_x x_i + sum_j w[j] m_{i-j}``; the corrector is
    ``c_x x_i + sum_j w[j] m_{i+1-j}`` (``w[0]`` weighs the new point's prediction ``m_{i+1}``),
    where ``x_i`` is the (corrected) state at ``pts[i]``."""
    if variant not in VARIANTS:
        raise ValueError(f"UniPC's solver_type must be one of {', '.join(VARIANTS)}, got {variant!r}")
    s, t = pts[i], pts[i + 1]
    h = t.lam - s.lam
    c_x, c0 = t.sigma / s.sigma, t.alpha * e1(h)
    p = order
    w = np.zeros(p + 1 if corrector else p)
    shift = 1 if corrector else 0  # index of m_0 (the prediction at s) in w
    w[shift] = c0
    if p == 1 and not corrector:
        return c_x, w.tolist()
    z = -h
    big_b = z if variant == "bh1" else -e1(h)
    rks = [ratio(pts[i - k].lam - s.lam, h) for k in range(1, p)] + [1.0]
    b = np.array([z * phi(j + 1, z) * math.factorial(j) / big_b for j in range(1, p + 1)])
    r_mat = np.array([[r ** (j - 1) for r in rks] for j in range(1, p + 1)])
    if corrector:
        rho = np.array([0.5]) if p == 1 else np.linalg.solve(r_mat, b)
    else:
        rho = np.array([0.5]) if p == 2 else np.linalg.solve(r_mat[:-1, :-1], b[:-1])
    scale = -t.alpha * big_b
    for k in range(1, p):  # D1_k = (m_k - m_0) / r_k
        c = scale * rho[k - 1] / rks[k - 1]
        w[shift + k] += c
        w[shift] -= c
    if corrector:  # the new point: (m_t - m_0), r = 1
        w[0] += scale * rho[-1]
        w[shift] -= scale * rho[-1]
    return c_x, [float(v) for v in w]


@dataclass(frozen=True)
class UniStep:
    """Step ``i`` of a UniPC program, from the (corrected) state at ``pts[i]`` to ``pts[i+1]``.

    * ``predictor``: ``(c_x, w)`` over the history ``[m_i, m_{i-1}, ...]``;
    * ``corrector``: ``(c_x, w)`` over ``[m_{i+1}, m_i, ...]``, applied once ``m_{i+1}`` is known
      (``None``: no corrector, e.g. after the last step, where no evaluation follows);
    * ``compensation``: DC-Solver's replacement of ``m_i`` by ``sum_j w[j] m_{i-j}`` before the
      predictor (``None``: none);
    * ``order``: the predictor's order (the number of predictions it uses)."""

    predictor: tuple[float, tuple[float, ...]]
    corrector: tuple[float, tuple[float, ...]] | None = None
    compensation: tuple[float, ...] | None = None
    order: int = 1


def unipc_steps(
    setup: Setup,
    pts: Sequence[Point],
    order: int,
    variant: str,
    *,
    corrector: bool = True,
    disable_corrector: Sequence[int] = (),
) -> list[UniStep]:
    """The steps of UniPC-``order`` over the grid ``pts``: orders ramp up, and with
    ``lower_order_final`` down at the end below 15 steps (:func:`_expint.lower_order_final_steps`).
    The UniPC authors' code and diffusers' ``UniPCMultistepScheduler`` ramp down at every step
    count, which caps the measured order at 2 for ``unipc_3`` (one UniP-1 step); we follow
    diffusers' DPM-Solver rule instead so that the declared order holds at the default options, and
    ``lower_order_final=math.inf`` reproduces the authors' rule.  A step onto clean data is first order.  History points at zero SNR (``lambda = -inf``) are left out of the
    polynomial, and a step that starts there has no corrector (its ``B(h)`` may be infinite).
    ``disable_corrector`` lists the step indices whose corrector is skipped (diffusers' option)."""
    n = len(pts) - 1
    orders = multistep_orders(
        n, order, setup.options["lower_order_final"], math.isinf(pts[-1].lam), requested=setup.options.get("orders")
    )
    steps = []
    for i, o in enumerate(orders):
        o = min(o, sum(1 for p in pts[max(i - o + 1, 0) : i + 1] if math.isfinite(p.lam)) or 1)
        c_x, w = unipc_weights(pts, i, o, variant, corrector=False)
        corr = None
        if corrector and i < n - 1 and i not in disable_corrector and math.isfinite(pts[i].lam):
            cc_x, cw = unipc_weights(pts, i, o, variant, corrector=True)
            corr = (cc_x, tuple(cw))
        steps.append(UniStep((c_x, tuple(w)), corr, order=o))
    return steps


def history_depth(steps: Sequence[UniStep]) -> int:
    """How many past predictions the steps use."""
    return max(
        max(len(st.predictor[1]), len(st.corrector[1]) if st.corrector else 0, len(st.compensation or ())) for st in steps
    )


def arrive(
    steps: Sequence[UniStep], i: int, x_seen: torch.Tensor, x_prev: torch.Tensor | None, hist: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """At ``pts[i]``, with ``hist[0]`` the prediction just made there: the corrector of step
    ``i-1`` (from the corrected state ``x_prev`` at ``pts[i-1]``, reusing the evaluation), then
    step ``i``'s compensation of ``hist[0]``.  Returns the state and history step ``i`` starts
    from."""
    prev = steps[i - 1].corrector if i else None
    x = combine(x_prev, prev[0], list(zip(prev[1], hist))) if prev is not None and x_prev is not None else x_seen
    comp = steps[i].compensation
    if comp is not None:
        hist = [combine(hist[0], 0.0, list(zip(comp, hist))), *hist[1:]]
    return x, hist


def predict(step: UniStep, x: torch.Tensor, hist: list[torch.Tensor]) -> torch.Tensor:
    """The predictor of ``step`` from state ``x`` at its start."""
    return combine(x, step.predictor[0], list(zip(step.predictor[1], hist)))


def unipc_routine(pts: Sequence[Point], steps: Sequence[UniStep]) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """One evaluation per step at ``pts[i]``; :func:`arrive` corrects the state there (reusing
    that evaluation) and compensates the prediction, :func:`predict` steps on."""
    depth = history_depth(steps)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        hist: list[torch.Tensor] = []
        x_prev: torch.Tensor | None = None  # corrected state at the previous point
        for i, st in enumerate(steps):
            x_seen, m = yield Eval(x, pts[i].t)
            x_prev, hist = arrive(steps, i, x_seen, x_prev, [m, *hist[: depth - 1]])
            x = predict(st, x_prev, hist)
        return x

    return routine


def _build(setup: Setup, order: int) -> Program:
    opts = setup.options
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    steps = unipc_steps(
        setup, pts, order, opts["solver_type"], corrector=bool(opts["corrector"]), disable_corrector=tuple(opts["disable_corrector"])
    )
    return setup.program(grid, [p.t for p in pts[:-1]], unipc_routine(pts, steps), orders=[st.order for st in steps])


_OPTIONS = {"solver_type": "bh2", "lower_order_final": True, "corrector": True, "disable_corrector": (), "orders": None}


def _register(order: int) -> None:
    @register(
        name=f"unipc_{order}",
        family="unipc",
        order=order + 1,
        evals_per_step=1,
        stochastic=False,
        model_kind="diffusion",
        paper=_PAPER,
        summary=f"UniP-{order} predictor + UniC corrector (no extra evaluation), order {order + 1}; corrector=False gives UniP alone",
        options=dict(_OPTIONS),
    )
    def build(setup: Setup) -> Program:
        return _build(setup, order)


for _k in (2, 3):
    _register(_k)
