"""A k-diffusion-shaped function API over the fewstep registry.

Code written against k-diffusion's ``k_diffusion.sampling`` (and ComfyUI-style wrappers, which call
the same functions) switches by changing one import::

    from fewstep import k_diffusion as K               # instead of: from k_diffusion import sampling as K
    sigmas = K.get_sigmas_karras(20, 0.0292, 14.61)
    x = K.sample_dpmpp_2m(model, noise * sigmas[0], sigmas, extra_args={"cond": c}, callback=cb)

``model(x, sigma * s_in, **extra_args)`` is a k-diffusion denoiser in sigma space (``x = x0 +
sigma * eps`` for VP models wrapped the k-diffusion way, the flow latent for flow models); it
becomes a fewstep denoiser on an EDM schedule whose grid is the given ``sigmas`` and the registry
sampler of the same name runs on it (:func:`fewstep.samplers.core.run_program`), so the numbers are
the registry's.  On the same sigmas and noise they are k-diffusion's (tests/test_k_samplers.py); the
options below that differ from fewstep's registry defaults are set to k-diffusion's here:

* multistep samplers (``dpmpp_2m_sde``, ``dpmpp_3m_sde``) never lower their final orders
  (``lower_order_final=False``), and ``dpmpp_3m_sde`` weights its second derivative as k-diffusion
  does (``d2_weight=0.5``, half the Taylor weight; the registry's default is the Taylor weight);
* ``lms`` integrates its last step onto ``sigma = 0`` at full order (``denoise_final=False``,
  k-diffusion 0.1.1; ComfyUI denoises there: pass ``denoise_final=True``);
* ``er_sde`` takes ComfyUI's 200-point Riemann sums for its integrals (``integration_points=200``).

``callback`` receives k-diffusion's dict once per step (``x``, ``i``, ``sigma``, ``sigma_hat``,
``denoised``, at the step's first evaluation).  Noise: a ``noise_sampler(sigma, sigma_next)`` is
used as given; without one, ``extra_args["seed"]`` seeds it as ComfyUI does (a generator seeded
``seed + 1`` on the CPU, ``seed`` elsewhere, for the ancestral samplers; a Brownian tree with that
seed for the SDE ones), and otherwise it is k-diffusion's: ``torch.randn_like`` (the global
generator) for the ancestral and churn noise and an unseeded Brownian tree for ``dpmpp_sde`` and
``dpmpp_2m/3m_sde``.  ``disable`` (a progress bar) is accepted and ignored.

Differences kept from k-diffusion (documented in the registry): a two-evaluation ancestral step
whose ``eta`` leaves no deterministic part is refused instead of turned into an Euler step;
k-diffusion 0.1.1 draws a churn noise at every step of Euler / Heun / DPM-2 even where ``S_churn``
does not apply, fewstep only where it does (ComfyUI's behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fewstep.samplers.brownian import BrownianTree
from fewstep.samplers.core import NoiseSource, Point, prepare, run_program
from fewstep.schedules import EDM, time_grid

__all__ = [
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp",
    "BrownianTreeNoiseSampler", "default_noise_sampler", "to_d", "get_ancestral_step", "append_zero",
]

_BROWNIAN_DEFAULT = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")
# k-diffusion's behaviour where fewstep's registry defaults differ
_K_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpmpp_2m_sde": {"lower_order_final": False},
    "dpmpp_3m_sde": {"lower_order_final": False, "d2_weight": 0.5},
    "lms": {"denoise_final": False},
    "er_sde": {"integration_points": 200},
}


# ---------------------------------------------------------------------------------------------
# sigma grids and helpers, as in k-diffusion (computed by fewstep.schedules.time_grid on EDM)
# ---------------------------------------------------------------------------------------------


def _sigmas(n: int, sigma_min: float, sigma_max: float, spacing: Any, device: Any) -> torch.Tensor:
    grid = time_grid(EDM(float(sigma_min), float(sigma_max)), int(n), spacing)
    return grid.to(dtype=torch.get_default_dtype(), device=device)


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu") -> torch.Tensor:
    """Karras et al. (2022) sigmas, then 0 (``spacing="karras"``)."""
    return _sigmas(n, sigma_min, sigma_max, {"name": "karras", "rho": rho}, device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: Any = "cpu") -> torch.Tensor:
    """Log-uniform sigmas, then 0 (``spacing="exponential"``)."""
    return _sigmas(n, sigma_min, sigma_max, "exponential", device)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: Any = "cpu") -> torch.Tensor:
    """Sigmas polynomial in log sigma, then 0 (``spacing="polyexponential"``)."""
    return _sigmas(n, sigma_min, sigma_max, {"name": "polyexponential", "rho": rho}, device)


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device: Any = "cpu") -> torch.Tensor:
    """The continuous VP-linear SDE's sigmas at uniform times, then 0 (``spacing="vp"``)."""
    t = torch.tensor([1.0, eps_s], dtype=torch.float64)
    lo, hi = torch.sqrt(torch.expm1(beta_d * t**2 / 2 + beta_min * t)).tolist()[::-1]
    return _sigmas(n, lo, hi, {"name": "vp", "beta_d": beta_d, "beta_min": beta_min, "eps_s": eps_s}, device)


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative ``(x - denoised) / sigma``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[Any, Any]:
    """``(sigma_down, sigma_up)`` of an ancestral step (fewstep.samplers._expint.ancestral_split)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


class BrownianTreeNoiseSampler:
    """k-diffusion's noise sampler on a Brownian tree: ``noise(sigma, sigma_next)`` is the
    normalised increment of one path over ``[transform(sigma_min), transform(sigma_max)]``."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: Any = None,
                 transform: Callable[[Any], Any] = lambda s: s, tol: float = 1e-6):
        self.transform = transform
        lo, hi = (float(transform(torch.as_tensor(v))) for v in (sigma_min, sigma_max))
        self.tree = BrownianTree(x, min(lo, hi), max(lo, hi), seed, tol)
        self._like = x

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        a, b = (float(self.transform(torch.as_tensor(v))) for v in (sigma, sigma_next))
        return self.tree(a, b).to(device=self._like.device, dtype=self._like.dtype)


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> Callable[[Any, Any], torch.Tensor]:
    """Fresh standard normal noise of ``x``'s shape: from the global generator (k-diffusion), or
    from one seeded as ComfyUI seeds it (``seed + 1`` on the CPU)."""
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    g = torch.Generator(device=x.device).manual_seed(seed + 1 if x.device.type == "cpu" else seed)
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=g)


# ---------------------------------------------------------------------------------------------
# the samplers
# ---------------------------------------------------------------------------------------------


class _SamplerNoise(NoiseSource):
    """A fewstep noise source calling a k-diffusion noise sampler ``f(sigma, sigma_next)``."""

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], like: torch.Tensor):
        super().__init__(None)
        self.fn, self._like = fn, like

    def interval(self, x: torch.Tensor, s: Point, t: Point) -> torch.Tensor:
        sig = [torch.as_tensor(v, dtype=self._like.dtype, device=self._like.device) for v in (s.ksigma, t.ksigma)]
        return self.fn(*sig).to(dtype=x.dtype, device=x.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:  # draws without an interval (none in these samplers)
        return torch.randn_like(x)


def _noise(name: str, x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: Any, seed: Any) -> NoiseSource:
    if noise_sampler is not None:
        return _SamplerNoise(noise_sampler, x)
    if name in _BROWNIAN_DEFAULT:
        positive = sigmas[sigmas > 0]
        tree = BrownianTreeNoiseSampler(x, float(positive.min()), float(sigmas.max()), seed=seed)
        return _SamplerNoise(tree, x)
    return _SamplerNoise(default_noise_sampler(x, seed), x)


def _edm_of(sigmas: torch.Tensor) -> EDM:
    """An EDM schedule spanning the given sigmas (``sigma_max`` the first, ``sigma_min`` the
    smallest positive one)."""
    positive = [float(v) for v in sigmas if float(v) > 0]
    hi, lo = max(positive), min(positive)
    return EDM(lo if lo < hi else hi / 2, hi)


def _run(name: str, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
         extra_args: Mapping[str, Any] | None, callback: Callable[[dict], Any] | None, options: dict[str, Any]) -> torch.Tensor:
    extra_args = {} if extra_args is None else dict(extra_args)
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor of decreasing noise levels, got shape {tuple(sigmas.shape)}")
    if len(sigmas) <= 1:
        return x
    noise_sampler = options.pop("noise_sampler", None)
    options = {**_K_DEFAULTS.get(name, {}), **options}
    grid = sigmas.detach().to("cpu", torch.float64)
    program = prepare(name, None, _edm_of(grid), steps=len(grid) - 1, spacing=grid, **options)
    starts, k = {}, 0
    for i, n in enumerate(program.evals_per_grid_step()):
        starts[k] = i
        k += n
    s_in = x.new_ones([x.shape[0]])

    def denoiser(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(xx, t.to(device=xx.device, dtype=xx.dtype) * s_in.to(xx.dtype), **extra_args)

    def per_eval(j: int, t: float, xx: torch.Tensor, x0: torch.Tensor) -> None:
        if j in starts:
            i = starts[j]
            callback({"x": xx, "i": i, "sigma": sigmas[i], "sigma_hat": torch.as_tensor(t, dtype=sigmas.dtype, device=sigmas.device),
                      "denoised": x0})

    work = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad():
        out, _ = run_program(
            program, denoiser, x.to(work), noise_source=_noise(name, x.to(work), sigmas, noise_sampler, extra_args.get("seed")),
            model_dtype=x.dtype, callback=per_eval if callback is not None else None,
        )
    return out.to(x.dtype)


def _make(name: str, doc: str) -> Callable[..., torch.Tensor]:
    def sampler(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping[str, Any] | None = None,
                callback: Callable[[dict], Any] | None = None, disable: Any = None, **options: Any) -> torch.Tensor:
        return _run(name, model, x, sigmas, extra_args, callback, options)

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = f"{doc} (fewstep registry sampler {name!r}; options: fewstep.samplers.spec({name!r}).options)."
    return sampler


_SAMPLERS = {
    "euler": "Euler steps, EDM's Algorithm 2 with churn (s_churn, s_tmin, s_tmax, s_noise)",
    "euler_ancestral": "Ancestral sampling with Euler steps (eta, s_noise, noise_sampler)",
    "heun": "Heun steps, EDM's Algorithm 2 with churn",
    "dpm_2": "DPM-Solver-2-inspired midpoint steps with churn",
    "dpm_2_ancestral": "Ancestral sampling with DPM-2 steps",
    "lms": "Linear multistep (order=4)",
    "dpmpp_2s_ancestral": "Ancestral sampling with DPM-Solver++(2S) steps",
    "dpmpp_sde": "DPM-Solver++ (stochastic), Brownian-tree noise by default (eta, s_noise, r)",
    "dpmpp_2m": "DPM-Solver++(2M)",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE (eta, s_noise, solver_type)",
    "dpmpp_3m_sde": "DPM-Solver++(3M) SDE (eta, s_noise)",
    "ipndm": "iPNDM (max_order)",
    "ipndm_v": "iPNDM with variable-step coefficients (max_order)",
    "res_multistep": "RES second-order multistep",
    "res_multistep_ancestral": "RES multistep, ancestral (eta, s_noise)",
    "gradient_estimation": "Gradient estimation (ge_gamma)",
    "er_sde": "ER-SDE-Solver-3 (s_noise, max_stage)",
}
for _name, _doc in _SAMPLERS.items():
    globals()[f"sample_{_name}"] = _make(_name, _doc)
    __all__.append(f"sample_{_name}")
# ComfyUI's names for the same samplers (its "_gpu" variants keep the Brownian tree on the GPU)
for _alias, _target in (("dpmpp_sde_gpu", "dpmpp_sde"), ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde"), ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde")):
    globals()[f"sample_{_alias}"] = globals()[f"sample_{_target}"]
    __all__.append(f"sample_{_alias}")


def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """DPM-Solver++(2M) SDE with the heun form of its derivative term (ComfyUI's name)."""
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, {"solver_type": "heun", **options})


__all__.append("sample_dpmpp_2m_sde_heun")
del _name, _doc, _alias, _target
