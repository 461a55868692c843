"""Shared maths of the exponential-integrator samplers (DDIM, DPM-Solver++, DEIS, ...).

With the half log-SNR ``lambda = log alpha - log sigma`` and step ``h = lambda_t - lambda_s``,
the probability-flow ODE in data prediction ``D`` has the exact solution (Lu et al. 2022b,
"DPM-Solver++", eq. 9)

    x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^{lambda} D(x_lambda) dlambda.

Expanding ``D`` in powers of ``(lambda - lambda_s)`` gives the integrals written here as

    e1(h) = 1 - e^{-h},    e2(h) = 1 - e1(h)/h,    e3(h) = e2(h)/h - 1/2,

so that the k-th Taylor term contributes ``alpha_t * h^k * e_{k+1}(h) * D^{(k)} / ...``.  All
three are finite for ``h -> inf`` (a step to clean data, ``sigma_t = 0``: ``e1 = e2 = 1``,
``e3 = -1/2``) and evaluated with series for small ``h``.  Coefficients are Python floats
(float64), computed once per program; a step is then a short linear combination of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.models.prediction import from_x0
from fewstep.samplers.core import Eval, NoiseSource, Point, Routine

__all__ = [
    "e1",
    "e2",
    "e3",
    "ratio",
    "combine",
    "ddim_coefficients",
    "dpmpp_multistep_weights",
    "multistep_orders",
    "lower_order_final_steps",
    "lagrange_integrals",
    "gauss_legendre",
    "lagrange_weights",
    "phi",
    "forward_transition",
    "LinearStep",
    "linear_multistep_routine",
    "ancestral_split",
    "down_point",
    "ancestral",
    "churn_gamma",
    "Stage",
    "Interval",
    "runge_kutta_routine",
]


def e1(h: float) -> float:
    """``1 - exp(-h)``."""
    return -math.expm1(-h)


def e2(h: float) -> float:
    """``1 - (1 - exp(-h)) / h = (h - 1 + exp(-h)) / h``."""
    if math.isinf(h):
        return 1.0
    if abs(h) < 1e-4:
        return h / 2 - h * h / 6 + h**3 / 24
    return 1.0 - e1(h) / h


def e3(h: float) -> float:
    """``e2(h) / h - 1/2 = (h - 1 + exp(-h)) / h^2 - 1/2``."""
    if math.isinf(h):
        return -0.5
    if abs(h) < 1e-3:
        return -h / 6 + h * h / 24 - h**3 / 120
    return e2(h) / h - 0.5


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j >= 0} z^j / (j + k)!`` (``phi_0 = e^z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``),
    the exponential-integrator functions (Hochbruck & Ostermann 2010, "Exponential integrators")
    that UniPC's coefficients use.  Series for ``|z| < 1/2``, the recursion otherwise; ``phi_k(-inf) = 0``."""
    if k < 0:
        raise ValueError(f"phi_k needs k >= 0, got {k}")
    if abs(z) < 0.5:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    val = 0.0 if z == -math.inf else math.exp(z)
    for j in range(k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def forward_transition(s: Point, t: Point) -> tuple[float, float]:
    """The forward process from a cleaner time ``s`` to a noisier time ``t``:
    ``x_t = c_x x_s + c_z z`` with ``c_x = alpha_t / alpha_s`` and
    ``c_z = sqrt(sigma_t^2 - c_x^2 sigma_s^2)``, the transition kernel ``q(x_t | x_s)`` (Kingma et al.
    2021, "Variational Diffusion Models", appendix A).  From clean data (``sigma_s = 0``) it is
    ``alpha_t x_0 + sigma_t z``."""
    c_x = t.alpha / s.alpha
    return c_x, math.sqrt(max(t.sigma**2 - (c_x * s.sigma) ** 2, 0.0))


def ratio(a: float, b: float) -> float:
    """``a / b``, with the limit 1 when both are infinite (steps out of a zero-SNR start, where
    ``lambda_s = -inf`` and every log-SNR difference from it is infinite)."""
    if math.isinf(a) and math.isinf(b):
        return 1.0
    return a / b


def combine(x: torch.Tensor, c_x: float, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``c_x * x + sum(w * d for w, d in terms)``, skipping zero weights."""
    out = x * c_x if c_x != 1.0 else x.clone()
    for w, d in terms:
        if w != 0.0:
            out.add_(d, alpha=w)
    return out


def ddim_coefficients(s: Point, t: Point, eta: float = 0.0) -> tuple[float, float, float]:
    """DDIM step from ``s`` to ``t`` (Song et al. 2021, "Denoising Diffusion Implicit Models",
    eq. 12) in data prediction: ``x_t = c_x x_s + c_d D + c_z z``.

    With ``eps_hat = (x_s - alpha_s D) / sigma_s``, ``x_t = alpha_t D + c eps_hat + c_z z`` where
    ``c_z = eta sigma_t sqrt(1 - e^{-2h})`` (eq. 16 in log-SNR form, valid for any schedule) and
    ``c = sqrt(sigma_t^2 - c_z^2)``.  At ``eta = 0`` this is DPM-Solver++(1)."""
    h = t.lam - s.lam
    c_z = eta * t.sigma * math.sqrt(max(e1(2 * h), 0.0)) if eta else 0.0
    c = math.sqrt(max(t.sigma**2 - c_z**2, 0.0))
    if eta == 0.0:  # the exponential-integrator form, exact at zero SNR and at sigma_t = 0
        return t.sigma / s.sigma, t.alpha * e1(h), 0.0
    return c / s.sigma, t.alpha - c * s.alpha / s.sigma, c_z


def dpmpp_multistep_weights(
    pts: Sequence[Point],
    i: int,
    order: int,
    solver_type: str = "midpoint",
    eta: float = 0.0,
    d2_weight: float = 1.0,
) -> tuple[float, list[float], float]:
    """Multistep DPM-Solver++ step ``i`` (from ``pts[i]`` to ``pts[i+1]``) of the given order,
    using the data predictions at ``pts[i], pts[i-1], pts[i-2]``.

    Returns ``(c_x, [w_0, w_1, w_2][:order], c_z)`` with
    ``x_{i+1} = c_x x_i + sum_j w_j D_{i-j} + c_z z``.

    * order 1: DPM-Solver++(1) = DDIM.
    * order 2: DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2 (``midpoint``), or the ``heun``
      variant of its derivative term.
    * order 3: DPM-Solver++(3M): second-order divided differences in ``lambda``.  With
      ``D2 = (D1_0 - D1_1) / (r0 + r1) = h^2 D''/2 + O(h^3)`` the Taylor term
      ``-alpha_t h^2 e3(h) D''`` is ``-2 alpha_t e3(h) D2``.  The reference implementation
      (LuChengTHU/dpm-solver, and diffusers' ``DPMSolverMultistepScheduler(solver_order=3)``)
      weights ``D2`` by ``-alpha_t e3(h)``, half of that, which leaves the method second order;
      ``d2_weight=0.5`` reproduces it, the default ``1.0`` is third order (measured slope 3.0 on
      the exact mixture, tests/test_convergence.py).
    * ``eta > 0``: SDE-DPM-Solver++(2M) (Lu et al. 2022b, sec. 5 / App. B): the data term
      decays as ``e^{-(1+eta) h}`` and ``c_z = sigma_t sqrt(1 - e^{-2 eta h})``; ``eta = 1`` is the
      paper's variant.  Order 3 with ``eta > 0`` is k-diffusion's DPM-Solver++(3M) SDE: the same
      Taylor terms with the effective step ``(1 + eta) h``.
    """
    s, t = pts[i], pts[i + 1]
    h = t.lam - s.lam
    if eta:
        c_x = (t.sigma / s.sigma) * math.exp(-eta * h) if not math.isinf(h) else 0.0
        hh = (1.0 + eta) * h  # the data term's effective step
        c_z = t.sigma * math.sqrt(max(e1(2 * eta * h), 0.0))
    else:
        c_x, hh, c_z = t.sigma / s.sigma, h, 0.0
    c0 = t.alpha * e1(hh)
    if order == 1:
        return c_x, [c0], c_z
    h0 = s.lam - pts[i - 1].lam
    r0 = ratio(h0, h)
    if order == 2:
        if solver_type == "midpoint":
            c1 = 0.5 * c0
        elif solver_type == "heun":
            c1 = t.alpha * e2(hh)
        else:
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        # D1 = (D_i - D_{i-1}) / r0
        return c_x, [c0 + c1 / r0, -c1 / r0], c_z
    if order != 3:
        raise ValueError(f"multistep DPM-Solver++ has orders 1 to 3, got {order}")
    r1 = ratio(pts[i - 1].lam - pts[i - 2].lam, h)
    c1, c2 = t.alpha * e2(hh), t.alpha * e3(hh)
    a = np.array([1 / r0, -1 / r0, 0.0])  # (D_i - D_{i-1}) / r0
    b = np.array([0.0, 1 / r1, -1 / r1])  # (D_{i-1} - D_{i-2}) / r1
    d1 = a + (r0 / (r0 + r1)) * (a - b)
    d2 = (a - b) / (r0 + r1)
    w = c0 * np.array([1.0, 0.0, 0.0]) + c1 * d1 - 2.0 * d2_weight * c2 * d2
    return c_x, [float(v) for v in w], c_z


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(48)


def gauss_legendre(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> float:
    """``int_lo^hi f(v) dv`` by 48-point Gauss-Legendre quadrature (float64; ``f`` vectorised)."""
    v = 0.5 * (hi - lo) * _GL_NODES + 0.5 * (hi + lo)
    return float(0.5 * (hi - lo) * np.sum(_GL_WEIGHTS * f(v)))


def lagrange_integrals(
    nodes: Sequence[float],
    lo: float,
    hi: float,
    tau_of: Callable[[np.ndarray], np.ndarray],
    jacobian: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[float]:
    """``[int_lo^hi l_j(tau_of(v)) J(v) dv for j]`` for the Lagrange basis ``l_j`` on ``nodes``
    (Gauss-Legendre, 48 points, float64).  ``tau_of`` maps the integration variable to the
    interpolation variable and ``jacobian`` (default 1) is the change-of-variable factor, both
    vectorised over a numpy array."""
    v = 0.5 * (hi - lo) * _GL_NODES + 0.5 * (hi + lo)
    jac = jacobian(v) if jacobian is not None else 1.0
    return [float(0.5 * (hi - lo) * np.sum(_GL_WEIGHTS * lj * jac)) for lj in _lagrange_basis(nodes, tau_of(v))]


def _lagrange_basis(nodes: Sequence[float], tau: np.ndarray) -> list[np.ndarray]:
    """The Lagrange basis polynomials ``l_j`` on ``nodes``, evaluated at ``tau``."""
    out = []
    for j in range(len(nodes)):
        lj = np.ones_like(tau)
        for m in range(len(nodes)):
            if m != j:
                lj = lj * (tau - nodes[m]) / (nodes[j] - nodes[m])
        out.append(lj)
    return out


def lagrange_weights(nodes: Sequence[float], x: float) -> list[float]:
    """``[l_j(x) for j]``: the weights that interpolate (or extrapolate) values given at ``nodes``
    to the point ``x`` with the polynomial through all of them."""
    return [float(v) for v in _lagrange_basis(nodes, np.asarray(x, dtype=np.float64))]


LOWER_ORDER_FINAL_STEPS = 15  # diffusers' DPMSolverMultistepScheduler: lower the final orders below 15 steps


def lower_order_final_steps(value: object) -> float:
    """The step count below which a multistep solver lowers its final orders, from the samplers'
    ``lower_order_final`` option: ``True`` is diffusers' DPM-Solver rule (below 15 steps), ``False``
    never, an integer ``N`` below ``N`` steps (10: the DPM-Solver authors' code), ``math.inf`` at
    every step count (the UniPC authors' code and diffusers' ``UniPCMultistepScheduler``)."""
    if isinstance(value, bool):
        return float(LOWER_ORDER_FINAL_STEPS) if value else 0.0
    if isinstance(value, (int, np.integer)) and value >= 0:
        return float(value)
    if isinstance(value, float) and value == math.inf:
        return math.inf
    raise TypeError(
        f"lower_order_final must be True (lower the final orders below {LOWER_ORDER_FINAL_STEPS} steps), False (never), "
        f"a step count N (below N steps) or math.inf (always), got {value!r}"
    )


def multistep_orders(
    num_steps: int,
    order: int,
    lower_order_final: bool | int | float,
    last_step_to_data: bool,
    requested: Sequence[int] | None = None,
) -> list[int]:
    """Per-step orders of a multistep solver: warm-up ``min(order, i + 1)``; with
    ``lower_order_final`` (see :func:`lower_order_final_steps`: by default below 15 steps,
    diffusers' DPM-Solver rule, for stability at few steps) the orders ramp down at the end,
    ``min(order, num_steps - i)``; a step onto clean data (``lambda = inf``) is first order, as no
    polynomial in ``lambda`` extends there.  Above the threshold every step after the warm-up has
    the full order, so the declared convergence order holds at the default options.

    ``requested`` (the samplers' ``orders`` option) sets every step's order instead, as the
    unified sampling framework's per-step solver choice (Liu et al. 2024, "A Unified Sampling
    Framework for Solver Searching of Diffusion Probabilistic Models", sec. 4): it is checked
    against the same limits (history available, at most ``order``, first order onto clean data)."""
    below = lower_order_final_steps(lower_order_final)
    if requested is not None:
        return _checked_orders(requested, num_steps, order, last_step_to_data)
    orders = [min(order, i + 1) for i in range(num_steps)]
    if num_steps < below:
        orders = [min(o, num_steps - i) for i, o in enumerate(orders)]
    if last_step_to_data:
        orders[-1] = 1
    return orders


def _checked_orders(requested: Sequence[int], num_steps: int, order: int, last_step_to_data: bool) -> list[int]:
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence):
        raise TypeError(f"orders must be a list of {num_steps} per-step orders, got {type(requested).__name__}")
    bad = [o for o in requested if isinstance(o, bool) or not isinstance(o, (int, np.integer))]
    if bad:
        raise TypeError(f"orders must be whole numbers (one solver order per step), got {bad[0]!r} in {list(requested)!r}")
    orders = [int(o) for o in requested]
    if len(orders) != num_steps:
        raise ValueError(f"orders lists {len(orders)} per-step orders for {num_steps} steps; give one per step")
    for i, o in enumerate(orders):
        if not 1 <= o <= min(order, i + 1):
            raise ValueError(
                f"orders[{i}] = {o}: step {i} can use order 1 to {min(order, i + 1)} "
                f"(at most the solver's order {order}, and only {i + 1} predictions exist by then)"
            )
    if last_step_to_data and orders[-1] != 1:
        raise ValueError("the last step lands on clean data (lambda = inf), where only order 1 is defined: set orders[-1] = 1")
    return orders


@dataclass(frozen=True)
class LinearStep:
    """``x_next = c_x x + sum_j w_d[j] D_{i-j} + sum_j w_eps[j] eps_{i-j} + c_z z`` where ``D`` are
    data predictions, ``eps = (x - alpha D) / sigma`` the matching noise predictions and ``z``
    fresh standard normal noise."""

    c_x: float
    w_d: tuple[float, ...] = ()
    w_eps: tuple[float, ...] = ()
    c_z: float = 0.0


def linear_multistep_routine(
    pts: Sequence[Point], steps: Sequence[LinearStep], renoise_uncond: bool = False
) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """The routine of a linear multistep method: one evaluation at ``pts[i]`` per step, then
    ``steps[i]`` over the history of data (and, if any step needs them, noise) predictions.

    ``renoise_uncond`` (CFG++, Chung et al. 2024): each evaluation also returns the unconditional
    prediction ``D_u``, and the state ``x = alpha D_u + sigma eps_u`` is moved to
    ``alpha D + sigma eps_u`` -- the guided data point re-noised with the *unconditional* noise --
    before the step, i.e. ``x + alpha (D - D_u)``.  For a step whose state coefficient is
    ``sigma_t / sigma_s`` (DDIM, DPM-Solver++) that is the paper's update.  The older history
    entries are the *unconditional* predictions: the CFG++ authors' DPM-Solver++(2M)
    (CFGpp-diffusion/CFGpp, ``latent_sdxl.py``, ``DPMpp2mCFGppSolver``) builds its difference
    ``D1`` from the current guided prediction and the previous unconditional one."""
    depth = max(max(len(s.w_d), len(s.w_eps)) for s in steps)
    need_eps = any(s.w_eps for s in steps)

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        hist_d: list[torch.Tensor] = []
        hist_u: list[torch.Tensor] = []
        hist_eps: list[torch.Tensor] = []
        for i, st in enumerate(steps):
            p = pts[i]
            if renoise_uncond:
                x, d, d_u = yield Eval(x, p.t, uncond=True)
                x = combine(x, 1.0, [(p.alpha, d), (-p.alpha, d_u)])
                hist_d = [d, *hist_u[: depth - 1]]
                hist_u = [d_u, *hist_u[: depth - 1]]
            else:
                x, d = yield Eval(x, p.t)
                hist_d = [d, *hist_d[: depth - 1]]
            if need_eps:
                hist_eps = [from_x0("epsilon", d, x, p.alpha, p.sigma), *hist_eps[: depth - 1]]
            x = combine(x, st.c_x, [*zip(st.w_d, hist_d), *zip(st.w_eps, hist_eps)])
            if st.c_z:
                x.add_(noise.interval(x, p, pts[i + 1]), alpha=st.c_z)
        return x

    return routine


@dataclass(frozen=True)
class Stage:
    """One evaluation inside a single step: at time ``t``, state ``c_x x + sum_j w[j] D_j +
    sum_k z[k] Z_k`` over the data predictions ``D_0 .. D_{k-1}`` of the earlier stages of the same
    step and the step's noise draws ``Z_k`` (:class:`Interval`)."""

    t: float
    c_x: float = 1.0
    w: tuple[float, ...] = ()
    z: tuple[float, ...] = ()


@dataclass(frozen=True)
class Interval:
    """A single step of an explicit Runge-Kutta-type method in linear form: its stages, then
    ``x_next = c_x x + sum_j w[j] D_j + sum_k z[k] Z_k``.

    Stochastic steps draw one standard normal ``Z_k`` per entry of ``noises`` (a pair of points: the
    Brownian interval it belongs to, see :meth:`fewstep.samplers.core.NoiseSource.interval`) at the
    start of the step, in that order; ``lift = (c, weights)`` replaces ``x`` by
    ``c x + sum_k weights[k] Z_k`` before the first stage (EDM's churn, which raises the noise level
    before the step)."""

    stages: tuple[Stage, ...]
    c_x: float
    w: tuple[float, ...]
    z: tuple[float, ...] = ()
    noises: tuple[tuple[Point, Point], ...] = ()
    lift: tuple[float, tuple[float, ...]] | None = None


def runge_kutta_routine(intervals: Sequence[Interval]) -> Callable[[torch.Tensor, NoiseSource], Routine]:
    """The routine of a singlestep (Runge-Kutta-type) method: every stage is one evaluation."""

    def routine(x: torch.Tensor, noise: NoiseSource) -> Routine:
        for iv in intervals:
            zs = [noise.interval(x, a, b) for a, b in iv.noises]
            if iv.lift is not None:
                x = combine(x, iv.lift[0], list(zip(iv.lift[1], zs)))
            ds: list[torch.Tensor] = []
            for st in iv.stages:
                fresh = not st.w and not st.z
                u = x if fresh else combine(x, st.c_x, [*zip(st.w, ds), *zip(st.z, zs)])
                u_seen, d = yield Eval(u, st.t)
                if fresh:
                    x = u_seen  # the caller may hand back a changed state (diffusers' inpainting)
                ds.append(d)
            x = combine(x, iv.c_x, [*zip(iv.w, ds), *zip(iv.z, zs)])
        return x

    return routine


def ancestral_split(s: Point, t: Point, eta: float) -> tuple[float, float]:
    """k-diffusion's ancestral step (``get_ancestral_step``) from ``s`` to ``t`` in the EDM form
    ``rho = sigma / alpha``: ``rho_up = min(rho_t, eta rho_t sqrt(1 - rho_t^2 / rho_s^2))`` and
    ``rho_down = sqrt(rho_t^2 - rho_up^2)``; the deterministic part of the step goes to ``rho_down``
    and fresh noise ``rho_up`` brings it to ``rho_t`` (for ``eta = 1`` the DDPM posterior's variance,
    Ho et al. 2020).  Returned as the fractions ``(rho_down / rho_t, rho_up / rho_t)``, finite at a
    zero-SNR start (``rho_s = inf``) and at clean data (``rho_t = 0``, where both are irrelevant)."""
    if math.isinf(t.lam):  # onto clean data: no noise, the step goes all the way
        return 0.0, 0.0
    q = math.exp(s.lam - t.lam) if math.isfinite(s.lam) else 0.0  # rho_t / rho_s
    up = min(1.0, eta * math.sqrt(max(1.0 - q * q, 0.0)))
    return math.sqrt(max(1.0 - up * up, 0.0)), up


def down_point(t: Point, down: float) -> Point:
    """The point ``(alpha_t, down * sigma_t)`` an ancestral step goes to before its noise: the EDM
    noise level ``down * rho_t`` scaled by ``alpha_t`` (a pseudo-point with consistent ``lambda``; it
    is never evaluated, so its time is ``t``'s)."""
    return Point(t.t, t.alpha, down * t.sigma, t.lam - math.log(down) if down > 0 else math.inf, down * t.ksigma)


def ancestral(s: Point, t: Point, eta: float, s_noise: float, step: Callable[[Point, Point], Interval]) -> Interval:
    """An ancestral step (k-diffusion's ``sample_*_ancestral``): ``step`` from ``s`` to the down
    point of :func:`ancestral_split`, then ``s_noise`` times fresh noise of the Brownian interval
    ``(s, t)`` scaled to ``alpha_t rho_up = up * sigma_t``."""
    down, up = ancestral_split(s, t, eta)
    iv = step(s, down_point(t, down))
    coef = s_noise * up * t.sigma
    if coef == 0.0:
        return iv
    z = (*iv.z, *([0.0] * (len(iv.noises) - len(iv.z))), coef)
    return Interval(iv.stages, iv.c_x, iv.w, z=z, noises=(*iv.noises, (s, t)), lift=iv.lift)


def churn_gamma(s_churn: float, num_steps: int, rho: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): the noise level of a step is
    first raised by ``gamma = min(S_churn / N, sqrt(2) - 1)`` when ``S_tmin <= rho <= S_tmax``
    (``N`` the number of steps, k-diffusion's ``len(sigmas) - 1``)."""
    if s_churn <= 0 or not s_tmin <= rho <= s_tmax:
        return 0.0
    return min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
