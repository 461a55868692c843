"""Feature extractors: the shipped digits network, Inception through clean-fid from a local file
(a TorchScript stand-in with the real interface), the missing-weights error, user callables;
reference statistics and their cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewstep.eval import features as F
from fewstep.eval.features import (
    CallableFeatures,
    DigitsFeatures,
    InceptionFeatures,
    InceptionWeightsMissing,
    digits_features,
    get_extractor,
    to_uint8,
)
from fewstep.eval.inception_standin import save_inception_standin
from fewstep.eval.reference import ReferenceStats, reference_stats
from fewstep.models.embedded import digits_images


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    save_inception_standin(d / F.INCEPTION_FILE)
    return d


def _random_images(n, c, h, w, seed=0):
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x[:, :, : h // 4] = -1.0  # some flat background, as real images have
    return x


def _save_pngs(images, folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, u in enumerate(to_uint8(images)):
        a = u.permute(1, 2, 0).numpy()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(folder / f"{i:03d}.png")


def test_digits_features_separate_the_classes():
    # The shipped network is a classifier with > 98% test accuracy; its features must carry the
    # class: nearest class mean in feature space on the test split recovers the labels.
    from fewstep.models.mixture import digits_data

    ext = digits_features()
    assert ext.dim == 64 and float(ext.metadata["test_accuracy"]) > 0.98
    x_tr, y_tr = digits_data("train", return_labels=True)
    x_te, y_te = digits_data("test", return_labels=True)
    f_tr, f_te = ext(x_tr.reshape(-1, 1, 8, 8).float()), ext(x_te.reshape(-1, 1, 8, 8).float())
    assert f_tr.shape == (1438, 64) and f_tr.dtype == torch.float32
    assert float(f_tr.pow(2).mean()) == pytest.approx(1.0, rel=1e-3)  # the stored feature scale
    means = torch.stack([f_tr[y_tr == k].mean(0) for k in range(10)])
    pred = torch.cdist(f_te, means).argmin(1)
    assert float((pred == y_te).float().mean()) > 0.95
    # The classifier head agrees with the shipped accuracy.
    with torch.no_grad():
        logits = ext.net(x_te.reshape(-1, 1, 8, 8).float())
    assert float((logits.argmax(1) == y_te).float().mean()) == pytest.approx(float(ext.metadata["test_accuracy"]), abs=1e-3)


def test_digits_features_reject_other_shapes():
    with pytest.raises(ValueError, match="8x8 grey"):
        digits_features()(torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        digits_features()(np.zeros((2, 1, 8, 8)))


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_inception_features_equal_cleanfid_folder_features(standin_dir, tmp_path, mode):
    # The same images as a tensor (our path) and as PNG files read by clean-fid's own
    # get_folder_features with clean-fid's InceptionV3W wrapper around the same file.
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    for channels in (3, 1):
        images = _random_images(6, channels, 16, 12, seed=channels)
        _save_pngs(images, tmp_path / f"{mode}{channels}")
        ours = InceptionFeatures(mode, standin_dir)(images).numpy()
        model = InceptionV3W(str(standin_dir), download=False, resize_inside=mode == "legacy_tensorflow")
        theirs = get_folder_features(str(tmp_path / f"{mode}{channels}"), model=model, num_workers=0, batch_size=6,
                                     device=torch.device("cpu"), mode=mode, verbose=False)
        assert ours.shape == theirs.shape == (6, 2048)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


def test_inception_modes_differ_and_are_found_by_env(standin_dir, monkeypatch):
    monkeypatch.setenv(F.INCEPTION_ENV, str(standin_dir / F.INCEPTION_FILE))
    images = _random_images(3, 3, 32, 32)
    clean, tf = get_extractor("inception"), get_extractor("inception-tf")
    assert clean.mode == "clean" and tf.mode == "legacy_tensorflow" and clean.name != tf.name
    # Bicubic (PIL) and bilinear (inside the network) resizing give different features.
    assert not torch.allclose(clean(images), tf(images), rtol=1e-3)
    monkeypatch.setenv(F.INCEPTION_ENV, str(standin_dir))  # a folder holding the file works too
    assert InceptionFeatures("clean").path == standin_dir / F.INCEPTION_FILE


def test_missing_inception_weights_error_names_the_file_and_never_downloads(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("fewstep tried to download the Inception weights")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(F, "cleanfid_inception_location", lambda: tmp_path / "nowhere" / F.INCEPTION_FILE)
    with pytest.raises(InceptionWeightsMissing) as err:
        get_extractor("inception")
    msg = str(err.value)
    assert F.INCEPTION_FILE in msg and str(tmp_path / "nowhere" / F.INCEPTION_FILE) in msg
    assert F.INCEPTION_ENV in msg and F.INCEPTION_URL in msg
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "elsewhere.pt"))
    with pytest.raises(InceptionWeightsMissing, match="elsewhere.pt"):
        InceptionFeatures("legacy_tensorflow")
    # A truncated download is a clear error too, not a crash deep inside torch.
    bad = tmp_path / F.INCEPTION_FILE
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a loadable TorchScript"):
        InceptionFeatures("clean", path=bad)
    with pytest.raises(ValueError, match="did you mean 'clean'"):
        InceptionFeatures("claen", path=bad)


def test_callable_and_named_extractors():
    fn = lambda x: x.flatten(1)[:, :5] * 2  # noqa: E731
    ext = get_extractor(fn)
    assert isinstance(ext, CallableFeatures)
    x = _random_images(4, 1, 8, 8)
    assert torch.equal(ext(x), x.flatten(1)[:, :5] * 2)
    assert isinstance(get_extractor("fewstep.eval.features:DigitsFeatures"), DigitsFeatures)
    with pytest.raises(ValueError, match="one feature vector per image"):
        CallableFeatures(lambda x: x[:1].flatten(1))(x)
    with pytest.raises(ValueError, match="did you mean 'digits'"):
        get_extractor("digit")
    with pytest.raises(ValueError, match="cannot import module"):
        get_extractor("no_such_module_xyz:f")


def test_reference_stats_sources_agree_and_are_cached(tmp_path):
    # The digits test split as a named source, as a tensor and as a folder of PNGs gives the same
    # statistics (the digits' 17 grey levels survive 8-bit quantisation only approximately, so the
    # folder is compared through its own decoded tensor).
    ext = digits_features()
    test = digits_images("test")
    named = reference_stats("digits:test", ext, cache_dir=tmp_path / "cache")
    assert named.num_samples == 359 and named.features.shape == (359, 64)
    f = ext(test).double().numpy()
    np.testing.assert_allclose(named.mu, f.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(named.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-12)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith(ext.name + "__digits-test-n359")
    again = reference_stats("digits:test", ext, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.sigma, named.sigma)

    _save_pngs(test[:50], tmp_path / "pngs")
    from fewstep.eval.reference import image_files, load_images

    decoded = load_images(image_files(tmp_path / "pngs"))
    assert decoded.shape == (50, 1, 8, 8) and torch.equal(to_uint8(decoded), to_uint8(test[:50]))
    from_folder = reference_stats(tmp_path / "pngs", ext, cache_dir=tmp_path / "cache")
    from_tensor = reference_stats(decoded, ext, cache_dir=False)
    np.testing.assert_array_equal(from_folder.mu, from_tensor.mu)
    assert from_folder.num_samples == 50 and "folder-pngs" in from_folder.source
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and not list((tmp_path / "cache").glob("*.tmp"))

    saved = named.save(tmp_path / "ref.npz")
    loaded = reference_stats(saved, ext)
    np.testing.assert_array_equal(loaded.sigma, named.sigma)
    with pytest.raises(ValueError, match="computed with extractor"):
        ReferenceStats.load(saved).check_extractor(CallableFeatures(lambda x: x.flatten(1), name="other"))
    with pytest.raises(ValueError, match="neither a folder"):
        reference_stats(tmp_path / "missing", ext, cache_dir=False)
