"""rCM's several trainable networks (student, sCM's log-variance head, the fake score; three
optimizers and LR schedules) at process level: a run killed with SIGKILL resumes to exactly the
weights of an uninterrupted run, and two processes (accelerate launch, gloo) train the same
networks as one.  Both use tests/distill_job.py --objective rcm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from test_distill_process import ENV, JOB, _free_port, _max_diff, _run, _weights, kill_after_checkpoint

FILES = ("model.safetensors", "model_1.safetensors", "model_2.safetensors")  # student, fake_score, logvar (sorted names)


def _networks(out: Path, step: int) -> dict[str, dict]:
    ck = out / "checkpoints" / f"checkpoint-{step:07d}"
    return {f: load_file(str(ck / f)) for f in FILES}


def test_rcm_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    ckpts = kill_after_checkpoint(killed, 12, "--checkpoint-every", 6, "--objective", "rcm")
    last = max(int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert last >= 12
    steps = last + 6  # crosses student and fake-score phases (update every 3rd step after a 4-step warm-up)
    out = _run([killed, "--steps", steps, "--checkpoint-every", 6, "--resume", "latest", "--objective", "rcm"])
    assert "resumed=" in out and "resumed=None" not in out
    straight = tmp_path / "straight"
    _run([straight, "--steps", steps, "--checkpoint-every", 6, "--objective", "rcm"])
    a, b = _networks(killed, steps), _networks(straight, steps)
    for f in FILES:  # every network bit-identical, and each of them trained over the last 6 steps
        assert _max_diff(a[f], b[f]) == 0.0, f
    assert _max_diff(_weights(killed), _weights(straight)) == 0.0
    before = _networks(straight, steps - 6)
    assert all(_max_diff(before[f], b[f]) > 0 for f in FILES)


def test_rcm_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([one, "--steps", 12, "--checkpoint-every", 12, "--objective", "rcm"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(JOB), str(two), "--steps", "12", "--checkpoint-every", "12", "--objective", "rcm"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("processes=2") == 2
    # the same per-sample draws on either split; DDP's averaged gradients differ from one process's
    # mean by float32 summation order only (tolerance as the CD test's)
    a, b = _networks(one, 12), _networks(two, 12)
    for f in FILES:
        assert _max_diff(a[f], b[f]) < 1e-6, f
