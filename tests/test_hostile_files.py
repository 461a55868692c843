"""Files from others never run code: a pickle whose ``__reduce__`` would write a marker file is put
in every file a user may receive (a checkpoint folder, a student or teacher folder, ``--data``, a
reference-statistics ``.npz``, an FID chunk, a plan JSON), and each test proves the marker is never
written and the error (or the warning, where the file is redone) names the file and what to do."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_job import small_mixture  # noqa: E402


class Payload:
    """Unpickling this calls ``exec``, which writes ``marker``: what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


def accelerate_version() -> tuple[int, ...]:
    import accelerate

    return tuple(int(p) for p in accelerate.__version__.split(".")[:2])


def test_the_payload_runs_when_unpickled_so_the_tests_would_see_it(tmp_path, marker):
    """The control: a plain unpickle (and accelerate's custom-checkpoint loader, which uses
    ``weights_only=False``) does run the payload, so its absence below means fewstep refused it."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "payload ran"
    marker.unlink()
    import inspect

    from accelerate.checkpointing import load_custom_state

    try:
        from accelerate.utils.other import load  # accelerate >= 0.31; older ones call torch.load directly
    except ImportError:
        load = torch.load

    torch.save({"x": Payload(marker)}, tmp_path / "custom_checkpoint_0.pkl")
    # recent accelerate loads registered objects with weights_only=False (older ones with torch's default)
    unsafe = "weights_only=False" in inspect.getsource(load_custom_state)
    assert unsafe or accelerate_version() < (1, 0)
    load(str(tmp_path / "custom_checkpoint_0.pkl"), map_location="cpu", weights_only=False)
    assert marker.exists()  # such a load runs it: fewstep must never let accelerate see such a file


# -- a distillation run: checkpoint folder and student folder ---------------------------------------


def _distiller(out, steps=2, resume=None, lr=1e-3, **kw):
    from fewstep.distill import CD, DistillConfig, Distiller, MixtureData, MLPNet
    from fewstep.eval.exact import default_schedule

    gm = small_mixture()
    torch.manual_seed(0)
    net = MLPNet(dim=8, hidden=16, depth=1, time_embed_dim=8)
    cfg = DistillConfig(output_dir=out, steps=steps, batch_size=4, lr=lr, checkpoint_every=2, keep_checkpoints=5, resume=resume,
                        progress=False, log_every=1, cpu=True, **kw)
    return Distiller(CD(num_intervals=4, teacher_sampler="ddim"), MixtureData(gm), gm.denoiser(default_schedule()), net,
                     prediction_type="sample", config=cfg)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("run") / "out"
        _distiller(out).train()
    finally:
        torch.set_num_threads(n)
    return out


def _copy_checkpoint(finished_run, tmp_path) -> Path:
    ckpt = tmp_path / "given" / "checkpoint-0000002"
    shutil.copytree(finished_run / "checkpoints" / "checkpoint-0000002", ckpt)
    return ckpt


def test_checkpoints_hold_no_pickled_objects(finished_run):
    """fewstep's checkpoint: safetensors and JSON for its own state, accelerate's torch.save files
    for the optimizer, LR schedule and RNG states (verified before loading), no custom pickle."""
    ckpt = finished_run / "checkpoints" / "checkpoint-0000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ema.safetensors", "fewstep_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl",
                     "sampling_ema.safetensors", "scheduler.bin"]
    state = json.loads((ckpt / "fewstep_state.json").read_text())
    assert state["format"] == "fewstep-checkpoint/1" and state["step"] == 2 and state["ema"] is True
    from fewstep.distill.checkpoint import verify_checkpoint

    assert verify_checkpoint(ckpt, ema=True, fsdp=False, objective="cd")["step"] == 2


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_a_crafted_checkpoint_file_is_refused_before_it_is_loaded(finished_run, tmp_path, marker, name):
    ckpt = _copy_checkpoint(finished_run, tmp_path)
    torch.save({"state": Payload(marker), "step": 2}, ckpt / name)
    with pytest.raises(ValueError) as err:
        _distiller(tmp_path / "new", resume=str(ckpt))
    msg = str(err.value)
    assert str(ckpt / name) in msg and not marker.exists()
    if name.startswith("custom_checkpoint"):
        assert "weights_only=False" in msg and "new run" in msg
    else:
        assert re.search(r"refers to (builtins\.)?exec\b", msg) and "nothing from it was run" in msg and "new run in another output folder" in msg
    assert not (tmp_path / "new" / "checkpoints").exists()  # refused in Distiller(...), before any training


def test_a_raw_pickle_in_place_of_a_torch_file_is_refused(finished_run, tmp_path, marker):
    ckpt = _copy_checkpoint(finished_run, tmp_path)
    (ckpt / "optimizer.bin").write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(ValueError, match="optimizer.bin is not a torch.save zip archive"):
        _distiller(tmp_path / "new", resume=str(ckpt))
    assert not marker.exists()


def test_a_checkpoint_without_fewstep_state_or_with_a_sharded_folder_is_refused(finished_run, tmp_path):
    ckpt = _copy_checkpoint(finished_run, tmp_path)
    (ckpt / "fewstep_state.json").write_text('{"format": "fewstep-checkpoint/1", "step": "2"}')
    with pytest.raises(ValueError, match=r"fewstep_state.json is not a fewstep checkpoint state: 'step' is '2'"):
        _distiller(tmp_path / "new", resume=str(ckpt))
    (ckpt / "fewstep_state.json").unlink()
    with pytest.raises(ValueError, match="fewstep_state.json is missing"):
        _distiller(tmp_path / "new", resume=str(ckpt))
    ckpt = _copy_checkpoint(finished_run, tmp_path / "b")
    (ckpt / "pytorch_model_fsdp_0").mkdir()
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match=r"\.metadata belongs to a torch.distributed.checkpoint.*FULL_STATE_DICT"):
        _distiller(tmp_path / "new", resume=str(ckpt))


def test_resuming_from_a_checkpoint_elsewhere_is_verified_and_exact(finished_run, tmp_path):
    """A verified checkpoint resumes: the EMA target comes back from ema.safetensors exactly, so
    2 + 2 steps end on the weights of 4 uninterrupted steps."""
    from safetensors.torch import load_file

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = _copy_checkpoint(finished_run, tmp_path)
        resumed = _distiller(tmp_path / "resumed", steps=4, resume=str(ckpt)).train()
        straight = _distiller(tmp_path / "straight", steps=4).train()
    finally:
        torch.set_num_threads(n)
    assert resumed.resumed_from == ckpt and resumed.step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "resumed" / "checkpoints" / "checkpoint-0000004" / name))
        b = load_file(str(tmp_path / "straight" / "checkpoints" / "checkpoint-0000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_student_folder_with_pickled_weights_gets_one_message(finished_run, tmp_path, marker):
    from fewstep.distill import load_student

    student = tmp_path / "student"
    shutil.copytree(finished_run / "student", student)
    assert load_student(student).sampler == "cm_multistep"  # the folder as saved loads
    (student / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, student / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load_student(student)
    msg = str(err.value)
    assert "diffusion_pytorch_model.bin" in msg and str(student / "unet") in msg and "safe_serialization=True" in msg
    assert not marker.exists()
    (student / "fewstep_student.json").write_text('{"format": 1, "network": "x"}')
    with pytest.raises(ValueError, match="fewstep_student.json is not a valid fewstep student description"):
        load_student(student)


def _pickled_pipeline(folder: Path, marker: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": Payload(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")


def test_teacher_and_report_model_folders_with_pickled_weights_are_refused(tmp_path, marker, capsys):
    """`fewstep distill --teacher`, `--student` and `fewstep report --model` refuse a pickled
    ``.bin`` with the one message, before loading anything."""
    from fewstep.cli import main
    from fewstep.eval.model_spec import resolve_model

    pipe = tmp_path / "pipe"
    _pickled_pipeline(pipe, marker)
    with pytest.raises(ValueError, match=r"pipeline component 'unet'.*diffusion_pytorch_model.bin: a pickle.*safetensors"):
        resolve_model(str(pipe))
    torch.save(torch.zeros(4, 1, 8, 8), tmp_path / "data.pt")
    assert main(["distill", "--teacher", str(pipe), "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the teacher's UNet folder" in err and "diffusion_pytorch_model.bin" in err and "save_pretrained" in err
    assert main(["distill", "--student", str(pipe / "unet"), "--steps", "1", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--student" in err and "diffusion_pytorch_model.bin" in err
    assert not marker.exists()


# -- --data files ------------------------------------------------------------------------------------


def test_data_files_are_loaded_without_running_code(tmp_path, marker, capsys):
    from fewstep.distill.data import load_data_file

    good = torch.rand(4, 1, 8, 8)
    torch.save({"data": good, "labels": torch.arange(4), "uncond": {"labels": torch.zeros(1)}}, tmp_path / "good.pt")
    data, cond, uncond = load_data_file(tmp_path / "good.pt")
    assert torch.equal(data, good) and set(cond) == {"labels"} and set(uncond) == {"labels"}
    torch.save({"data": good, "extra": Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_data_file(tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in str(err.value) and "torch.save(images, path)" in str(err.value)
    torch.save({"data": good, "labels": [1, 2, 3, 4]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"'labels' must be tensors"):
        load_data_file(tmp_path / "list.pt")
    np.save(tmp_path / "bad.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"bad.npy is not a readable .npy array of numbers"):
        load_data_file(tmp_path / "bad.npy")
    # and through the command line, with a teacher folder
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    from fewstep.cli import main

    assert main(["distill", "--teacher", str(tmp_path / "pipe"), "--data", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert not marker.exists()


# -- evaluation files ------------------------------------------------------------------------------


def _hostile_npz(path: Path, marker: Path, **arrays) -> None:
    np.savez(path, **arrays, extra=np.array([Payload(marker)], dtype=object))


def test_reference_statistics_with_an_object_array_are_refused_or_recomputed(tmp_path, marker):
    from fewstep.eval.reference import ReferenceStats, reference_stats

    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = reference_stats(images, "digits", cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.npz")
    given = tmp_path / "given.npz"
    _hostile_npz(given, marker, mu=ref.mu, sigma=ref.sigma, num_samples=np.array(12), extractor=np.array("digits"), source=np.array("x"))
    for call in (lambda: ReferenceStats.load(given), lambda: reference_stats(str(given), "digits")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(given) in str(err.value) and "allow_pickle=False" in str(err.value) and "recompute it" in str(err.value)
    # the same file in the cache's place is a damaged cache: recomputed, with a warning naming it
    shutil.copy(given, cached)
    with pytest.warns(UserWarning, match=rf"damaged, recomputing.*{cached.name}"):
        again = reference_stats(images, "digits", cache_dir=tmp_path / "cache")
    assert np.array_equal(again.mu, ref.mu) and "extra" not in np.load(cached).files
    assert not marker.exists()


def _fid_kwargs(tmp_path, **kw):
    from fewstep.eval.reference import reference_stats

    ref = reference_stats(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, "digits", cache_dir=False)
    return dict(shape=(1, 8, 8), samplers=["ddim"], nfes=[2], reference=ref, num_samples=12, batch_size=4, model_id="mixture",
                progress=False, kid_subsets=2, kid_subset_size=6, **kw)


def test_an_fid_chunk_with_an_object_array_is_redone(tmp_path, marker, digits_mixture, ddpm_schedule):
    from fewstep.eval.fid import fid_per_nfe

    den = digits_mixture.denoiser(ddpm_schedule)
    first = fid_per_nfe(den, run_dir=tmp_path / "run", **_fid_kwargs(tmp_path))
    chunk = tmp_path / "run" / "cells" / "ddim-nfe2" / "chunk_00000004_00000008.npz"
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    _hostile_npz(chunk, marker, **arrays)
    with pytest.warns(UserWarning, match=rf"{chunk.name}: it cannot be read.*Object arrays.*generated again"):
        again = fid_per_nfe(den, run_dir=tmp_path / "run", **_fid_kwargs(tmp_path))
    assert again.generated == 4 and again.row("ddim", 2).fid == first.row("ddim", 2).fid
    assert not marker.exists()


# -- plan JSON -------------------------------------------------------------------------------------------


@pytest.fixture
def plan_dict(ddpm_schedule):
    from fewstep.samplers.core import prepare
    from fewstep.samplers.plan import SamplingPlan

    prog = prepare("ddim", 3, ddpm_schedule)
    return SamplingPlan("ddim", 3, prog.grid.tolist(), {}, ddpm_schedule.config(), list(prog.eval_times)).to_dict()


def _set(d, key, value):
    d = json.loads(json.dumps(d))
    d[key] = value
    return d


@pytest.mark.parametrize(
    "mutate, cause",
    [
        (lambda d: _set(d, "nfe", "3"), "nfe must be a positive integer"),
        (lambda d: _set(d, "nfe", True), "nfe must be a positive integer"),
        (lambda d: _set(d, "grid", "0.5,0.2"), "grid must be a list of numbers"),
        (lambda d: _set(d, "grid", [999, "x", 0]), "grid must be a list of numbers, found 'x'"),
        (lambda d: _set(d, "grid", [999, float("nan"), -1]), "grid must hold at least two finite times"),
        (lambda d: _set(d, "eval_times", [999.0]), "has 3 evaluation times, got 1"),
        (lambda d: _set(d, "options", ["eta", 1]), "options must be a JSON object"),
        (lambda d: _set(d, "schedule", {"type": "nope"}), "schedule is not a fewstep schedule config"),
        (lambda d: _set(d, "sampler", "ddimm"), "unknown sampler 'ddimm'"),
        (lambda d: _set(d, "sampler", {"__reduce__": "os.system"}), "sampler must name a registered sampler"),
        (lambda d: _set(d, "table", [["1", 0, 0, 0]] * 4), "row 0 of the coefficient table must be a list of numbers"),
        (lambda d: _set(d, "format", "fewstep-plan/0"), "format 'fewstep-plan/0'"),
        (lambda d: _set(d, "py/object", "os.system"), "unexpected keyword argument 'py/object'"),
        (lambda d: [d], "not a fewstep sampling plan"),
    ],
)
def test_a_malformed_plan_is_refused_naming_the_file_and_the_field(tmp_path, plan_dict, mutate, cause):
    from fewstep.samplers.plan import SamplingPlan

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(mutate(plan_dict)))
    with pytest.raises(ValueError) as err:
        SamplingPlan.load(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and cause in msg and "fewstep tune --out" in msg


def test_a_plan_that_is_not_json_is_refused(tmp_path, plan_dict):
    from fewstep.samplers.plan import SamplingPlan

    path = tmp_path / "plan.json"
    text = json.dumps(plan_dict)
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"{path.name} is not a sampling plan \(not valid JSON"):
        SamplingPlan.load(path)
    path.write_bytes(pickle.dumps(plan_dict))
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingPlan.load(path)
    path.write_text(json.dumps(plan_dict))
    assert SamplingPlan.load(path).to_dict() == plan_dict  # the plan itself is fine
