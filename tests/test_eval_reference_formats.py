"""Standard reference statistics and datasets: clean-fid's (and EDM's) ``{mu, sigma}`` files, zip
archives of images and folders of mixed sizes, all through the TorchScript Inception stand-in that
has the real file's interface."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch

from fewstep.eval import features as F
from fewstep.eval.features import InceptionFeatures, to_uint8
from fewstep.eval.frechet import frechet_distance
from fewstep.eval.inception_standin import save_inception_standin
from fewstep.eval.reference import ReferenceStats, reference_stats


@pytest.fixture(scope="module")
def standin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    save_inception_standin(d / F.INCEPTION_FILE)
    return d


def _save(images, folder, start=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, u in enumerate(to_uint8(images)):
        a = u.permute(1, 2, 0).numpy()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(folder / f"{start + i:03d}.png")


def _images(n, c, h, w, seed):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def cleanfid_here(tmp_path, monkeypatch, standin_dir):
    """clean-fid writing its statistics under tmp_path (not into its package) and building its
    Inception from the stand-in file (never downloading)."""
    import cleanfid
    import cleanfid.fid as cf
    from cleanfid.inception_torchscript import InceptionV3W

    pkg = tmp_path / "cleanfid_pkg"
    pkg.mkdir()
    monkeypatch.setattr(cleanfid, "__file__", str(pkg / "__init__.py"))

    def build(mode, device=torch.device("cpu"), use_dataparallel=True):
        assert mode == "clean"
        return InceptionV3W(str(standin_dir), download=False, resize_inside=False).eval()

    monkeypatch.setattr(cf, "build_feature_extractor", build)
    return cf, pkg / "stats"


def test_cleanfid_custom_stats_give_cleanfids_fid(tmp_path, cleanfid_here, standin_dir):
    cf, stats_dir = cleanfid_here
    _save(_images(24, 3, 16, 16, seed=1), tmp_path / "real")
    _save(_images(20, 3, 16, 16, seed=2) * 0.7, tmp_path / "gen")
    cpu = torch.device("cpu")
    cf.make_custom_stats("fewsteptest", str(tmp_path / "real"), mode="clean", device=cpu, num_workers=0, verbose=False)
    theirs = cf.compute_fid(str(tmp_path / "gen"), dataset_name="fewsteptest", mode="clean", dataset_split="custom",
                            device=cpu, num_workers=0, verbose=False)
    npz = stats_dir / "fewsteptest_clean_custom_na.npz"
    ext = InceptionFeatures("clean", standin_dir)
    with pytest.raises(ValueError, match="holds only mu and sigma.*--extractor"):
        reference_stats(npz, ext)
    ref = reference_stats(npz, ext, foreign=True)
    assert ref.features is None and ref.extractor == ext.name and ref.num_samples == 0 and "KID is unavailable" in ref.note
    gen = reference_stats(tmp_path / "gen", ext, cache_dir=False)
    ours = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    assert ours == pytest.approx(theirs, rel=1e-4)
    # A {mu, sigma} file of another dimension is refused against this extractor.
    np.savez(tmp_path / "small.npz", mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(ValueError, match="5 dimensions.*gives 2048"):
        reference_stats(tmp_path / "small.npz", ext, foreign=True)


def test_a_foreign_reference_in_the_fid_study_has_no_kid(tmp_path, cleanfid_here, standin_dir, digits_mixture, ddpm_schedule):
    from fewstep.eval.fid import fid_per_nfe

    cf, stats_dir = cleanfid_here
    _save(_images(24, 1, 8, 8, seed=3), tmp_path / "real")
    cf.make_custom_stats("fewstepgrey", str(tmp_path / "real"), mode="clean", device=torch.device("cpu"), num_workers=0,
                         verbose=False)
    ext = InceptionFeatures("clean", standin_dir)
    ref = reference_stats(stats_dir / "fewstepgrey_clean_custom_na.npz", ext, foreign=True)
    table = fid_per_nfe(digits_mixture.denoiser(ddpm_schedule), shape=(1, 8, 8), samplers=["ddim"], nfes=[4], reference=ref,
                        extractor=ext, num_samples=16, batch_size=16, progress=False, bootstrap=0, model_id="mixture")
    row = table.rows[0]  # (no bootstrap: 2048-d resamples are what tests/test_eval_uncertainty.py checks at small D)
    assert math.isfinite(row.fid) and math.isnan(row.kid) and math.isnan(row.kid_se) and math.isnan(row.fid_se)
    assert table.reference["has_features"] is False
    with pytest.raises(ValueError, match="precision_recall needs the reference's features"):
        fid_per_nfe(digits_mixture.denoiser(ddpm_schedule), shape=(1, 8, 8), samplers=["ddim"], nfes=[4], reference=ref,
                    extractor=ext, num_samples=16, progress=False, extra_metrics=["precision_recall"])


def test_zip_archives_and_mixed_size_folders_load_as_cleanfid_reads_them(tmp_path, standin_dir):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    folder = tmp_path / "mixed"
    _save(_images(5, 3, 16, 12, seed=4), folder / "a")
    _save(_images(4, 3, 20, 20, seed=5), folder / "b")
    _save(_images(3, 1, 16, 12, seed=6), folder / "c")  # grey: clean-fid converts to RGB, as we do
    ext = InceptionFeatures("clean", standin_dir)
    ref = reference_stats(folder, ext, cache_dir=False)
    assert ref.num_samples == 12 and "in 3 sizes" in ref.note
    # clean-fid's own reading of the folder (each image resized to 299 from its own size), in the
    # same sorted order
    model = InceptionV3W(str(standin_dir), download=False, resize_inside=False)
    theirs = get_folder_features(str(folder), model=model, num_workers=0, batch_size=1, device=torch.device("cpu"),
                                 mode="clean", verbose=False)
    order = np.argsort([str(p.relative_to(folder)) for p in sorted(folder.rglob("*.png"))])
    np.testing.assert_allclose(ref.features, theirs[order], rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
    # The same images in a zip archive (EDM's dataset format) give the same features.
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*.png")):
            z.write(p, str(p.relative_to(folder)))
        z.writestr("notes.txt", "not an image")
    zref = reference_stats(archive, ext, cache_dir=False)
    np.testing.assert_array_equal(zref.features, ref.features)
    assert zref.source.startswith("zip-mixed-") and zref.source != ref.source
    # An extractor of one input size refuses other sizes with its own message.
    with pytest.raises(ValueError, match="8x8 grey"):
        reference_stats(folder, "digits", cache_dir=False)


def test_the_command_line_checks_reference_formats(tmp_path):
    from fewstep.cli import main

    np.savez(tmp_path / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    r = tmp_path / "r"
    assert main(["report", "--reference", str(tmp_path / "edm.npz"), "--model", "embedded", "--no-exact", "--quiet",
                 "--out", str(r)]) == 2
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("x.png", b"not a png")
        z.writestr("y.png", b"not a png")
    assert main(["report", "--reference", str(bad), "--no-exact", "--quiet", "--out", str(r)]) == 2
    assert not r.exists()  # nothing was started


def test_reference_stats_roundtrip_keeps_the_note_out_of_the_file(tmp_path):
    ref = ReferenceStats.from_features(np.random.default_rng(0).normal(size=(10, 3)), "x", "y")
    ref.note = "made some way"
    back = ReferenceStats.load(ref.save(tmp_path / "s.npz"))
    assert back.note == "" and np.array_equal(back.mu, ref.mu) and back.extractor == "x"
