"""Run folders heal and saves are atomic and unique: a truncated FID chunk or reference cache is
redone with a warning naming it, runs with different batch sizes share one folder, concurrent
plan saves never leave a partial file, nothing but a regular file is replaced, and a distillation
folder is never silently reused by a second run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep
from fewstep.eval.fid import _cover, fid_per_nfe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_job import small_mixture  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    from fewstep.eval.reference import reference_stats

    return reference_stats(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, "digits", cache_dir=False)


@pytest.fixture(scope="module")
def denoiser(digits_mixture, ddpm_schedule):
    return digits_mixture.denoiser(ddpm_schedule)  # batch-invariant: every batch size gives the same samples


def _fid(den, ref, run_dir, batch_size=4, num_samples=12, **kw):
    return fid_per_nfe(den, shape=(1, 8, 8), samplers=["ddim", "dpmpp_2m"], nfes=[2], reference=ref, num_samples=num_samples,
                       batch_size=batch_size, run_dir=run_dir, model_id="mixture", progress=False, kid_subsets=2,
                       kid_subset_size=6, keep_images=6, **kw)


def _numbers(table):
    return [(r.sampler, r.nfe, r.fid, r.kid, r.num_samples) for r in table.rows]


# -- FID run folders -----------------------------------------------------------------------------------


def test_a_truncated_chunk_is_redone_with_a_warning(tmp_path, denoiser, reference):
    first = _fid(denoiser, reference, tmp_path / "run")
    chunk = tmp_path / "run" / "cells" / "ddim-nfe2" / "chunk_00000004_00000008.npz"
    data = chunk.read_bytes()
    with np.load(chunk) as z:
        before = z["features"]
    chunk.write_bytes(data[: len(data) // 2])  # what a full disk or an interrupted copy leaves: BadZipFile
    with pytest.warns(UserWarning, match=rf"{chunk}: it cannot be read.*generated again"):
        again = _fid(denoiser, reference, tmp_path / "run")
    assert again.generated == 4 and _numbers(again) == _numbers(first)
    with np.load(chunk) as z:
        assert np.array_equal(z["features"], before)  # the same samples, written again
    # a chunk that reads but lies about its range is not used either
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(chunk, **{**arrays, "features": arrays["features"][:2]})
    with pytest.warns(UserWarning, match=r"its features have shape \(2, 64\)"):
        assert _fid(denoiser, reference, tmp_path / "run").generated == 4
    # a damaged error record or manifest: the record is redone, the manifest is explained
    (tmp_path / "run" / "cells" / "dpmpp_2m-nfe2" / "error.json").write_text('{"err')
    with pytest.warns(UserWarning, match=r"error.json: it cannot be read.*run again"):
        assert _numbers(_fid(denoiser, reference, tmp_path / "run")) == _numbers(first)
    (tmp_path / "run" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest.json cannot be read.*delete that folder to start over"):
        _fid(denoiser, reference, tmp_path / "run")


def test_overlapping_chunks_of_different_batch_sizes_leave_the_folder_usable(tmp_path, denoiser, reference):
    """Two reports with batch sizes 4 and 5 writing into one folder (here: the second one's chunks
    copied in, and part of the first one's lost) overlap; reading takes every index once and a
    third run with batch size 3 generates only what no chunk covers."""
    a = _fid(denoiser, reference, tmp_path / "a", batch_size=4)
    _fid(denoiser, reference, tmp_path / "b", batch_size=5)
    for cell in ("ddim-nfe2", "dpmpp_2m-nfe2"):
        for p in (tmp_path / "b" / "cells" / cell).glob("chunk_*.npz"):
            if p.name != "chunk_00000010_00000012.npz":
                shutil.copy(p, tmp_path / "a" / "cells" / cell / p.name)  # [0,5) [5,10) over [0,4) [4,8) [8,12)
        (tmp_path / "a" / "cells" / cell / "chunk_00000008_00000012.npz").unlink()  # now [10, 12) is missing
    mixed = _fid(denoiser, reference, tmp_path / "a", batch_size=3)
    assert mixed.generated == 2 * 2  # [10, 12) of both cells, nothing else
    for ra, rm in zip(a.rows, mixed.rows):
        assert rm.num_samples == 12 and rm.fid == pytest.approx(ra.fid, rel=1e-9, abs=1e-12)
    ref_feats = a.features("ddim", 2)
    assert np.array_equal(mixed.features("ddim", 2), ref_feats)  # the exact mixture: the same samples at any batch size
    assert mixed.images("ddim", 2).shape[0] == 6 and torch.equal(mixed.images("ddim", 2), a.images("ddim", 2))


def test_two_runs_with_different_batch_sizes_at_the_same_time(tmp_path, denoiser, reference):
    results, errors = {}, []

    def run(bs):
        try:
            results[bs] = _fid(denoiser, reference, tmp_path / "run", batch_size=bs, num_samples=24)
        except Exception as err:  # pragma: no cover - the assertion below reports it
            errors.append(err)

    threads = [threading.Thread(target=run, args=(bs,)) for bs in (4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = _fid(denoiser, reference, tmp_path / "run", batch_size=7, num_samples=24)
    assert final.generated == 0
    for r4, r5, rf in zip(results[4].rows, results[5].rows, final.rows):
        assert rf.fid == pytest.approx(r4.fid, rel=1e-9) == pytest.approx(r5.fid, rel=1e-9)


def test_cover_takes_each_index_once():
    chunk = lambda s, e: (s, e, {})  # noqa: E731
    pieces, gaps = _cover([chunk(0, 4), chunk(0, 5), chunk(4, 8), chunk(10, 12), chunk(11, 20)], 14)
    assert [(lo, hi, c[:2]) for lo, hi, c in pieces] == [(0, 5, (0, 5)), (5, 8, (4, 8)), (10, 12, (10, 12)), (12, 14, (11, 20))]
    assert gaps == [(8, 10)]


def test_a_truncated_reference_cache_is_recomputed(tmp_path):
    from fewstep.eval.reference import reference_stats

    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = reference_stats(images, "digits", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"damaged, recomputing them: {cached}"):
        again = reference_stats(images, "digits", cache_dir=tmp_path)
    assert np.array_equal(again.mu, ref.mu) and np.array_equal(again.sigma, ref.sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is whole: no warning, no recomputation needed
        assert np.array_equal(reference_stats(images, "digits", cache_dir=tmp_path).features, ref.features)
    cached.unlink()
    cached.mkdir()  # a folder in the cache's place: said before extracting any feature
    with pytest.raises(ValueError, match=rf"{cached} is a folder"):
        reference_stats(images, "digits", cache_dir=tmp_path)


# -- atomic, unique saves --------------------------------------------------------------------------------


def _plan(ddpm_schedule, tag):
    from fewstep.samplers.core import prepare
    from fewstep.samplers.plan import SamplingPlan

    prog = prepare("ddim", 3, ddpm_schedule)
    return SamplingPlan("ddim", 3, prog.grid.tolist(), {}, ddpm_schedule.config(), list(prog.eval_times), meta={"writer": tag, "pad": "x" * 20000})


def test_concurrent_plan_saves_never_leave_a_partial_file(tmp_path, ddpm_schedule):
    """Four threads and two processes save different plans to one path 25 times each while a
    reader loads it: every read is one writer's whole plan, and no temporary file is left."""
    from fewstep.samplers.plan import SamplingPlan

    path = tmp_path / "plans" / "plan.json"
    _plan(ddpm_schedule, "start").save(path)
    script = (
        "import sys; from fewstep.eval.exact import default_schedule; from fewstep.samplers.core import prepare; "
        "from fewstep.samplers.plan import SamplingPlan; s = default_schedule(); p = prepare('ddim', 3, s); "
        "plan = SamplingPlan('ddim', 3, p.grid.tolist(), {}, s.config(), list(p.eval_times), meta={'writer': sys.argv[2], 'pad': 'x' * 20000}); "
        "[plan.save(sys.argv[1]) for _ in range(25)]"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(fewstep.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"process{i}"], env=env, stderr=subprocess.PIPE) for i in range(2)]
    stop, seen, failures = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                seen.add(SamplingPlan.load(path).meta["writer"])
            except Exception as err:
                failures.append(err)

    def write(tag):
        plan = _plan(ddpm_schedule, tag)
        for _ in range(25):
            plan.save(path)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(f"thread{i}",)) for i in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
        p.stderr.close()
    stop.set()
    reader.join()
    assert not failures, failures[:3]
    assert seen and seen <= {"start", *(f"thread{i}" for i in range(4)), "process0", "process1"}
    assert SamplingPlan.load(path).meta["writer"] in seen | {"process0", "process1"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temporary left behind


def test_only_a_regular_file_is_ever_replaced(tmp_path, ddpm_schedule):
    from fewstep._util import atomic_write_bytes

    plan = _plan(ddpm_schedule, "x")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match=r"dir.json is a folder; fewstep writes files only over regular files"):
        plan.save(tmp_path / "dir.json")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "link.json").symlink_to(victim)
    with pytest.raises(ValueError, match=r"link.json is a symbolic link"):
        plan.save(tmp_path / "link.json")
    with pytest.raises(ValueError, match="symbolic link"):
        atomic_write_bytes(tmp_path / "link.json", b"x")
    assert victim.read_text() == "keep me" and (tmp_path / "link.json").is_symlink()
    assert plan.save(tmp_path / "ok.json").read_text().startswith("{")
    assert (os.stat(tmp_path / "ok.json").st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's private 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "link.json", "ok.json", "victim.txt"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_save_student_swaps_a_whole_folder_and_refuses_other_targets(tmp_path, ddpm_schedule):
    from fewstep.distill import BoundaryCondition, ConsistencyStudent, MLPNet, load_student, save_student

    def student(seed):
        torch.manual_seed(seed)
        return ConsistencyStudent(MLPNet(dim=8, hidden=16, depth=1, time_embed_dim=8), ddpm_schedule, "sample", BoundaryCondition(-1.0, 10.0, 0.5))

    desc = {"sampler": "cm_multistep", "sampler_options": {}}
    folder = tmp_path / "student"
    save_student(folder, student(0), desc)
    save_student(folder, student(1), desc)  # an existing student folder is replaced as a whole
    loaded = load_student(folder).denoiser.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in student(1).network.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary or old folder left
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"home is not empty and is not a fewstep student folder"):
        save_student(other, student(0), desc)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        save_student(tmp_path / "file", student(0), desc)
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(ValueError, match="is a symbolic link"):
        save_student(tmp_path / "link", student(0), desc)
    assert (other / "notes.txt").read_text() == "mine" and load_student(folder).sampler == "cm_multistep"


# -- distillation run folders ------------------------------------------------------------------------


def _distiller(out, steps=2, resume=None, lr=1e-3, **kw):
    from fewstep.distill import CD, DistillConfig, Distiller, MixtureData, MLPNet
    from fewstep.eval.exact import default_schedule

    gm = small_mixture()
    torch.manual_seed(0)
    net = MLPNet(dim=8, hidden=16, depth=1, time_embed_dim=8)
    cfg = DistillConfig(output_dir=out, steps=steps, batch_size=4, lr=lr, checkpoint_every=2, resume=resume, progress=False,
                        log_every=1, cpu=True, **kw)
    return Distiller(CD(num_intervals=4, teacher_sampler="ddim"), MixtureData(gm), gm.denoiser(default_schedule()), net,
                     prediction_type="sample", config=cfg)




def test_a_second_run_in_a_run_folder_is_refused_unless_resumed(tmp_path, one_thread, monkeypatch, capsys):
    out = tmp_path / "out"
    _distiller(out).train()
    with pytest.raises(ValueError, match=r"out holds a distillation run \(checkpoints, metrics.csv, metrics.jsonl, student\); pass resume='latest'"):
        _distiller(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"other is not empty \(data.txt\).*choose another output folder"):
        _distiller(tmp_path / "other")
    assert _distiller(tmp_path / "empty").out.is_dir()  # an empty (or new) folder is fine
    # the command line refuses before loading any model
    from fewstep.cli import main
    from fewstep.models import embedded

    monkeypatch.setattr(embedded, "digits_denoiser", lambda *a, **k: pytest.fail("loaded the teacher before refusing"))
    assert main(["distill", "--steps", "2", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume latest" in err and "--out" in err


def test_a_resume_with_another_learning_rate_says_which_one_it_uses(tmp_path, one_thread):
    out = tmp_path / "out"
    _distiller(out, steps=2, lr=1e-3).train()
    with pytest.warns(UserWarning) as record:
        run = _distiller(out, steps=4, resume="latest", lr=5e-3, seed=1).train()
    messages = [str(w.message) for w in record]
    lr_msg = [m for m in messages if "lr=" in m]
    assert len(lr_msg) == 1 and "lr=0.001" in lr_msg[0] and "lr=0.005" in lr_msg[0] and "checkpoint's lr=0.001 is used" in lr_msg[0]
    assert any("seed=0" in m and "seed=1" in m and "this run uses seed=1" in m for m in messages)
    assert {row["lr"] for row in run.history if "lr" in row} == {1e-3}  # what was said is what ran
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one row per step, the resumed ones not duplicated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: no message
        _distiller(out, steps=6, resume="latest", lr=1e-3, seed=1).train()


# -- runs that grow and heal ---------------------------------------------------------------------------


def test_raising_num_samples_reuses_the_samples_already_made(tmp_path, denoiser, reference):
    first = _fid(denoiser, reference, tmp_path / "run", batch_size=8, num_samples=12)
    assert first.generated == 2 * 12
    grown = _fid(denoiser, reference, tmp_path / "run", batch_size=8, num_samples=20)
    assert grown.generated == 2 * 8  # only indices 12-19 of each cell
    fresh = _fid(denoiser, reference, tmp_path / "fresh", batch_size=8, num_samples=20)
    for g, f in zip(grown.rows, fresh.rows):
        assert g.num_samples == 20 and g.fid == pytest.approx(f.fid, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(grown.features("ddim", 2), fresh.features("ddim", 2), rtol=1e-6, atol=1e-7)
    # asking for fewer reads the first ones, generating nothing
    small = _fid(denoiser, reference, tmp_path / "run", batch_size=8, num_samples=12)
    assert small.generated == 0 and _numbers(small) == _numbers(first)


class _FailsOn:
    """The mixture denoiser, except that it returns NaN for the sample whose starting noise is
    ``bad`` (from its first evaluation) while ``broken`` is set."""

    def __init__(self, inner, bad):
        self.inner, self.schedule, self.bad, self.broken, self.first = inner, inner.schedule, bad, True, None

    def __call__(self, x, t):
        out = self.inner(x, t)
        if self.broken:
            hit = (x.reshape(x.shape[0], -1) == self.bad.reshape(1, -1)).all(dim=1)
            out = torch.where(hit.view(-1, *[1] * (x.ndim - 1)), torch.full_like(out, float("nan")), out)
        return out


def test_an_error_cell_names_the_sample_and_is_retried_in_the_same_folder(tmp_path, denoiser, reference):
    from fewstep.eval.fid import sample_noise

    den = _FailsOn(denoiser, sample_noise(0, 5, 6, (1, 8, 8))[0].double())
    table = _fid(den, reference, tmp_path / "run", batch_size=4, num_samples=12)
    assert all("sample 5 (noise seed 0) goes non-finite" in r.error and "retry_errors=True" in r.error for r in table.rows)
    record = json.loads((tmp_path / "run" / "cells" / "ddim-nfe2" / "error.json").read_text())
    assert record["sample"] == 5 and record["batch"] == [4, 8]
    den.broken = False  # the cause is fixed
    assert all(r.error for r in _fid(den, reference, tmp_path / "run", batch_size=4, num_samples=12).rows)  # still recorded
    retried = _fid(den, reference, tmp_path / "run", batch_size=4, num_samples=12, retry_errors=True)
    assert not any(r.error for r in retried.rows) and retried.generated == 2 * 8  # batches [4, 12) of each cell
    fresh = _fid(denoiser, reference, tmp_path / "fresh", batch_size=4, num_samples=12)
    assert [r.fid for r in retried.rows] == pytest.approx([r.fid for r in fresh.rows], rel=1e-9)
    assert not (tmp_path / "run" / "cells" / "ddim-nfe2" / "error.json").exists()


def test_the_report_exits_non_zero_when_every_cell_failed(tmp_path, monkeypatch, capsys):
    from fewstep.cli import main

    (tmp_path / "nan_model.py").write_text(
        "import torch\n"
        "from fewstep.eval.exact import default_schedule\n"
        "class Den:\n"
        "    schedule = default_schedule()\n"
        "    sample_shape = (1, 8, 8)\n"
        "    def __call__(self, x, t):\n"
        "        return x * float('nan')\n"
        "den = Den()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["report", "--model", "nan_model:den", "--reference", "digits:test", "--no-exact", "--samplers", "ddim,dpmpp_2m",
            "--nfe", "2", "--num-samples", "8", "--quiet", "--out", str(tmp_path / "rep"), "--ode-reference", "dpmpp_3m:4"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "every cell of the FID study failed" in err and "report.md" in err
    assert "sample 0 (noise seed 0) goes non-finite" in (tmp_path / "rep" / "report.md").read_text()
