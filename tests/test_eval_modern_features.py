"""Modern feature spaces and metrics: DINOv2 (dgm-eval's preprocessing) and CLIP (CMMD's) from
local transformers folders, built here as tiny stand-ins with the real classes; the
missing-weights errors; precision/recall and Inception Score against torch-fidelity; CMMD against
the authors' formula on scikit-learn's kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep.eval import features as F
from fewstep.eval.features import WeightsMissing, get_extractor, to_uint8

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (and the 'features' extra)")


def _images(n, c, h, w, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=224)
    d = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(cfg).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=56, patch_size=14, projection_dim=16)
    d = tmp_path_factory.mktemp("clip")
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(d, safe_serialization=True)
    return d


def test_dinov2_features_follow_dgm_eval(dinov2_dir):
    from PIL import Image
    from torchvision import transforms as TF

    ext = get_extractor("dinov2", weights_path=dinov2_dir)
    assert ext.dim == 32 and ext.name.startswith("dinov2-")
    for c in (3, 1):
        x = _images(3, c, 20, 16, seed=c)
        ours = ext(x)
        # dgm-eval's DINOv2Encoder.transform on the PIL images it reads (RGB), then the model's
        # class token after the last layer norm (x_norm_clstoken = pooler_output).
        tf = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                         TF.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        pil = [Image.fromarray(u.permute(1, 2, 0).numpy().squeeze(-1) if c == 1 else u.permute(1, 2, 0).numpy()).convert("RGB")
               for u in to_uint8(x)]
        batch = torch.stack([tf(p) for p in pil])
        with torch.no_grad():
            out = ext.model(pixel_values=batch)
        theirs = out.pooler_output
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)
        # pooler_output is the class token of the final layer-normed sequence (the hub's x_norm_clstoken)
        np.testing.assert_allclose(theirs.numpy(), out.last_hidden_state[:, 0].numpy(), rtol=1e-6, atol=1e-6)


def test_clip_features_follow_cmmd(clip_dir):
    ext = get_extractor("clip", weights_path=clip_dir)
    assert ext.dim == 16 and ext.size == 56 and ext.name.startswith("clip-")
    x = _images(4, 3, 24, 24, seed=2)
    ours = ext(x)
    # google-research cmmd: images in [0, 1] (N, H, W, 3), torch bicubic resize, CLIPImageProcessor
    # without resize / crop / rescale, image_embeds over their norm.
    imgs = (to_uint8(x).to(torch.float32) / 255).permute(0, 2, 3, 1).numpy()
    resized = torch.nn.functional.interpolate(torch.from_numpy(imgs.transpose(0, 3, 1, 2)), size=(56, 56), mode="bicubic")
    proc = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=True)
    inputs = proc(images=list(resized.permute(0, 2, 3, 1).numpy()), return_tensors="pt", input_data_format="channels_last")
    with torch.no_grad():
        emb = ext.model(**inputs).image_embeds
    theirs = emb / emb.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.norm(dim=1), torch.ones(4))
    # A preprocessor_config.json in the folder sets the normalisation.
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    try:
        assert not torch.allclose(get_extractor("clip", weights_path=clip_dir)(x), ours)
    finally:
        (clip_dir / "preprocessor_config.json").unlink()


def test_missing_weights_are_one_clear_error(tmp_path, monkeypatch):
    for kind, env in F.WEIGHTS_ENV.items():
        monkeypatch.delenv(env, raising=False)
        with pytest.raises(WeightsMissing, match=rf"never downloads them.*{env}=FOLDER.*--weights-path"):
            get_extractor(kind)
        monkeypatch.setenv(env, str(tmp_path / "nowhere"))
        with pytest.raises(WeightsMissing, match="is not a folder"):
            get_extractor(kind)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsMissing, match="no .safetensors weights"):
        get_extractor("dinov2", weights_path=pickled)
    assert issubclass(F.InceptionWeightsMissing, WeightsMissing) and issubclass(WeightsMissing, FileNotFoundError)


def test_precision_recall_and_inception_score_equal_torch_fidelity():
    tf_prc = pytest.importorskip("torch_fidelity.metric_prc", reason="torch-fidelity is a dev dependency")
    tf_isc = pytest.importorskip("torch_fidelity.metric_isc")
    from fewstep.eval.inception_score import inception_score
    from fewstep.eval.precision_recall import precision_recall

    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    gen = rng.normal(size=(250, 16)) * 1.3 + 0.2
    p, r = precision_recall(gen, real, k=3)
    theirs_p, theirs_r = tf_prc.calculate_precision_recall_full(torch.from_numpy(gen), torch.from_numpy(real), neighborhood=3)
    assert (p, r) == pytest.approx((theirs_p, theirs_r), abs=1e-7) and 0 < p < 1 and 0 < r < 1  # theirs: a float32 mean
    assert precision_recall(real, real) == (1.0, 1.0)
    logits = rng.normal(size=(500, 10)) * 3
    mean, std = inception_score(logits)
    theirs = tf_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-8)
    assert inception_score(np.zeros((20, 10)))[0] == pytest.approx(1.0)  # no information: IS 1


def test_cmmd_is_the_authors_plugin_estimate():
    from sklearn.metrics.pairwise import rbf_kernel

    from fewstep.eval.cmmd import cmmd
    from fewstep.eval.uncertainty import mmd_replicates

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)) * 5, rng.normal(size=(30, 8)) * 5 + 1
    g = 1 / (2 * 10.0**2)
    theirs = 1000 * (rbf_kernel(x, x, gamma=g).mean() + rbf_kernel(y, y, gamma=g).mean() - 2 * rbf_kernel(x, y, gamma=g).mean())
    assert cmmd(x, y) == pytest.approx(theirs, rel=1e-10) and cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    from fewstep.eval.cmmd import rbf_kernel as ours_kernel

    unbiased = 1000 * mmd_replicates(x, y, np.ones((1, 40)), kernel=ours_kernel)[0]
    assert cmmd(x, y, unbiased=True) == pytest.approx(unbiased, rel=1e-10)


def test_inception_logits_are_the_unbiased_output_layer(tmp_path):
    from fewstep.eval.features import InceptionFeatures
    from fewstep.eval.inception_standin import save_inception_standin

    save_inception_standin(tmp_path / F.INCEPTION_FILE)
    ext = InceptionFeatures("legacy_tensorflow", tmp_path)
    x = _images(4, 3, 32, 32, seed=3)
    with torch.no_grad():
        probs = ext.net(to_uint8(x).to(torch.float32), no_output_bias=True).double().numpy()
    logits = ext.logits_from_features(ext(x).numpy())
    ours = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(ours / ours.sum(1, keepdims=True), probs, rtol=1e-4, atol=1e-6)


def test_extra_metrics_in_the_report(tmp_path):
    from fewstep.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--out", str(out), "--samplers", "ddim", "--nfe", "3", "--num-samples", "40", "--quiet",
                 "--no-exact", "--no-ode", "--metrics", "precision_recall,inception_score", "--bootstrap", "20"]) == 0
    row = json.loads((out / "fid_per_nfe.json").read_text())["rows"][0]
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 1 <= row["inception_score"] <= 10
    md = (out / "report.md").read_text()
    assert "### precision" in md and "### inception_score" in md
    assert main(["report", "--out", str(tmp_path / "r2"), "--no-exact", "--quiet", "--metrics", "presicion"]) == 2
    assert main(["report", "--out", str(tmp_path / "r2"), "--no-exact", "--quiet", "--extractor", "dinov2"]) == 2  # no weights
    assert not (tmp_path / "r2").exists()
