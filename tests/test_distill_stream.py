"""Streaming image-text data: positions shared out over ranks (never the same example twice in an
epoch, the same stream for any number of processes), DataLoader workers giving what a direct read
gives, a stopped run resuming at the same position with the same weights, changed data refused on
resume, and the three sources (folder, webdataset-layout tar shards, map-style datasets)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import load_file

import tiny_pipelines as tp
from fewstep.distill import LCD, Distiller, DistillConfig
from fewstep.distill.encode import PipelineEncoder
from fewstep.distill.stream import HFImageText, ImageTextData, ImageTextFolder, TarShards
from fewstep.models import DiffusersDenoiser


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = tp.pipeline(root / "pipe")
    return pipe, PipelineEncoder.from_folder(root / "pipe"), root


def _examples(data, rank, world, local, steps, start=0, workers=0):
    it = data.open(rank=rank, world=world, local=local, grad_accum=1, seed=0, start_step=start, num_workers=workers)
    return [next(it)["example"].tolist() for _ in range(steps)]


def test_two_ranks_never_see_the_same_example_in_an_epoch(sd, tmp_path):
    """12 examples, global batch 4 over 2 ranks: in each epoch (3 steps) the two ranks' examples are
    disjoint and together every example once; step by step they are the single process's batch,
    split in rank order; two DataLoader workers give what one process reading directly gives."""
    _, enc, _ = sd
    data = ImageTextData(ImageTextFolder(tp.image_caption_folder(tmp_path / "img")), enc)
    r0, r1 = _examples(data, 0, 2, 2, 6, workers=2), _examples(data, 1, 2, 2, 6, workers=2)
    one = _examples(data, 0, 1, 4, 6)
    for epoch in range(2):
        a = [i for s in r0[3 * epoch : 3 * epoch + 3] for i in s]
        b = [i for s in r1[3 * epoch : 3 * epoch + 3] for i in s]
        assert not set(a) & set(b) and sorted(a + b) == list(range(12))
    assert [x + y for x, y in zip(r0, r1)] == one
    assert r0[:3] != r0[3:]  # each epoch its own order
    direct = data.read(range(2), 0)
    through = next(data.open(rank=0, world=2, local=2, grad_accum=1, seed=0, start_step=0, num_workers=2))
    assert torch.equal(direct["pixels"], through["pixels"]) and direct["caption"] == through["caption"]
    assert _examples(data, 1, 2, 2, 2, start=4) == r1[4:6]  # a stream opened at a later step continues it


def _lcd_run(out, data, pipe, steps, **kw):
    cfg = DistillConfig(output_dir=out, steps=steps, batch_size=4, lr=1e-4, progress=False, checkpoint_every=3, num_workers=2,
                        cpu=True, log_every=1, **kw)
    return Distiller(LCD(num_ddim_steps=10, guidance_range=(2.0, 6.0)), data, DiffusersDenoiser(pipe.unet, pipe.scheduler),
                     guidance_embedding_dim=32, config=cfg)


def test_a_stopped_run_resumes_at_the_same_stream_position(sd, tmp_path, one_thread):
    """LCD from image-caption files: a run that dies at step 5 (after its checkpoint at step 3,
    which records stream position 12 = epoch 1) and is resumed ends, at step 6, with exactly the
    weights (and sampling EMA) of an uninterrupted run; resuming after the data changed is refused."""
    pipe, enc, _ = sd
    folder = tp.image_caption_folder(tmp_path / "img")
    data = ImageTextData(ImageTextFolder(folder), enc)
    straight = _lcd_run(tmp_path / "straight", data, pipe, 6).train()

    class Stop(Exception):
        pass

    def die(step, loss):
        if step == 5:
            raise Stop

    d = _lcd_run(tmp_path / "killed", data, pipe, 6)
    d.callback = die
    with pytest.raises(Stop):
        d.train()
    state = json.loads((tmp_path / "killed" / "checkpoints" / "checkpoint-0000003" / "fewstep_state.json").read_text())
    assert state["data"]["position"] == 12 and state["data"]["epoch"] == 1 and state["data"]["examples"] == 12
    resumed = _lcd_run(tmp_path / "killed", data, pipe, 6, resume="latest").train()
    assert resumed.resumed_from.name == "checkpoint-0000003"
    a = load_file(str(tmp_path / "straight" / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[3:] == resumed.losses
    (folder / "999.png").write_bytes((folder / "000.png").read_bytes())
    (folder / "999.txt").write_text("a photo of a cat")
    with pytest.raises(ValueError, match="training data changed since the checkpoint"):
        _lcd_run(tmp_path / "killed", ImageTextData(ImageTextFolder(folder), enc), pipe, 9, resume="latest").train()


def test_tar_shards_and_map_style_datasets_read_what_the_folder_holds(tmp_path):
    """Webdataset-layout shards (``<key>.png`` + ``<key>.txt``, split over two tar files) and a
    map-style dataset give, index by index, the folder's bytes and captions; a key without a
    caption, a compressed shard and a streaming (iterable-only) dataset are refused clearly."""
    folder = ImageTextFolder(tp.image_caption_folder(tmp_path / "img", n=5))
    for k, ids in enumerate(([0, 1, 2], [3, 4])):
        with tarfile.open(tmp_path / f"shard-{k}.tar", "w") as tar:
            for i in ids:
                image, caption = folder.read(i)
                for name, payload in ((f"sub/{i:03d}.png", image), (f"sub/{i:03d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    shards = TarShards(tmp_path)
    assert len(shards) == 5 and all(shards.read(i) == folder.read(i) for i in range(5))
    rows = [{"image": {"bytes": folder.read(i)[0]}, "text": folder.read(i)[1]} for i in range(5)]
    hf = HFImageText(rows, fingerprint="rows-v1")
    assert all(hf.read(i) == folder.read(i) for i in range(5)) and hf.fingerprint() == "hf:rows-v1:5"
    with tarfile.open(tmp_path / "bad" / "x.tar" if (tmp_path / "bad").mkdir() is None else None, "w") as tar:
        info = tarfile.TarInfo("k.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="has an image but no caption"):
        TarShards(tmp_path / "bad")
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("k.txt"), io.BytesIO(b""))
    with pytest.raises(ValueError, match="not a readable uncompressed tar shard"):
        TarShards(tmp_path / "gz.tar")
    with pytest.raises(ValueError, match="no random access"):
        HFImageText(iter(rows))
    (tmp_path / "img" / "lonely.png").write_bytes(folder.read(0)[0])
    with pytest.raises(ValueError, match="1 image.s. have no caption file.*lonely.png"):
        ImageTextFolder(tmp_path / "img")


def test_a_latent_shard_index_from_others_cannot_point_outside_its_folder(tmp_path):
    """``index.json`` is checked field by field; a shard name with a path (``../``) is refused
    before anything is opened, and a malformed index names the file and the fix."""
    from fewstep.distill.stream import LATENT_FORMAT, LatentShards

    (tmp_path / "outside.safetensors").write_bytes(b"x")
    folder = tmp_path / "lat"
    folder.mkdir()
    index = {"format": LATENT_FORMAT, "examples": 1, "shape": [4, 8, 8], "keys": ["latents"],
             "shards": [{"file": "../outside.safetensors", "count": 1}]}
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names the shard '../outside.safetensors', which is not a file in"):
        LatentShards(folder)
    (folder / "index.json").write_text(json.dumps({**index, "format": "other"}))
    with pytest.raises(ValueError, match="not a fewstep latent-shard index.*precompute"):
        LatentShards(folder)
