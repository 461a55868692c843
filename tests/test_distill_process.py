"""Process-level behaviour of the distillation trainer: a run killed with SIGKILL resumes and
ends on exactly the weights of an uninterrupted run, and two processes (`accelerate launch`, gloo)
train the same student as one process with the same global batch.  Both use tests/distill_job.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

JOB = Path(__file__).resolve().parent / "distill_job.py"
# every process of these tests imports the fewstep of this checkout (not another installed copy)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _run(args, **kw):
    r = subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, env=ENV, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def kill_after_checkpoint(out: Path, step: int, *args) -> Path:
    """Start the job (``args`` added) in ``out`` with no end, SIGKILL it once ``checkpoint-<step>``
    is complete; returns the checkpoints folder."""
    proc = subprocess.Popen([sys.executable, str(JOB), str(out), "--steps", "100000", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / f"checkpoint-{step:07d}").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    return ckpts


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    ckpts = kill_after_checkpoint(killed, 10, "--checkpoint-every", 10)
    done = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert done, "no complete checkpoint before the kill"
    last = int(done[-1].split("-")[1])
    assert last >= 10 and not (killed / "student").exists()  # killed mid-run: no final student
    # A half-written checkpoint (what a kill during save_state leaves) must be ignored and removed.
    (ckpts / ".tmp-checkpoint-9999990").mkdir()
    (ckpts / ".tmp-checkpoint-9999990" / "model.safetensors").write_bytes(b"partial")
    steps = last + 10
    out = _run([killed, "--steps", steps, "--checkpoint-every", 10, "--resume", "latest"])
    assert f"resumed={ckpts / done[-1]}" in out  # lost only the steps after the last checkpoint
    assert not (ckpts / ".tmp-checkpoint-9999990").exists()
    straight = tmp_path / "straight"
    _run([straight, "--steps", steps, "--checkpoint-every", 10])
    # Deterministic settings (one thread, per-sample seeds from (seed, step, index)): bit-identical.
    assert _max_diff(_weights(killed), _weights(straight)) == 0.0
    kept = sorted(p.name for p in ckpts.iterdir())
    assert len(kept) == 2  # keep_checkpoints=2 in the job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # Step 5 has a NaN in global sample 3, which only rank 0 draws: the non-finite guard must make
    # both ranks skip that step (one skipped step reported, weights equal across the two runs).
    one, two = tmp_path / "one", tmp_path / "two"
    out1 = _run([one, "--steps", 30, "--checkpoint-every", 30, "--nan-at", "5:3"])
    # through `accelerate launch` (its multi-GPU launcher starts two gloo processes on a CPU-only
    # machine; `torchrun --nproc_per_node 2` is the same launch underneath)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(JOB), str(two), "--steps", "30", "--checkpoint-every", "30", "--nan-at", "5:3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("processes=2") == 2 and "skipped=1" in r.stdout and "skipped=1" in out1
    # Same samples and noise per global index; DDP averages the two half-batch gradients, which
    # differs from the one-process mean only by float32 summation order.  Tolerance 1e-6 on
    # weights of size ~0.4 (measured: 4e-8).
    assert _max_diff(_weights(one), _weights(two)) < 1e-6


def test_immiscible_assignment_is_the_same_on_one_and_two_processes(tmp_path):
    """Immiscible noise assignment is done within each process's micro-batch: two processes with
    grad_accum 1 and one process with grad_accum 2 see the same micro-batches (global indices 0-7
    and 8-15), so they assign the same noises and train the same student (to float32 summation
    order, 1e-6); the assignment does act (the student differs from the one trained with
    independent noise by more than 1e-3)."""
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    _run([one, "--steps", 20, "--checkpoint-every", 20, "--immiscible", "--grad-accum", 2])
    _run([plain, "--steps", 20, "--checkpoint-every", 20, "--grad-accum", 2])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(JOB), str(two), "--steps", "20", "--checkpoint-every", "20", "--immiscible"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("processes=2") == 2
    assert _max_diff(_weights(one), _weights(two)) < 1e-6
    assert _max_diff(_weights(one), _weights(plain)) > 1e-3


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
use_cpu: true
mixed_precision: 'no'
fsdp_config:
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_use_orig_params: true
  fsdp_sync_module_states: true
"""


def test_fsdp_on_two_cpu_processes_is_refused_clearly(tmp_path):
    """`accelerate launch` with an FSDP config starts two CPU processes; torch's FSDP cannot run
    without an accelerator device (it raises "FSDP needs a non-CPU accelerator device", and
    accelerate's FSDP plugin refuses first), so the trainer stops before any work with one message
    saying so, what to use on CPUs (DDP) and where the GPU configuration is."""
    (tmp_path / "fsdp.yaml").write_text(FSDP_CONFIG)
    env = ENV
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml"), "--main_process_port",
           str(_free_port()), str(JOB), str(tmp_path / "out"), "--steps", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert r.stderr.count("FSDP needs GPUs (or another accelerator)") == 2, r.stderr[-3000:]  # both ranks, before any work
    assert "train with DDP" in r.stderr and "examples/accelerate/fsdp_8gpu.yaml" in r.stderr
    assert not (tmp_path / "out").exists()
