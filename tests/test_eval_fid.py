"""fid_per_nfe: per-index seeding (batch size, process count), resume after SIGKILL, the table."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.eval.fid import _read_chunks, fid_per_nfe, sample_noise
from fewstep.eval.frechet import frechet_distance, gaussian_stats
from fewstep.eval.reference import reference_stats

WORKER = Path(__file__).resolve().parent / "fid_worker.py"
sys.path.insert(0, str(WORKER.parent))
from fid_worker import GRID, NUM_SAMPLES, make_denoiser  # noqa: E402

CELLS = len(GRID["samplers"]) * len(GRID["nfes"])


def _free_port() -> int:
    """A port no other test (pytest-xdist runs two at a time) is using: a fixed one made them collide."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(fewstep.__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    return env


def _run_worker(run_dir, out, *extra, launcher=()):
    r = subprocess.run([*launcher, str(WORKER), str(run_dir), str(out), *extra], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(Path(out).read_text())


def _numbers(rows):
    """The rows without their wall times (which differ from run to run), NaN (a metric the run did
    not compute) written as a string so that equal rows compare equal."""
    def same(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [{k: same(v) for k, v in r.items() if k != "seconds_per_sample"} for r in rows]


def _assert_same_rows(a, b, rel=1e-12):
    """Equal tables: every field equal, except that the bootstrap's KID intervals (sums over
    resampled kernel matrices, whose BLAS reduction order depends on the thread count of the
    process) may differ in the last bits: floats agree to ``rel``."""
    a, b = _numbers(a), _numbers(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert vb == pytest.approx(va, rel=rel, abs=1e-15), (ra["sampler"], ra["nfe"], k)
            else:
                assert va == vb, (ra["sampler"], ra["nfe"], k)


def _all_features(run_dir):
    """{cell folder: (features in index order, kept images)} read straight from the chunk files."""
    out = {}
    for cell in sorted((Path(run_dir) / "cells").iterdir()):
        chunks = _read_chunks(cell)
        out[cell.name] = (np.concatenate([c["features"] for _, _, c in chunks]),
                          np.concatenate([c["images"] for _, _, c in chunks if "images" in c]))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid_single")
    return d / "run", _run_worker(d / "run", d / "out.json", launcher=(sys.executable,))


def test_noise_depends_only_on_the_sample_index():
    whole = sample_noise(7, 0, 64, (1, 8, 8))
    pieces = torch.cat([sample_noise(7, s, min(s + 24, 64), (1, 8, 8)) for s in range(0, 64, 24)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(sample_noise(8, 0, 4, (1, 8, 8)), whole[:4])
    # Neighbouring indices give unrelated streams.
    assert abs(float(torch.corrcoef(whole.flatten(1)[:2])[0, 1])) < 0.5


def test_seeds_come_from_one_hash_and_never_share_a_stream():
    """FID noise and distillation draws use one helper (fewstep._util.derived_seed): keys that
    differ in any word, in their number of words or in their tag give different seeds, where the
    earlier formulas overlapped (``s0 << 31 ^ s1`` shares bits between its two words)."""
    from fewstep._util import derived_seed
    from fewstep.distill import sample_generators as distill_generators
    from fewstep.eval.fid import sample_generators

    keys = [(s, i) for s in range(4) for i in range(64)] + [(s, i, 0) for s in range(4) for i in range(64)]
    seeds = {derived_seed(*k) for k in keys}
    assert len(seeds) == len(keys) and all(0 <= v < 2**64 for v in seeds)
    assert derived_seed(1, 2) != derived_seed(12) != derived_seed("1", "2")
    fid = {g.initial_seed() for g in sample_generators(0, 0, 64)}
    distill = {g.initial_seed() for g in distill_generators(0, 0, range(64))}
    assert len(fid) == len(distill) == 64 and not fid & distill
    assert [g.initial_seed() for g in sample_generators(5, 10, 12)] == [derived_seed("fid-sample", 5, i) for i in (10, 11)]


class Scaled(torch.nn.Module):
    """The exact mixture's denoiser times a learnable scale: a tiny nn.Module model."""

    def __init__(self, scale: float):
        super().__init__()
        self.inner = make_denoiser("mixture")
        self.schedule = self.inner.schedule
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))

    def forward(self, x, t):
        return self.inner(x, t) * self.scale.to(x.dtype)


def test_a_run_folder_is_never_reused_for_another_model(tmp_path):
    """The manifest fingerprints an nn.Module denoiser's weights and records the schedule: another
    model (or schedule) in the same run folder is refused, the same weights in a new object reuse
    every chunk, and a denoiser fewstep cannot fingerprint needs a model_id."""
    ref = reference_stats("digits:test", "digits", cache_dir=False)
    kw = dict(shape=(1, 8, 8), reference=ref, num_samples=8, batch_size=8, samplers=["ddim", "dpmpp_2m"], nfes=[2],
              run_dir=tmp_path / "run", progress=False, kid_subsets=2, sampler_options={"ddim": {"eta": 1.0}})
    first = fid_per_nfe(Scaled(1.0), **kw)
    assert first.generated == 16
    # ddim with eta = 1 draws noise: the row says so (from the run, not from the registry's default)
    assert first.row("ddim", 2).stochastic and not first.row("dpmpp_2m", 2).stochastic
    again = fid_per_nfe(Scaled(1.0), **kw)  # the same weights, another object: every chunk is reused
    assert again.generated == 0 and again.row("ddim", 2).fid == first.row("ddim", 2).fid and again.row("ddim", 2).stochastic
    with pytest.raises(ValueError, match="different settings.*model"):
        fid_per_nfe(Scaled(0.9), **kw)
    other_schedule = Scaled(1.0)
    from fewstep.schedules import VPDiscrete, diffusers_betas

    other_schedule.schedule = VPDiscrete.from_betas(diffusers_betas(1000, 1e-4, 0.02, "scaled_linear"))
    with pytest.raises(ValueError, match="different settings.*schedule"):
        fid_per_nfe(other_schedule, **kw)
    with pytest.raises(ValueError, match="model_id"):
        fid_per_nfe(make_denoiser("mixture"), **{**kw, "run_dir": tmp_path / "plain"})
    assert fid_per_nfe(make_denoiser("mixture"), **{**kw, "run_dir": None}).generated == 16  # a temporary folder is fine


@pytest.mark.parametrize("model", ["mixture", "unet"])
def test_batch_size_does_not_change_the_samples(tmp_path, model):
    # The same grid with batch sizes 16 and 64.  With the exact mixture (a denoiser whose float64
    # arithmetic does not depend on the batch shape) the samples are bit-identical, the stochastic
    # sampler included.  The UNet's kernels may round differently for another batch shape (1e-6 in
    # its output, amplified by 1/alpha at the noisiest steps), so there the samples agree to that.
    den = make_denoiser(model)
    ref = reference_stats("digits:test", "digits", cache_dir=False)
    tables = {}
    for bs in (16, 64):
        tables[bs] = fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=NUM_SAMPLES, batch_size=bs,
                                 run_dir=tmp_path / f"bs{bs}", keep_images=NUM_SAMPLES, progress=False, kid_subsets=5,
                                 model_id=model, **GRID)
    for name in GRID["samplers"]:
        for nfe in GRID["nfes"]:
            a, b = tables[16].images(name, nfe), tables[64].images(name, nfe)
            assert a.shape == (NUM_SAMPLES, 1, 8, 8)
            r16, r64 = tables[16].row(name, nfe), tables[64].row(name, nfe)
            if model == "mixture":
                assert torch.equal(a, b), (name, nfe)
                # The feature network and the chunked sums see other batch shapes: round-off only.
                assert r16.fid == pytest.approx(r64.fid, rel=1e-12) and r16.kid == pytest.approx(r64.kid, rel=1e-9)
            else:
                assert float((a - b).abs().max()) < 2e-4, (name, nfe)  # measured up to 7e-5
                assert r16.fid == pytest.approx(r64.fid, rel=1e-4)
    # Different samplers start from the same noise per index: at NFE 1 DDIM and DPM-Solver++(2M)
    # take the same single step, so their samples coincide.
    one = fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=8, batch_size=8, samplers=["ddim", "dpmpp_2m"],
                      nfes=[1], run_dir=tmp_path / "one", keep_images=8, progress=False, kid_subsets=2, model_id=model)
    assert torch.equal(one.images("ddim", 1), one.images("dpmpp_2m", 1))


def test_two_processes_give_the_same_table(uninterrupted, tmp_path):
    run1, single = uninterrupted
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()))
    double = _run_worker(tmp_path / "run", tmp_path / "out.json", launcher=launcher)
    assert double["world"] == 2 and single["world"] == 1
    _assert_same_rows(double["rows"], single["rows"])
    f1, f2 = _all_features(run1), _all_features(tmp_path / "run")
    assert f1.keys() == f2.keys() and len(f1) == CELLS
    for k in f1:
        assert np.array_equal(f1[k][0], f2[k][0]) and np.array_equal(f1[k][1], f2[k][1]), k
    # RunningStats merged across the two processes equal numpy's covariance of the whole set.
    assert double["allreduce_n"] == 359 and double["allreduce_cov_err"] < 1e-9
    # Rank 0 generated its share only (every other batch).
    assert double["generated"] == CELLS * NUM_SAMPLES // 2


def test_resume_after_sigkill_gives_the_same_table(uninterrupted, tmp_path):
    _, single = uninterrupted
    run = tmp_path / "run"
    env = _env()
    proc = subprocess.Popen([sys.executable, str(WORKER), str(run), str(tmp_path / "killed.json"), "--delay", "0.05"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    total = CELLS * NUM_SAMPLES // 16
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(run.glob("cells/*/chunk_*.npz"))) >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the worker ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(run.glob("cells/*/chunk_*.npz")))
    assert 3 <= done < total and not (tmp_path / "killed.json").exists()
    resumed = _run_worker(run, tmp_path / "resumed.json", launcher=(sys.executable,))
    _assert_same_rows(resumed["rows"], single["rows"])
    # Only the missing batches were generated again; nothing half-written was left behind.
    assert resumed["generated"] == (total - done) * 16
    assert not list(run.rglob("*.tmp"))


class NanBelow:
    """The exact denoiser, but NaN below schedule time ``t_bad`` (a model that breaks at low noise)."""

    def __init__(self, inner, t_bad):
        self.inner, self.t_bad, self.schedule = inner, t_bad, inner.schedule

    def __call__(self, x, t, **kw):
        out = self.inner(x, t, **kw)
        return out * float("nan") if float(t) < self.t_bad else out


def test_table_contents_and_errors(tmp_path):
    den = NanBelow(make_denoiser("mixture"), t_bad=50.0)
    ref = reference_stats("digits:test", "digits", cache_dir=False)
    table = fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=96, batch_size=48, samplers=["dpmpp_2s", "ddim"],
                        nfes=[1, 2, 10], run_dir=tmp_path / "run", progress=False, kid_subsets=10, model_id="nan-below-50")
    # NFE 10 evaluates below t = 50 and gets NaN: that cell becomes an error row, the rest runs.
    bad = table.row("ddim", 10)
    assert math.isnan(bad.fid) and "NaN" in bad.error and (tmp_path / "run/cells/ddim-nfe10/error.json").is_file()
    good = table.row("ddim", 2)
    assert good.num_samples == 96 and good.fid > 0 and good.seconds_per_sample > 0 and not good.error
    assert table.row("ddim", 2).fid < table.row("ddim", 1).fid  # one step from pure noise is worse
    mu, sigma = gaussian_stats(table.features("ddim", 2))
    assert good.fid == pytest.approx(frechet_distance(mu, sigma, ref.mu, ref.sigma), rel=1e-9)
    assert table.images("ddim", 2).shape == (64, 1, 8, 8)  # keep_images defaults to 64
    assert "sample 0 (noise seed 0) goes non-finite" in bad.error and "retry_errors=True" in bad.error
    with pytest.raises(ValueError, match="different settings.*seed"):
        fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=50, samplers=["ddim"], nfes=[2], seed=1,
                    run_dir=tmp_path / "run", progress=False, model_id="nan-below-50")
    with pytest.raises(ValueError, match="did you mean"):
        fid_per_nfe(den, shape=(1, 8, 8), reference=ref, num_samples=50, samplers=["dim"], nfes=[2], progress=False)
