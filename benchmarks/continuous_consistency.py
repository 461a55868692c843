"""Continuous-time consistency (sCM, rCM) next to the discrete objectives (CD, MCD, iCT) on the
embedded digits teacher, and the JVP's cost.

    python benchmarks/continuous_consistency.py --steps 300 --seeds 0,1 --json cc.json

Every (objective, seed) trains in its own process (so its peak resident memory is its own) with
the same steps, global batch and learning rate, the student starting from the teacher's weights
read as a v-prediction network (the CLI's digits default), on one CPU thread.  Equal *steps*, not
equal compute: the seconds per step of each objective are reported next to it (sCM's JVP and
rCM's fake score cost more per step).  LCD is left out: it distils a guided text-conditional
teacher, and the digits teacher is unconditional.

Quality: 2000 samples from fixed noise with each student's recorded sampler at 1, 2 and 4 steps,
and the teacher's ``dpmpp_2m`` at 10 and 50 NFE, scored by the Fréchet distance on the shipped
digit features against the digits test split, with the 95 % bootstrap interval over samples of
:mod:`fewstep.eval.uncertainty` (200 resamples).  The spread over training seeds is shown as
the per-seed values.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fewstep, also in the child processes

OBJECTIVES = ("cd", "mcd", "ict", "scm", "rcm")  # and "scm_fd": sCM with the finite-difference tangent


def _objective(name: str, steps: int):
    from fewstep.distill import CD, ICT, MCD, RCM, SCM

    warm = steps // 3
    return {"cd": lambda: CD(18, teacher_sampler="ddim"), "mcd": lambda: MCD(32, segments=4, teacher_sampler="ddim"),
            "ict": lambda: ICT(), "scm": lambda: SCM(tangent_warmup=warm), "rcm": lambda: RCM(tangent_warmup=warm),
            "scm_fd": lambda: SCM(tangent_warmup=warm, jvp="fd")}[name]()


def _fd_cell(features, samples, mu, sigma, counts) -> dict:
    from fewstep.eval.frechet import frechet_distance
    from fewstep.eval.uncertainty import fd_replicates, interval

    f = features(samples.float()).double().numpy()
    est = frechet_distance(f.mean(0), np.cov(f, rowvar=False), mu, sigma)
    reps, _ = fd_replicates(f, counts, mu=mu, sigma=sigma)
    iv = interval(float(est), reps)
    return {"fd": iv.estimate, "lo": iv.lo, "hi": iv.hi}


def _reference():
    from fewstep.eval.features import digits_features
    from fewstep.eval.uncertainty import DEFAULT_REPLICATES, bootstrap_counts
    from fewstep.models.embedded import digits_images

    features = digits_features()
    ref = features(digits_images("test")).double().numpy()
    noise = torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
    return features, ref.mean(0), np.cov(ref, rowvar=False), noise, bootstrap_counts(2000, DEFAULT_REPLICATES, seed=0)


def run_one(name: str, seed: int, steps: int, batch: int, lr: float) -> dict:
    import fewstep
    from fewstep.distill import Distiller, DistillConfig, TensorData
    from fewstep.models.embedded import digits_denoiser, digits_images

    torch.set_num_threads(1)
    teacher = digits_denoiser()
    features, mu, sigma, noise, counts = _reference()
    obj = _objective(name, steps)
    out = Path(tempfile.mkdtemp()) / "run"
    cfg = DistillConfig(output_dir=out, steps=steps, batch_size=batch, lr=lr, checkpoint_every=10**9, progress=False,
                        log_every=max(1, steps), seed=seed, cpu=True, sampling_ema=None)
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher.model)
    d = Distiller(obj, TensorData(digits_images("train")), teacher if obj.needs_teacher else None, student,
                  prediction_type="v_prediction", schedule=teacher.schedule, config=cfg)
    t0 = time.perf_counter()
    result = d.train()
    seconds = time.perf_counter() - t0
    st = d.student.eval()
    cells = {}
    with torch.no_grad():
        for k in (1, 2, 4):
            x = fewstep.sample(st, noise, obj.sampler, k, generator=torch.Generator().manual_seed(7), **obj.sampler_options())
            cells[str(k)] = _fd_cell(features, x, mu, sigma, counts)
    return {"objective": name, "seed": seed, "steps": steps, "batch": batch, "lr": lr, "train_seconds": seconds,
            "seconds_per_step": result.history[-1]["seconds"] / steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "sampler": obj.sampler, "fd": cells}


def teacher_rows() -> dict:
    import fewstep
    from fewstep.models.embedded import digits_denoiser

    torch.set_num_threads(1)
    teacher = digits_denoiser()
    features, mu, sigma, noise, counts = _reference()
    with torch.no_grad():
        return {str(n): _fd_cell(features, fewstep.sample(teacher, noise, "dpmpp_2m", n), mu, sigma, counts) for n in (10, 50)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # objective:seed, in a child process
    a = p.parse_args()
    if a.one:
        name, seed = a.one.split(":")
        print(json.dumps(run_one(name, int(seed), a.steps, a.batch_size, a.lr)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    for name in a.objectives.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            r = subprocess.run([sys.executable, __file__, "--one", f"{name}:{seed}", "--steps", str(a.steps),
                                "--batch-size", str(a.batch_size), "--lr", str(a.lr)], capture_output=True, text=True, env=env)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            c = rows[-1]
            print(f"{name} seed {seed}: {c['seconds_per_step']:.3f} s/step, peak RSS {c['peak_rss_mb']:.0f} MB, FD "
                  + ", ".join(f"{k}: {v['fd']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}]" for k, v in c["fd"].items()), flush=True)
    teacher = teacher_rows()
    print("teacher dpmpp_2m " + ", ".join(f"{k}: {v['fd']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for k, v in teacher.items()))
    meta = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "device": "cpu", "command": " ".join(sys.argv)}
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "rows": rows, "teacher": teacher}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
