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

Usage:  python benchmarks/sampler_accuracy.py [--num-samples 1000] [--nfe 4,5,6,8,10,15,20]
        [--flow-nfe 4,5,6,8,10] [--no-vp] [--no-flow] [--no-plans]
        [--png benchmarks/sampler_accuracy.png] [--json PATH]
Prints one table per study (cells ``RMSE / FD``) and, per NFE, the best fewstep sampler, the best
peer and the ratio of their RMSEs (below 1: fewstep ahead).
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

NFES = (4, 5, 6, 8, 10, 15, 20)
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


def _k_diffusion(study: ExactStudy, sampler: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A k-diffusion sampler on Karras sigmas spanning the schedule, in k-diffusion's variable
    ``x / alpha`` (sigma = rho = sigma/alpha), from our noise."""
    import k_diffusion.sampling as kd

    sch = study.schedule
    rho_min, rho_max = sch.sigma(sch.t_min) / sch.alpha(sch.t_min), sch.sigma(sch.t_max) / sch.alpha(sch.t_max)
    sigmas = kd.get_sigmas_karras(steps, rho_min, rho_max, rho=7.0).double()

    def ve(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return study.model.posterior_mean(x, 1.0, float(sigma.flatten()[0]))

    x = study.noise / sch.alpha(sch.t_max)  # our x_T in x / alpha
    fn = {"dpmpp_2m": kd.sample_dpmpp_2m, "heun": kd.sample_heun, "lms": kd.sample_lms}[sampler]
    return fn(ve, x, sigmas, disable=True), sigmas


def _times_of_sigmas(study: ExactStudy, sigmas: torch.Tensor) -> list[float]:
    sch = study.schedule
    return [float(sch.t_from_lambda(-math.log(float(s)))) if s > 0 else sch.t_zero for s in sigmas]


def peer_rows(study: ExactStudy, nfe: int) -> list[Row]:
    """Every peer at this NFE, and the fewstep sampler with identical settings next to it."""
    den = study.model.denoiser(study.schedule)
    rows = []

    def pair(name: str, out: torch.Tensor, ours: str, grid: list[float], note: str = "", **opts) -> None:
        rows.append(Row("peer", name, nfe, *_errors(study, out), note))
        mine = fewstep.sample(den, study.noise, ours, nfe, spacing=grid, **opts)
        rows.append(Row("same", f"{ours} on {name}'s grid", nfe, *_errors(study, mine)))

    cases = [
        ("diffusers DDIM", DDIMScheduler(clip_sample=False), "ddim", {}, -1.0),
        ("diffusers DPM++ 2M", DPMSolverMultistepScheduler(solver_order=2), "dpmpp_2m", {}, -1.0),
        ("diffusers DPM++ 3M", DPMSolverMultistepScheduler(solver_order=3), "dpmpp_3m", {"d2_weight": 0.5}, -1.0),
        ("diffusers DEIS", DEISMultistepScheduler(), "deis_2", {"basis": "log_rho"}, 0.0),  # order 2; ends at timestep 0
        ("diffusers UniPC", UniPCMultistepScheduler(), "unipc_2", {"lower_order_final": math.inf}, -1.0),  # its final-order rule
    ]
    for name, sch, ours, opts, end in cases:
        out, ts = _diffusers(study, sch, nfe)
        pair(name, out, ours, ts + [end], **opts)
    # log-SNR spacing: diffusers computes with the lambda-uniform sigmas but feeds the network the
    # rounded timestep, so no fewstep setting is identical; our dpmpp_* with spacing="logsnr" is listed.
    for order in (2, 3):
        out, _ = _diffusers(study, DPMSolverMultistepScheduler(solver_order=order, use_lu_lambdas=True), nfe)
        rows.append(Row("peer", f"diffusers DPM++ {order}M logSNR", nfe, *_errors(study, out), "network sees rounded timesteps"))
    for name, ours, opts in (("dpmpp_2m", "dpmpp_2m", {}), ("lms", "hb_plms", {"beta": 1.0, "plms_order": 4, "denoise_final": False})):
        out, sigmas = _k_diffusion(study, name, nfe)
        pair(f"k-diffusion {name}", out, ours, _times_of_sigmas(study, sigmas), **opts)
    if nfe % 2 == 1:  # k-diffusion's Heun to sigma = 0 costs 2n - 1 evaluations
        out, sigmas = _k_diffusion(study, "heun", (nfe + 1) // 2)
        pair("k-diffusion heun", out, "heun", _times_of_sigmas(study, sigmas))
    return rows


# --- fewstep ----------------------------------------------------------------------------------------


def fewstep_names() -> list[str]:
    return [
        n for n in fewstep.available(model_kind="diffusion")
        if not fewstep.spec(n).stochastic and "uncond" not in fewstep.spec(n).needs
    ]


def fewstep_rows(study: ExactStudy, nfe: int, fit_noise: torch.Tensor) -> list[Row]:
    den = study.model.denoiser(study.schedule)
    rows = []
    for name in fewstep_names():
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
    rows = []
    den = study.model.denoiser(study.schedule)
    for name in names:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--nfe", default=",".join(map(str, NFES)))
    p.add_argument("--flow-nfe", default=",".join(map(str, FLOW_NFES)))
    p.add_argument("--no-vp", action="store_true", help="skip the VP (DDPM schedule) study")
    p.add_argument("--no-flow", action="store_true", help="skip the flow-matching study")
    p.add_argument("--no-plans", action="store_true", help="skip the tuned plans of the flow study")
    p.add_argument("--png", default="benchmarks/sampler_accuracy.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    nfes = tuple(int(v) for v in args.nfe.split(","))
    flow_nfes = tuple(int(v) for v in args.flow_nfe.split(","))
    t0 = time.perf_counter()
    rows: list[Row] = []
    flow_rows: list[Row] = []
    fit_noise = torch.randn(16, 64, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    if not args.no_vp:
        study = ExactStudy.make(num_samples=args.num_samples, seed=0)
        for n in nfes:
            rows += fewstep_rows(study, n, fit_noise) + peer_rows(study, n)
            print(f"VP NFE {n} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        _report("VP (DDPM linear schedule)", rows, nfes)
        plot(rows, args.png, study.fd_floor)
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
            json.dump({"vp": [asdict(r) for r in rows], "flow": [asdict(r) for r in flow_rows]}, f, indent=1)


if __name__ == "__main__":
    main()
