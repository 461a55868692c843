"""Accuracy per NFE of every registered ODE sampler against diffusers' and k-diffusion's, on the
exact Gaussian mixture of the 8x8 digits (DDPM's linear schedule, 1000 steps).

Every sampler starts from the same noise and is compared with the exact probability-flow ODE
solution from that noise (scipy, tolerance 1e-9): RMSE over all samples and dimensions, and the
Fréchet distance to the exact-ODE samples.  Three groups of rows, measured in the same run:

* ``fewstep``: every deterministic diffusion sampler of the registry with its defaults (the CFG++
  samplers are left out: without a guided model they are their base samplers); ``dc_unipc_*``
  with ratios fitted per NFE by ``fit_dc_ratios`` on 16 other trajectories against the model's own
  many-step trajectory;
* ``peer``: diffusers' DDIM, DPM-Solver++ 2M/3M (also with ``use_lu_lambdas``, log-SNR spacing),
  DEIS and UniPC schedulers with their default settings (``clip_sample=False``: the exact ODE has
  no clipping), and k-diffusion's DPM++ 2M, Heun and LMS on Karras sigmas;
* ``same``: the fewstep sampler that implements the peer's algorithm, on the peer's exact grid and
  options; its error divided by the peer's must be 1.00.

A second study, in the same run, is the exact mixture in **flow-matching** form (rectified flow,
``alpha = 1 - t``, ``sigma = t``, SD3's shift 3; the exact ODE in flow time from ``t = 1``):

* ``fewstep``: every deterministic registry sampler on its default grid (``shifted``), the
  DC-Solver with fitted ratios, and a tuned plan per NFE (``fewstep.samplers.tune`` with
  ``unipc_3`` and ``dpmpp_3m`` as bases on 256 other noises, the one with the lower validation
  error reported);
* ``peer``: diffusers' ``FlowMatchEulerDiscreteScheduler`` (its default shifted sigmas, and
  Karras / exponential / beta sigmas), ``FlowMatchHeunDiscreteScheduler`` (odd NFE: ``n`` steps cost
  ``2n - 1``), ``DPMSolverMultistepScheduler`` 2M / 3M and ``UniPCMultistepScheduler`` 2 / 3 with
  ``use_flow_sigmas=True``; the network is the exact velocity fed as each scheduler feeds it
  (DPM-Solver / UniPC give it ``int(1000 sigma)``);
* ``same``: fewstep's sampler on the peer's grid.

Issue 15 adds three studies in the same run:

* ``spacing``: the samplers k-diffusion / ComfyUI users know (and fewstep's multistep ones) on every
  new spacing that applies to the model (k-diffusion's and ComfyUI's), RMSE as above; the summary
  says which new combination is best per NFE and its ratio to the best peer;
* ``sd15``: the published step tables (Align Your Steps SD 1.5 / SDXL, GITS SD 1.5) on the same
  mixture under Stable Diffusion's schedule (scaled-linear betas 0.00085 to 0.012, the sigma range
  the tables are for; the data are digits, not SD latents), against karras and the default grid;
* ``stochastic``: the SDE / ancestral samplers, fewstep's on their default grid and on karras and
  k-diffusion's own on karras sigmas, by Fréchet distance to exact data samples (10000 of them; the
  floor is an independent exact set of the same size as the samples), mean and spread over three
  noise seeds (a stochastic sampler has no ODE solution to compare with).

Usage:  python benchmarks/sampler_accuracy.py [--num-samples 1000] [--nfe 4,5,6,8,10,15,20,30,50]
        [--flow-nfe 4,5,6,8,10] [--no-vp] [--no-flow] [--no-plans] [--only-new]
        [--png benchmarks/sampler_accuracy.png] [--json PATH]
Prints one table per study (cells ``RMSE / FD``) and, per NFE, the best fewstep sampler, the best
peer and the ratio of their RMSEs (below 1: fewstep ahead); then the issue-15 studies.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

import fewstep
from fewstep.eval.exact import ExactStudy
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.samplers.core import run_program
from fewstep.samplers.dc_solver import fit_dc_ratios

NFES = (4, 5, 6, 8, 10, 15, 20, 30, 50)
FLOW_NFES = (4, 5, 6, 8, 10)
FLOW_SHIFT = 3.0  # SD3's


@dataclass
class Row:
    group: str  # fewstep, peer, same
    name: str
    nfe: int
    rmse: float
    fd: float
    note: str = ""


def _errors(study: ExactStudy, out: torch.Tensor) -> tuple[float, float]:
    out = out.to(torch.float64)
    if not bool(torch.isfinite(out).all()):
        return math.inf, math.inf
    return float(torch.sqrt(torch.mean((out - study.reference) ** 2))), frechet_distance_from_features(out, study.reference)


# --- peers ----------------------------------------------------------------------------------------


def _eps_network(study: ExactStudy) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact model as the noise-prediction network a diffusers scheduler expects."""
    den = study.model.denoiser(study.schedule)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = study.schedule.alpha_sigma(float(t))
        return (x - a * den(x, float(t))) / s

    return eps


def _diffusers(study: ExactStudy, sch, nfe: int) -> tuple[torch.Tensor, list[float]]:
    eps = _eps_network(study)
    sch.set_timesteps(nfe)
    x = study.noise.clone()
    for t in sch.timesteps:
        x = sch.step(eps(x, t), t, x).prev_sample
    return x, sch.timesteps.double().tolist()


def _k_diffusion(study: ExactStudy, sampler: str, steps: int, noise: torch.Tensor | None = None,
                 **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """A k-diffusion sampler on Karras sigmas spanning the schedule, in k-diffusion's variable
    ``x / alpha`` (sigma = rho = sigma/alpha), from our noise (or ``noise``)."""
    import k_diffusion.sampling as kd

    sch = study.schedule
    rho_min, rho_max = sch.sigma(sch.t_min) / sch.alpha(sch.t_min), sch.sigma(sch.t_max) / sch.alpha(sch.t_max)
    sigmas = kd.get_sigmas_karras(steps, rho_min, rho_max, rho=7.0).double()

    def ve(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return study.model.posterior_mean(x, 1.0, float(sigma.flatten()[0]))

    x = (study.noise if noise is None else noise) / sch.alpha(sch.t_max)  # our x_T in x / alpha
    return getattr(kd, f"sample_{sampler}")(ve, x, sigmas, disable=True, **kw), sigmas


def _times_of_sigmas(study: ExactStudy, sigmas: torch.Tensor) -> list[float]:
    sch = study.schedule
    return [float(sch.t_from_lambda(-math.log(float(s)))) if s > 0 else sch.t_zero for s in sigmas]


def peer_rows(study: ExactStudy, nfe: int, config: dict | None = None) -> list[Row]:
    """Every peer at this NFE, and the fewstep sampler with identical settings next to it
    (``config``: the diffusers schedule keys of the study's schedule; default DDPM's linear one)."""
    config = config or {}
    den = study.model.denoiser(study.schedule)
    rows = []

    def pair(name: str, out: torch.Tensor, ours: str, grid: list[float], note: str = "", **opts) -> None:
        rows.append(Row("peer", name, nfe, *_errors(study, out), note))
        mine = fewstep.sample(den, study.noise, ours, nfe, spacing=grid, **opts)
        rows.append(Row("same", f"{ours} on {name}'s grid", nfe, *_errors(study, mine)))

    cases = [
        ("diffusers DDIM", DDIMScheduler(clip_sample=False, **config), "ddim", {}, -1.0),
        ("diffusers DPM++ 2M", DPMSolverMultistepScheduler(solver_order=2, **config), "dpmpp_2m", {}, -1.0),
        ("diffusers DPM++ 3M", DPMSolverMultistepScheduler(solver_order=3, **config), "dpmpp_3m", {"d2_weight": 0.5}, -1.0),
        ("diffusers DEIS", DEISMultistepScheduler(**config), "deis_2", {"basis": "log_rho"}, 0.0),  # order 2; ends at timestep 0
        ("diffusers UniPC", UniPCMultistepScheduler(**config), "unipc_2", {"lower_order_final": math.inf}, -1.0),  # its final-order rule
    ]
    for name, sch, ours, opts, end in cases:
        out, ts = _diffusers(study, sch, nfe)
        pair(name, out, ours, ts + [end], **opts)
    # log-SNR spacing: diffusers computes with the lambda-uniform sigmas but feeds the network the
    # rounded timestep, so no fewstep setting is identical; our dpmpp_* with spacing="logsnr" is listed.
    for order in (2, 3):
        out, _ = _diffusers(study, DPMSolverMultistepScheduler(solver_order=order, use_lu_lambdas=True, **config), nfe)
        rows.append(Row("peer", f"diffusers DPM++ {order}M logSNR", nfe, *_errors(study, out), "network sees rounded timesteps"))
    for name, ours, opts in (("dpmpp_2m", "dpmpp_2m", {}), ("lms", "hb_plms", {"beta": 1.0, "plms_order": 4, "denoise_final": False})):
        out, sigmas = _k_diffusion(study, name, nfe)
        pair(f"k-diffusion {name}", out, ours, _times_of_sigmas(study, sigmas), **opts)
    out, sigmas = _k_diffusion(study, "euler", nfe)
    pair("k-diffusion euler", out, "euler", _times_of_sigmas(study, sigmas))
    if nfe % 2 == 1:  # k-diffusion's Heun / DPM-2 to sigma = 0 cost 2n - 1 evaluations
        for name in ("heun", "dpm_2"):
            out, sigmas = _k_diffusion(study, name, (nfe + 1) // 2)
            pair(f"k-diffusion {name}", out, name, _times_of_sigmas(study, sigmas))
    return rows


# --- issue 15: samplers x spacings, published tables, stochastic samplers -------------------------

KNOWN = ["euler", "heun", "dpm_2", "lms", "ipndm", "ipndm_v", "res_multistep", "gradient_estimation", "dpmpp_2m",
         "dpmpp_3m", "unipc_3"]
NEW_SAMPLERS = {"dpm_2", "lms", "ipndm", "ipndm_v", "res_multistep", "gradient_estimation"}
NEW_SPACINGS = ["karras", "exponential", "kl_optimal", "simple", "normal", "sgm_uniform", "ddim_uniform", "beta",
                "linear_quadratic"]


def spacing_rows(study: ExactStudy, nfe: int, spacings: list[str], group: str) -> list[Row]:
    """Every known sampler on every spacing (and its default grid); spacings a sampler or budget
    cannot use here (ComfyUI's ddim_uniform and beta merge or add steps at some counts) are left out."""
    den = study.model.denoiser(study.schedule)
    rows = []
    for name in KNOWN:
        for sp in [None, *spacings]:
            try:
                out = fewstep.sample(den, study.noise, name, nfe, spacing=sp)
            except ValueError:
                continue
            rows.append(Row(group, f"{name} + {sp or 'default'}", nfe, *_errors(study, out)))
    return rows


STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde",
              "res_multistep_ancestral", "er_sde"]
K_STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
SEEDS = (11, 12, 13)
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass
class FDRow:
    group: str  # fewstep, k-diffusion
    name: str
    nfe: int
    fd: list[float]  # one per seed
    note: str = ""


def stochastic_rows(study: ExactStudy, nfe: int, data: torch.Tensor) -> list[FDRow]:
    """FD to exact data samples of every stochastic sampler, three noise seeds each.  k-diffusion's
    samplers run on Karras sigmas with their own noise (torch's global generator, seeded; a seeded
    Brownian tree for its SDE samplers); two-evaluation ones take ``n = (nfe + 1) // 2`` steps,
    ``2n - 1 <= nfe`` evaluations, fewstep's use exactly ``nfe``."""
    import k_diffusion.sampling as kd

    den = study.model.denoiser(study.schedule)
    rows = []
    for name in STOCHASTIC:
        for sp in (None, "karras"):
            fds = []
            for seed in SEEDS:
                noise = torch.randn(study.noise.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                out = fewstep.sample(den, noise, name, nfe, spacing=sp, generator=torch.Generator().manual_seed(seed + 100))
                fds.append(frechet_distance_from_features(out, data) if bool(torch.isfinite(out).all()) else math.inf)
            rows.append(FDRow("fewstep", f"{name} + {sp or 'default'}", nfe, fds))
    for name in K_STOCHASTIC:
        two = fewstep.spec(name).evals_per_step == 2
        steps = (nfe + 1) // 2 if two else nfe
        fds = []
        for seed in SEEDS:
            noise = torch.randn(study.noise.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            kw = {}
            torch.manual_seed(seed + 100)
            if name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"):
                sch = study.schedule
                lo, hi = sch.sigma(sch.t_min) / sch.alpha(sch.t_min), sch.sigma(sch.t_max) / sch.alpha(sch.t_max)
                ns = kd.BrownianTreeNoiseSampler(noise, lo * (1 - 1e-6), hi * (1 + 1e-6), seed=seed + 100)
                kw["noise_sampler"] = ns
            out, _ = _k_diffusion(study, name, steps, noise=noise, **kw)
            fds.append(frechet_distance_from_features(out, data) if bool(torch.isfinite(out).all()) else math.inf)
        rows.append(FDRow("k-diffusion", f"k-diffusion {name} (karras)", nfe, fds, f"{2 * steps - 1 if two else steps} NFE"))
    return rows


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _spread(v: list[float]) -> float:
    return max(v) - min(v)


def fd_table(rows: list[FDRow], nfes: tuple[int, ...]) -> str:
    by = {(r.name, r.nfe): r for r in rows}
    names = list(dict.fromkeys(r.name for r in rows))
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for n in names:
        cells = []
        for k in nfes:
            r = by.get((n, k))
            cells.append("–" if r is None else f"{_mean(r.fd):.3g} ± {_spread(r.fd) / 2:.2g}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fd_summary(rows: list[FDRow], nfes: tuple[int, ...], floor: float) -> str:
    lines = [f"| NFE | best fewstep | FD (mean of 3 seeds; range) | best k-diffusion | FD | ratio | seed range overlaps |",
             "|---:|---|---:|---|---:|---:|---|"]
    for n in nfes:
        ours = [r for r in rows if r.group == "fewstep" and r.nfe == n]
        peers = [r for r in rows if r.group == "k-diffusion" and r.nfe == n]
        a, b = min(ours, key=lambda r: _mean(r.fd)), min(peers, key=lambda r: _mean(r.fd))
        overlap = max(a.fd) >= min(b.fd)
        lines.append(f"| {n} | {a.name} | {_mean(a.fd):.3g} ({min(a.fd):.3g}-{max(a.fd):.3g}) | {b.name} | "
                     f"{_mean(b.fd):.3g} ({min(b.fd):.3g}-{max(b.fd):.3g}) | {_mean(a.fd) / _mean(b.fd):.2f} | {'yes' if overlap else 'no'} |")
    return "\n".join(lines) + f"\n\nFD floor (an independent exact sample of the same size): {floor:.3g}"


def new_summary(rows: list[Row], nfes: tuple[int, ...], group: str) -> str:
    """Per NFE: the best combination with a new sampler or a new spacing, the best peer, the ratio."""
    lines = ["| NFE | best new combination | RMSE | best peer | RMSE | ratio |", "|---:|---|---:|---|---:|---:|"]
    for n in nfes:
        new = [r for r in rows if r.group == group and r.nfe == n and math.isfinite(r.rmse)
               and (r.name.split(" + ")[0] in NEW_SAMPLERS or r.name.split(" + ")[1] not in ("default", "karras"))]
        peers = [r for r in rows if r.group == "peer" and r.nfe == n and math.isfinite(r.rmse)]
        if not new or not peers:
            continue
        a, b = min(new, key=lambda r: r.rmse), min(peers, key=lambda r: r.rmse)
        lines.append(f"| {n} | {a.name} | {a.rmse:.4f} | {b.name} | {b.rmse:.4f} | {a.rmse / b.rmse:.2f} |")
    return "\n".join(lines)


# --- fewstep ----------------------------------------------------------------------------------------


def fewstep_names() -> list[str]:
    return [
        n for n in fewstep.available(model_kind="diffusion")
        if not fewstep.spec(n).stochastic and "uncond" not in fewstep.spec(n).needs
    ]


def fewstep_rows(study: ExactStudy, nfe: int, fit_noise: torch.Tensor, names: list[str] | None = None) -> list[Row]:
    """Every deterministic registry sampler (or ``names``) with its defaults on ``study``."""
    den = study.model.denoiser(study.schedule)
    rows = []
    for name in fewstep_names() if names is None else names:
        opts: dict = {}
        note = ""
        if fewstep.spec(name).family == "dc_solver":
            opts = fit_dc_ratios(den, fit_noise, name, nfe)
            note = "ratios fitted on 16 other trajectories"
        try:
            out = fewstep.sample(den, study.noise, name, nfe, **opts)
        except ValueError as err:
            rows.append(Row("fewstep", name, nfe, math.nan, math.nan, str(err)))
            continue
        rows.append(Row("fewstep", name, nfe, *_errors(study, out), note))
    return rows


# --- the flow-matching study ------------------------------------------------------------------------------


def flow_study(num_samples: int) -> ExactStudy:
    from fewstep.schedules import FlowMatching

    return ExactStudy.make(schedule=FlowMatching(shift=FLOW_SHIFT), num_samples=num_samples, seed=0)


def _flow_diffusers(study: ExactStudy, sch, nfe: int) -> tuple[torch.Tensor, list[float]]:
    """A diffusers flow scheduler's loop with the exact velocity, fed the timesteps it hands out."""
    from fewstep.models.mixture import MixtureVelocity

    net = MixtureVelocity(study.model)
    sch.set_timesteps(nfe)
    x = study.noise * float(sch.sigmas[0])
    for t in sch.timesteps:
        x = sch.step(net(x, t), t, x).prev_sample
    return x, torch.unique_consecutive(sch.sigmas.double()).tolist()


def flow_peer_rows(study: ExactStudy, nfe: int) -> list[Row]:
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    den = study.model.denoiser(study.schedule)
    rows: list[Row] = []

    def pair(name: str, out: torch.Tensor, ours: str | None, grid: list[float], x_start: torch.Tensor, note: str = "", **opts) -> None:
        rows.append(Row("peer", name, nfe, *_errors(study, out), note))
        if ours is not None:
            program = fewstep.samplers.prepare(ours, nfe, study.schedule, spacing=grid, **opts)
            mine, _ = run_program(program, den, x_start)
            rows.append(Row("same", f"{ours} on {name}'s grid", nfe, *_errors(study, mine)))

    euler = {"": {}, " Karras": {"use_karras_sigmas": True}, " exponential": {"use_exponential_sigmas": True},
             " beta": {"use_beta_sigmas": True}}
    for label, kw in euler.items():
        out, grid = _flow_diffusers(study, FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT, **kw), nfe)
        pair(f"diffusers FlowMatchEuler{label}", out, "euler", grid, study.noise * grid[0])
    if nfe % 2 == 1:
        out, grid = _flow_diffusers(study, FlowMatchHeunDiscreteScheduler(shift=FLOW_SHIFT), (nfe + 1) // 2)
        # diffusers' Heun steps in flow time; fewstep's heun in sigma / alpha (EDM's ODE): no identical setting
        rows.append(Row("peer", "diffusers FlowMatchHeun", nfe, *_errors(study, out), "Heun in flow time"))
    for cls, ours in ((DPMSolverMultistepScheduler, "dpmpp"), (UniPCMultistepScheduler, "unipc")):
        for order in (2, 3):
            sch = cls(solver_order=order, use_flow_sigmas=True, flow_shift=FLOW_SHIFT, prediction_type="flow_prediction")
            out, grid = _flow_diffusers(study, sch, nfe)
            name = f"diffusers {cls.__name__.removesuffix('MultistepScheduler')} {order} flow sigmas"
            opts = {"d2_weight": 0.5} if ours == "dpmpp" and order == 3 else {}
            sampler = f"dpmpp_{order}m" if ours == "dpmpp" else f"unipc_{order}"
            pair(name, out, sampler, grid, study.noise * grid[0], "network sees int(1000 sigma)", **opts)
    return rows


def flow_fewstep_rows(study: ExactStudy, nfe: int, fit_noise: torch.Tensor, plans: bool) -> list[Row]:
    names = [n for n in fewstep_names() if fewstep.spec(n).family != "time_shift"]  # time shift re-times VP samples
    rows = fewstep_rows(study, nfe, fit_noise, names)
    den = study.model.denoiser(study.schedule)
    if plans:
        from fewstep.samplers.tuning import tune

        best = None
        for base in ("unipc_3", "dpmpp_3m"):
            plan = tune(den, study.schedule, base, nfe, num_trajectories=256, generator=torch.Generator().manual_seed(1000 + nfe),
                        shape=(study.model.dim,), dtype=torch.float64)
            if best is None or plan.meta["validation_rmse"] < best.meta["validation_rmse"]:
                best = plan
        out = fewstep.sample(den, study.noise, plan=best)
        rows.append(Row("fewstep", "tuned plan", nfe, *_errors(study, out), f"base {best.sampler}, 256 tuning noises"))
    return rows


# --- output -------------------------------------------------------------------------------------------


def _cell(r: Row | None) -> str:
    if r is None or math.isnan(r.rmse):
        return "–"
    if math.isinf(r.rmse):
        return "inf"
    return f"{r.rmse:.3g} / {r.fd:.3g}"


def table(rows: list[Row], nfes: tuple[int, ...]) -> str:
    by = {(r.group, r.name, r.nfe): r for r in rows}
    names = list(dict.fromkeys((r.group, r.name) for r in rows))
    lines = ["| group | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    for g, n in names:
        lines.append(f"| {g} | {n} | " + " | ".join(_cell(by.get((g, n, k))) for k in nfes) + " |")
    return "\n".join(lines)


def summary(rows: list[Row], nfes: tuple[int, ...]) -> str:
    lines = ["| NFE | best fewstep | RMSE | best peer | RMSE | ratio | same-settings ratio (max deviation from 1) |",
             "|---:|---|---:|---|---:|---:|---:|"]
    for n in nfes:
        ours = [r for r in rows if r.group == "fewstep" and r.nfe == n and math.isfinite(r.rmse)]
        peers = [r for r in rows if r.group == "peer" and r.nfe == n and math.isfinite(r.rmse)]
        b_ours, b_peer = min(ours, key=lambda r: r.rmse), min(peers, key=lambda r: r.rmse)
        same = {r.name.split(" on ")[1].removesuffix("'s grid"): r for r in rows if r.group == "same" and r.nfe == n}
        dev = max((abs(same[p.name].rmse / p.rmse - 1) for p in peers if p.name in same), default=math.nan)
        lines.append(f"| {n} | {b_ours.name} | {b_ours.rmse:.4f} | {b_peer.name} | {b_peer.rmse:.4f} | "
                     f"{b_ours.rmse / b_peer.rmse:.2f} | {dev:.1e} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys((r.group, r.name) for r in rows if r.group != "same"))
    colors = [*matplotlib.colormaps["tab20"].colors, *matplotlib.colormaps["tab20b"].colors]
    nfes = sorted({r.nfe for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.5))
    for ax, key, title in ((axes[0], "rmse", "RMSE to the exact ODE solution"), (axes[1], "fd", "Fréchet distance to exact-ODE samples")):
        for k, (g, name) in enumerate(series):
            pts = [(r.nfe, getattr(r, key)) for r in rows if (r.group, r.name) == (g, name) and math.isfinite(getattr(r, key))]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o" if g == "fewstep" else "s", ms=3, lw=1, color=colors[k % len(colors)],
                        ls="-" if g == "fewstep" else "--", label=name if g == "fewstep" else f"{name} (peer)")
        if key == "fd":
            ax.axhline(floor, color="gray", lw=1, ls=":", label="exact-ODE samples vs independent data")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=title)
        ax.set_xticks(nfes, [str(n) for n in nfes])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(title: str, rows: list[Row], nfes: tuple[int, ...]) -> None:
    print(f"\n## {title}\n")
    print(table(rows, nfes))
    print()
    print(summary(rows, nfes))
    notes = sorted({f"{r.name}: {r.note}" for r in rows if r.note})
    if notes:
        print("\n" + "\n".join(notes))


def _issue15_report(rows: list[Row], sd_rows: list[Row], fd_rows: list[FDRow], nfes: tuple[int, ...], fd_floor: float) -> None:
    print("\n## Issue 15: known samplers on every spacing (RMSE / FD; DDPM linear schedule)\n")
    print(table(rows, nfes))
    print()
    print(new_summary(rows, nfes, "spacing"))
    print("\n## Issue 15: published step tables on Stable Diffusion's schedule (same mixture)\n")
    print(table(sd_rows, nfes))
    print()
    print(new_summary(sd_rows, nfes, "sd15"))
    print("\n## Issue 15: stochastic samplers, FD to 10000 exact data samples (mean ± half the range over 3 seeds)\n")
    print(fd_table(fd_rows, nfes))
    print()
    print(fd_summary(fd_rows, nfes, fd_floor))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--flow-nfe", default=",".join(map(str, FLOW_NFES)))
    p.add_argument("--no-vp", action="store_true", help="skip the VP (DDPM schedule) studies")
    p.add_argument("--no-flow", action="store_true", help="skip the flow-matching study")
    p.add_argument("--no-plans", action="store_true", help="skip the tuned plans of the flow study")
    p.add_argument("--only-new", action="store_true", help="of the VP studies, only the issue-15 ones (and the peers they compare with)")
    p.add_argument("--png", default="benchmarks/sampler_accuracy.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    nfes = tuple(int(v) for v in args.nfe.split(","))
    flow_nfes = tuple(int(v) for v in args.flow_nfe.split(","))
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # small tensors: threads only add contention on a shared machine
    rows: list[Row] = []
    sd_rows: list[Row] = []
    fd_rows: list[FDRow] = []
    flow_rows: list[Row] = []
    fit_noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    if not args.no_vp:
        from fewstep.schedules import VPDiscrete, diffusers_betas

        study = ExactStudy.make(num_samples=args.num_samples, seed=0)
        sd = ExactStudy.make(schedule=VPDiscrete.from_betas(diffusers_betas(**SD_CONFIG)),
                             num_samples=args.num_samples, seed=0)
        data = study.model.sample(10000, generator=torch.Generator().manual_seed(99))
        fd_floor = frechet_distance_from_features(study.model.sample(args.num_samples, generator=torch.Generator().manual_seed(98)), data)
        for n in nfes:
            if not args.only_new:
                rows += fewstep_rows(study, n, fit_noise)
            rows += peer_rows(study, n) + spacing_rows(study, n, NEW_SPACINGS, "spacing")
            sd_rows += spacing_rows(sd, n, ["karras", "ays_sd15", "ays_sdxl", "gits_sd15"], "sd15") + [
                r for r in peer_rows(sd, n, SD_CONFIG) if r.group == "peer"]
            fd_rows += stochastic_rows(study, n, data)
            print(f"VP NFE {n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        base = [r for r in rows if r.group != "spacing"]
        if args.only_new:
            print()
            print(table(base, nfes))
        else:
            _report("VP (DDPM linear schedule)", base, nfes)
        _issue15_report([r for r in rows if r.group == "spacing"], sd_rows, fd_rows, nfes, fd_floor)
        plot(base, args.png, study.fd_floor)
        print(f"\nVP: {args.num_samples} samples, FD sampling floor {study.fd_floor:.3g}; wrote {args.png}")
    if not args.no_flow:
        fstudy = flow_study(args.num_samples)
        for n in flow_nfes:
            flow_rows += flow_fewstep_rows(fstudy, n, fit_noise, not args.no_plans) + flow_peer_rows(fstudy, n)
            print(f"flow NFE {n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        _report(f"flow matching (rectified flow, shift {FLOW_SHIFT})", flow_rows, flow_nfes)
        print(f"\nflow: {args.num_samples} samples, FD sampling floor {fstudy.fd_floor:.3g}")
    print(f"\n{time.perf_counter() - t0:.0f} s on {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"vp": [asdict(r) for r in rows], "sd15": [asdict(r) for r in sd_rows],
                       "fd": [asdict(r) for r in fd_rows], "flow": [asdict(r) for r in flow_rows]}, f, indent=1)


if __name__ == "__main__":
    main()
