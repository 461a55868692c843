"""iPNDM and iPNDM-v: Adams-Bashforth steps on EDM's ODE, as zju-pi/diff-sampler writes them
(``diff-solvers-main/solvers.py``, Apache-2.0), ComfyUI's ``ipndm`` and ``ipndm_v``.

In EDM's form, ``dy/drho = eps`` with ``y = x / alpha``, ``rho = sigma / alpha`` and
``eps = (y - D) / rho``, a step is ``y_{i+1} = y_i + (rho_{i+1} - rho_i) sum_j c_j eps_{i-j}``,
i.e. ``x_{i+1} = (alpha_{i+1}/alpha_i) x_i + alpha_{i+1} (rho_{i+1} - rho_i) sum_j c_j eps_{i-j}``.

* ``ipndm`` (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
  sec. 4, the improved PNDM): the constant Adams-Bashforth coefficients of equal steps
  (``1``; ``3/2, -1/2``; ``23/12, -16/12, 5/12``; ``55/24, -59/24, 37/24, -9/24``) whatever the
  grid, the order rising with the history up to ``max_order`` (4).  On a grid whose steps vary the
  constant coefficients are consistent only to second order.
* ``ipndm_v``: the variable-step coefficients of the diff-sampler authors (second order: exact
  variable-step Adams-Bashforth; third and fourth: their closed forms; :func:`ipndm_v_coefficients`).
  The third-order form reduces to the constant coefficients on equal steps.  The fourth-order form
  does not: on equal steps it gives ``(57, -65, 43, -11) / 24`` instead of Adams-Bashforth's
  ``(55, -59, 37, -9) / 24`` (their weights sum to one and integrate a line exactly, so the method is
  consistent, but not of fourth order): measured slope 2.9 at ``max_order=4``, the same as at
  ``max_order=3``, on a log-SNR grid (tests/test_convergence.py).  fewstep keeps the authors'
  formula, which is what ComfyUI runs (the same numbers, tests/test_comfy_samplers.py), and the
  registry declares order 3; the exact variable-step fourth-order method is ``lms``.

The first step is Euler (DDIM); a step onto clean data is the denoising step ``x = D`` (ComfyUI's;
diff-sampler ends at ``sigma_min``, which is ``end="min"``); the history starts after a zero-SNR
start.
"""

from __future__ import annotations

import math

from fewstep.samplers._expint import LinearStep, ddim_coefficients, linear_multistep_routine
from fewstep.samplers.core import Program, Setup
from fewstep.samplers.registry import register

_CONSTANT = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_v_coefficients(h: list[float]) -> tuple[float, ...]:
    """iPNDM-v's coefficients on ``eps_i, eps_{i-1}, ...`` from the step lengths
    ``h = [h_n, h_{n-1}, ...]`` (``h_n = rho_{i+1} - rho_i``, ``h_{n-k} = rho_{i-k+1} - rho_{i-k}``),
    order ``len(h)`` (1 to 4), as diff-sampler's ``ipndm_v_sampler``."""
    k = len(h)
    if k == 1:
        return (1.0,)
    hn, h1 = h[0], h[1]
    c1, c2 = (2 + hn / h1) / 2, -(hn / h1) / 2
    if k == 2:
        return c1, c2
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if k == 3:
        return c1 + t1, c2 - (1 + h1 / h2) * t1, t1 * h1 / h2
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) * (
        hn * (hn + h1) * (hn + h1 + h2)
    ) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return (
        c1 + t1 + t2,
        c2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    )


def _build(setup: Setup, variable: bool) -> Program:
    k = setup.options["max_order"]
    if isinstance(k, bool) or k not in (1, 2, 3, 4):
        raise ValueError(f"{setup.spec.name}: max_order must be 1, 2, 3 or 4, got {k!r}")
    grid = setup.grid(setup.nfe)
    pts = setup.points(grid)
    rho = [p.sigma / p.alpha if p.alpha > 0 else math.inf for p in pts]
    start = next(i for i, r in enumerate(rho) if math.isfinite(r))
    steps = []
    for i in range(setup.nfe):
        s, t = pts[i], pts[i + 1]
        order = min(k, i + 1 - start)
        if order <= 1 or math.isinf(t.lam):  # Euler (DDIM), or the denoising step onto clean data
            c_x, c_d, _ = ddim_coefficients(s, t)
            steps.append(LinearStep(c_x, (c_d,)))
            continue
        if variable:
            c = ipndm_v_coefficients([rho[i + 1 - j] - rho[i - j] for j in range(order)])
        else:
            c = _CONSTANT[order]
        g = t.alpha * (rho[i + 1] - rho[i])
        steps.append(LinearStep(t.alpha / s.alpha, (), tuple(g * cj for cj in c)))
    return setup.program(grid, [p.t for p in pts[:-1]], linear_multistep_routine(pts, steps))


_PAPER = "Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator (iPNDM, sec. 4); zju-pi/diff-sampler"


@register(
    name="ipndm",
    family="ipndm",
    order=2,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER,
    summary="improved PNDM: Adams-Bashforth up to order 4 in sigma/alpha with equal-step coefficients (second order on varying steps)",
    options={"max_order": 4},
)
def build_ipndm(setup: Setup) -> Program:
    return _build(setup, variable=False)


@register(
    name="ipndm_v",
    family="ipndm",
    order=3,
    evals_per_step=1,
    stochastic=False,
    model_kind="diffusion",
    paper=_PAPER + " (variable-step coefficients)",
    summary="iPNDM with the diff-sampler authors' variable-step Adams-Bashforth coefficients (max_order 4; third order on varying steps)",
    options={"max_order": 4},
)
def build_ipndm_v(setup: Setup) -> Program:
    return _build(setup, variable=True)
