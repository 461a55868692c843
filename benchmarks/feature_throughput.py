"""Inception feature-extraction throughput: fewstep against clean-fid's own ``compute_fid``.

Both compute the FID between two folders of the same PNG images with the same Inception file in
the same process: fewstep through :func:`fewstep.eval.reference.reference_stats` with
:class:`fewstep.eval.features.InceptionFeatures` (images decoded in the main process, clean mode's
PIL resizing on a thread pool), clean-fid through ``cleanfid.fid.compute_fid`` with its
``InceptionV3W`` wrapper passed as ``custom_feat_extractor`` (exactly the model clean-fid builds
itself, minus its download step) and a DataLoader with ``--workers`` processes for decoding and
resizing.  Prints, for each: feature-extraction throughput including the features' mean and covariance
(images per second; for clean-fid its ``get_folder_features`` and ``numpy.cov``, the part of
``compute_fid`` before the distance), the time of the Fréchet
distance on 2048-d statistics (ours: eigendecompositions and an SVD; clean-fid: ``scipy.linalg.sqrtm``),
and the end-to-end time of the FID between the two folders; then the ratios and both FIDs (they
must agree).

    python benchmarks/feature_throughput.py [--mode clean|legacy_tensorflow] [--num-images 2000]
        [--size 32] [--batch-size 64] [--workers 8] [--device cuda] [--inception-path FILE]

Without the real ``inception-2015-12-05.pt`` (``--inception-path``, ``$FEWSTEP_INCEPTION_PATH`` or
clean-fid's ``/tmp``) it runs on the TorchScript stand-in of
:mod:`fewstep.eval.inception_standin` (same interface, a much cheaper network), so the script is
exercised on any machine; those timings measure the pipelines around the network, not Inception.
The images are scikit-learn's digits, upscaled to ``--size`` and coloured, split into two folders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def write_images(folder: Path, n: int, size: int, offset: int) -> None:
    from PIL import Image

    from fewstep.eval.features import to_uint8
    from fewstep.models.embedded import digits_images

    digits = digits_images()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = (offset + i) % len(digits)
        img = torch.nn.functional.interpolate(digits[k : k + 1], size=(size, size), mode="bilinear", align_corners=False)
        tint = torch.tensor([1.0, 0.6 + 0.4 * ((k % 3) / 2), 0.8])[None, :, None, None]
        rgb = (img.clamp(-1, 1) + 1) * tint - 1
        Image.fromarray(to_uint8(rgb)[0].permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="clean", choices=["clean", "legacy_tensorflow"])
    p.add_argument("--num-images", type=int, default=None, help="images per folder (default: 2000 with the real weights, 64 otherwise)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception-path", default=None)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # torch's TorchScript deprecation, scipy's singular-sqrtm notes

    from cleanfid.fid import compute_fid, get_folder_features
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    from cleanfid.inception_torchscript import InceptionV3W

    from fewstep.eval.features import INCEPTION_FILE, InceptionFeatures, InceptionWeightsMissing, find_inception
    from fewstep.eval.frechet import frechet_distance
    from fewstep.eval.inception_standin import save_inception_standin
    from fewstep.eval.reference import reference_stats

    work = Path(tempfile.mkdtemp(prefix="fewstep-throughput-"))
    try:
        try:
            weights = find_inception(args.inception_path)
            real = True
        except InceptionWeightsMissing:
            weights = Path(save_inception_standin(work / INCEPTION_FILE))
            real = False
            print("no inception-2015-12-05.pt on this machine: timing the TorchScript stand-in (not Inception)")
        n = args.num_images or (2000 if real else 64)
        # clean-fid's wrapper wants the file under its canonical name inside a folder.
        folder = work / "weights"
        folder.mkdir()
        os.symlink(weights.resolve(), folder / INCEPTION_FILE)
        a, b = work / "a", work / "b"
        write_images(a, n, args.size, 0)
        write_images(b, n, args.size, n)
        device = torch.device(args.device)

        ours_ext = InceptionFeatures(args.mode, weights, device, args.batch_size, workers=args.workers)
        theirs_model = InceptionV3W(str(folder), download=False, resize_inside=args.mode == "legacy_tensorflow").to(device).eval()
        warm = torch.zeros(2, 3, args.size, args.size)
        ours_ext(warm)  # load and warm up both networks outside the timings

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        timings: dict[str, dict[str, float]] = {"fewstep": {}, "clean-fid": {}}
        sync()
        t0 = time.perf_counter()
        ra = reference_stats(a, ours_ext, cache_dir=False, batch_size=args.batch_size)
        rb = reference_stats(b, ours_ext, cache_dir=False, batch_size=args.batch_size)
        sync()
        t1 = time.perf_counter()
        fid_ours = frechet_distance(ra.mu, ra.sigma, rb.mu, rb.sigma)
        t2 = time.perf_counter()
        timings["fewstep"] = {"features": t1 - t0, "frechet": t2 - t1, "total": t2 - t0}

        t0 = time.perf_counter()
        fid_theirs = compute_fid(str(a), str(b), mode=args.mode, custom_feat_extractor=theirs_model, device=device,
                                 num_workers=args.workers, batch_size=args.batch_size, verbose=False)
        sync()
        t1 = time.perf_counter()
        # The parts of compute_fid, timed separately on the same folders: features and their mean and
        # covariance (what reference_stats gives), then the distance.
        feats = [get_folder_features(str(f), theirs_model, num_workers=args.workers, batch_size=args.batch_size, device=device,
                                     mode=args.mode, verbose=False) for f in (a, b)]
        stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
        sync()
        t2 = time.perf_counter()
        cleanfid_frechet(*stats[0], *stats[1])
        t3 = time.perf_counter()
        timings["clean-fid"] = {"features": t2 - t1, "frechet": t3 - t2, "total": t1 - t0}

        print(f"{'real Inception' if real else 'stand-in'}, mode {args.mode}, {2 * n} images of {args.size}x{args.size}, "
              f"device {device}, batch {args.batch_size}, {args.workers} workers; FID fewstep {fid_ours:.6f}, "
              f"clean-fid {fid_theirs:.6f} (relative difference {abs(fid_ours - fid_theirs) / max(abs(fid_theirs), 1e-12):.1e})")
        print(f"{'':10s} {'features+stats (img/s)':>23s} {'Frechet (s)':>12s} {'end to end (s)':>15s}")
        for name, t in timings.items():
            print(f"{name:10s} {2 * n / t['features']:23.1f} {t['frechet']:12.2f} {t['total']:15.2f}")
        f, c = timings["fewstep"], timings["clean-fid"]
        print(f"ratio fewstep / clean-fid (time): features {f['features'] / c['features']:.2f}, "
              f"Frechet {f['frechet'] / c['frechet']:.2f}, end to end {f['total'] / c['total']:.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
