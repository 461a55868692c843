"""Tuned sampling plans against the best sampler diffusers or k-diffusion offers, per NFE.

For each model (the exact digits mixture, and the embedded neural digits UNet) and each NFE:

* peers: every configuration of ``benchmarks/peers.py`` (diffusers' DDIM, DPM-Solver++ 2M/3M/2S/3S,
  DEIS-2/3, UniPC-2/3 with every timestep spacing they offer; k-diffusion's DPM++ 2M, LMS, Euler,
  Heun on Karras and exponential sigmas) that spends exactly that NFE; the best one is kept;
* fewstep untuned: the best deterministic registry sampler on its default grid;
* fewstep plans: ``fewstep.samplers.tune`` for each base sampler (seeded noises, half held
  out); the plan with the lowest *validation* error is the one reported (the test noise never
  takes part in a choice), with its stages (grid, + orders, + coefficients) evaluated one by one.

Errors are RMSE of the final samples on 512 test noises never used in tuning, against the exact
ODE solution (mixture) or the model's own 500-NFE solution (UNet).  On the UNet the FID on digit
features of the plan is reported too, with the FID of the best-RMSE and of the best-FID peer and
untuned sampler (every peer's FID is computed), twice: against the held-out digits (512 samples,
so with a sampling floor, and with the model's own error in it) and against the model's exact-ODE
samples from the same 512 noises ("FID to the ODE": zero for an exact solver, so it measures the
sampler alone, in distribution).  Every row also has the spread of the error over the test noises
(median and quantiles of the per-sample RMSE, and the share of the squared error in the worst 5 %
of samples), for the plan, the best-RMSE peer and the peer with the lowest median; on the UNet
also the samples whose digit (by the feature network's classifier head) differs from the exact-ODE
sample's, with their share of the squared error.  A generalisation study tunes on one mixture and applies the
plan to two others (another number of components; another data set: mirrored digits).

An ablation (``--ablation``) tunes each ingredient alone on the mixture.

Usage:  python benchmarks/tuned_plans.py [--models mixture,unet] [--nfe 4,5,6,8,10]
        [--bases unipc_3,dpmpp_3m] [--trajectories 256] [--no-generalisation] [--ablation] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import fewstep
from fewstep.eval.exact import default_exact_samplers, default_schedule
from fewstep.eval.frechet import frechet_distance
from fewstep.eval.ode_reference import exact_ode_samples
from fewstep.models import GaussianMixture
from fewstep.models.mixture import digits_data
from fewstep.samplers import SamplingPlan, prepare
from fewstep.samplers.core import run_program
from fewstep.samplers.tuning import tune

from peers import peer_outputs

TEST_SEED = 12345


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double()
    return float(torch.sqrt(torch.mean((a - b.double()) ** 2))) if bool(torch.isfinite(a).all()) else math.inf


def per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The RMSE of every sample (one number per noise)."""
    return ((a.double() - b.double()) ** 2).flatten(1).mean(1).sqrt()


def spread(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How the error spreads over the noises: median and 90/99 % quantiles of the per-sample RMSE,
    and the share of the total squared error carried by the worst 5 % of samples."""
    e = per_sample(a, b)
    sq = torch.sort(e**2, descending=True).values
    q = torch.quantile(e, torch.tensor([0.5, 0.9, 0.99], dtype=e.dtype)).tolist()
    return {"median": q[0], "q90": q[1], "q99": q[2], "worst_5pct_share": float(sq[: max(1, len(sq) // 20)].sum() / sq.sum())}


def stage_programs(plan: SamplingPlan, schedule) -> dict[str, object]:
    """The plan's stages as runnable programs: default grid, + grid, + orders, + coefficients (and times)."""
    out = {"default": prepare(plan.sampler, plan.nfe, schedule)}
    grid = None
    for st in plan.meta["stages"]:
        if st["stage"] == "grid" and st["accepted"]:
            grid = st["grid"]
            out["grid"] = prepare(plan.sampler, plan.nfe, schedule, spacing=grid)
        if st["stage"] == "orders" and st["accepted"]:
            out["grid+orders"] = prepare(plan.sampler, plan.nfe, schedule, spacing=grid, orders=st["orders"])
    if plan.table is not None:
        fitted = [st["stage"] for st in plan.meta["stages"] if st["stage"].startswith("coefficients")][-1]
        out[f"grid+orders+{fitted}"] = plan.program(schedule)
    return out


def run(program, denoiser, noise: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x, _ = run_program(program, denoiser, program.initial_state(noise.to(torch.promote_types(noise.dtype, torch.float32))))
    return x


def changed_class(out: torch.Tensor, ref: torch.Tensor, classify) -> dict[str, float]:
    """Samples the digit classifier labels differently from the exact-ODE sample of the same noise
    (the solver landed on another digit): how many, their share of the squared error, and the RMSE
    of the others."""
    flip = classify(out) != classify(ref)
    e2 = per_sample(out, ref) ** 2
    return {"count": int(flip.sum()), "share": float(e2[flip].sum() / e2.sum()), "rmse_others": float(e2[~flip].mean().sqrt())}


def study(name: str, denoiser, schedule, shape, dtype, reference_fn, nfes, bases, trajectories, stats=None, data_stats=None,
          classify=None) -> list[dict]:
    """``stats(x) -> (mu, cov)`` of the samples' features and ``data_stats`` of the data turn on the
    two FIDs (to data, and to the exact-ODE samples ``ref``); ``classify`` the digit changes."""
    test = torch.randn((512, *shape), generator=torch.Generator().manual_seed(TEST_SEED), dtype=dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = reference_fn(test)
    print(f"[{name}] reference for 512 test noises: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for nfe in nfes:
        peers = sorted(((rmse(out, ref), pname, out) for pname, out in peer_outputs(denoiser, schedule, test, nfe)), key=lambda r: r[0])
        untuned = []
        for s in default_exact_samplers():
            if fewstep.spec(s).stochastic:
                continue
            try:
                out = run(prepare(s, nfe, schedule), denoiser, test)
            except ValueError:
                continue
            untuned.append((rmse(out, ref), s, out))
        untuned.sort(key=lambda r: r[:2])
        plans = []
        for base in bases:
            t0 = time.perf_counter()
            plan = tune(denoiser, schedule, sampler=base, nfe=nfe, num_trajectories=trajectories, shape=shape, dtype=dtype,
                        generator=torch.Generator().manual_seed(0))
            stages = {k: rmse(run(p, denoiser, test), ref) for k, p in stage_programs(plan, schedule).items()}
            plans.append((plan.meta["validation_rmse"], base, plan, stages, time.perf_counter() - t0))
        plans.sort(key=lambda p: p[0])
        _, base, plan, stages, secs = plans[0]
        best_plan = stages[list(stages)[-1]]
        plan_out = run(plan.program(schedule), denoiser, test)
        by_median = min(((float(per_sample(out, ref).median()), pname, out) for _, pname, out in peers), key=lambda r: r[0])
        row = {
            "model": name, "nfe": nfe,
            "best_peer": peers[0][1], "best_peer_rmse": peers[0][0], "peers_counted": len(peers),
            "best_untuned": untuned[0][1], "best_untuned_rmse": untuned[0][0],
            "plan_base": base, "plan_stages": stages, "plan_rmse": best_plan, "plan_seconds": secs,
            "ratio_plan_to_peer": best_plan / peers[0][0],
            "spread": {"best plan": spread(plan_out, ref), "best-RMSE peer": spread(peers[0][2], ref),
                       "best-median peer": {**spread(by_median[2], ref), "name": by_median[1]}},
            "all_bases": {b: {"val": v, "test": st[list(st)[-1]], "seconds": sec} for v, b, _, st, sec in plans},
        }
        if classify is not None:
            row["changed_class"] = {"best plan": changed_class(plan_out, ref, classify),
                                    "best-RMSE peer": changed_class(peers[0][2], ref, classify)}
        if stats is not None:  # features of every sample set once, then both distances
            peer_stats = [(stats(out), pname) for _, pname, out in peers]
            untuned_stats = [(stats(out), s) for _, s, out in untuned]
            plan_stats, ode_stats = stats(plan_out), stats(ref)
            for key, target in (("fid", data_stats), ("fid_ode", ode_stats)):
                peer_fids = [(frechet_distance(*st, *target), pname) for st, pname in peer_stats]
                untuned_fids = [(frechet_distance(*st, *target), s) for st, s in untuned_stats]
                best_peer, best_untuned = min(peer_fids), min(untuned_fids)
                row[key] = {
                    "best-RMSE peer": peer_fids[0][0],
                    "best-FID peer": best_peer[0], "best-FID peer name": best_peer[1],
                    "best-RMSE untuned": untuned_fids[0][0],
                    "best-FID untuned": best_untuned[0], "best-FID untuned name": best_untuned[1],
                    "best plan": frechet_distance(*plan_stats, *target),
                }
            row["fid"]["exact ODE samples"] = frechet_distance(*ode_stats, *data_stats)  # the floor of FID to data here
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "all_bases"}, default=float), flush=True)
    return rows


def generalisation(nfes, trajectories) -> list[dict]:
    """Tune on the digits mixture; apply to a 5-component fit and to a fit of mirrored digits."""
    sched = default_schedule()
    a = GaussianMixture.digits()
    data = digits_data("train")
    others = {
        "digits, 5 components": GaussianMixture.fit(data, n_components=5, reg_covar=0.02, seed=0),
        "mirrored digits, 10 components": GaussianMixture.fit(data.reshape(-1, 8, 8).flip(-1).reshape(-1, 64), n_components=10, reg_covar=0.02, seed=0),
    }
    test = torch.randn(512, 64, generator=torch.Generator().manual_seed(TEST_SEED), dtype=torch.float64)
    rows = []
    for nfe in nfes:
        plan_a = tune(a.denoiser(sched), sched, sampler="unipc_3", nfe=nfe, num_trajectories=trajectories, shape=(64,),
                      dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for label, b in others.items():
            den = b.denoiser(sched)
            exact = b.ode_solve(test, sched, sched.t_max, sched.t_zero)
            own = tune(den, sched, sampler="unipc_3", nfe=nfe, num_trajectories=trajectories, shape=(64,), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0))
            row = {"nfe": nfe, "target": label,
                   "untuned": rmse(fewstep.sample(den, test, "unipc_3", nfe), exact),
                   "plan tuned on the digits mixture": rmse(fewstep.sample(den, test, plan=plan_a), exact),
                   "plan tuned on the target": rmse(fewstep.sample(den, test, plan=own), exact)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def ablation(nfes, trajectories, base: str = "unipc_3") -> list[dict]:
    """Each ingredient alone (and all three) on the exact digits mixture: test RMSE on 512 new noises."""
    sched = default_schedule()
    mix = GaussianMixture.digits()
    den = mix.denoiser(sched)
    test = torch.randn(512, 64, generator=torch.Generator().manual_seed(TEST_SEED), dtype=torch.float64)
    exact = mix.ode_solve(test, sched, sched.t_max, sched.t_zero)
    rows = []
    for nfe in nfes:
        row = {"nfe": nfe, "base": base, "untuned": rmse(fewstep.sample(den, test, base, nfe), exact)}
        for ingredients in (("grid",), ("orders",), ("coefficients",), ("coefficients", "times"), ("grid", "orders", "coefficients", "times")):
            plan = tune(den, sched, sampler=base, nfe=nfe, num_trajectories=trajectories, shape=(64,), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0), ingredients=ingredients)
            row["+".join(ingredients)] = rmse(fewstep.sample(den, test, plan=plan), exact)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mixture,unet")
    p.add_argument("--nfe", default="4,5,6,8,10")
    p.add_argument("--bases", default="unipc_3,dpmpp_3m")
    p.add_argument("--trajectories", type=int, default=256, help="tuning noises per plan (tune()'s default)")
    p.add_argument("--no-generalisation", action="store_true")
    p.add_argument("--ablation", action="store_true", help="also tune each ingredient alone on the mixture")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    nfes = [int(v) for v in args.nfe.split(",")]
    bases = args.bases.split(",")
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    if "mixture" in args.models:
        sched = default_schedule()
        mix = GaussianMixture.digits()
        results["rows"] += study("exact digits mixture", mix.denoiser(sched), sched, (64,), torch.float64,
                                 lambda x: mix.ode_solve(x, sched, sched.t_max, sched.t_zero), nfes, bases, args.trajectories)
    if "unet" in args.models:
        from fewstep.eval.features import get_extractor
        from fewstep.eval.frechet import gaussian_stats
        from fewstep.eval.reference import reference_stats
        from fewstep.models.embedded import digits_denoiser

        den = digits_denoiser()
        ext = get_extractor("digits")
        ref_stats = reference_stats("digits:test", ext, progress=False)

        def stats(x: torch.Tensor):
            """Mean and covariance of the digit features of samples ``x``."""
            with torch.no_grad():
                return gaussian_stats(ext(x.float().clamp(-1, 1)))

        results["rows"] += study("embedded digits UNet", den, den.schedule, (1, 8, 8), torch.float32,
                                 lambda x: exact_ode_samples(den, x), nfes, bases, args.trajectories, stats=stats,
                                 data_stats=(ref_stats.mu, ref_stats.sigma), classify=lambda x: ext.net(x.float().clamp(-1, 1)).argmax(1))
    if not args.no_generalisation:
        results["generalisation"] = generalisation([5, 10], args.trajectories)
    if args.ablation:
        results["ablation"] = ablation(nfes, args.trajectories)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
