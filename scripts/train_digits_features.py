"""Train the digits feature network shipped as ``fewstep/eval/data/digits_features.safetensors``.

    python scripts/train_digits_features.py [--epochs 40] [--out PATH]

A small CNN classifier (:class:`fewstep.eval.features.DigitsFeatureNet`) on the train split of
scikit-learn's 8x8 digits (1438 images; the same split and [-1, 1] scaling as the exact mixture and
the embedded UNet), with random shifts of up to one pixel as augmentation.  Its 64-unit
penultimate layer, scaled so that the train split's mean squared feature is 1, is the feature
space of the digits FID and KID.  Prints train and test accuracy; about a
minute on one CPU core; deterministic (seed 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.eval.features import DigitsFeatureNet
from fewstep.models.mixture import digits_data

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fewstep" / "eval" / "data" / "digits_features.safetensors"


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with background (-1)."""
    n = x.shape[0]
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, None, :, None].expand(n, 1, 8, 8 + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, None, :].expand(n, 1, 8, 8)
    return out.gather(3, cols)


def accuracy(net: DigitsFeatureNet, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    x_tr, y_tr = digits_data("train", return_labels=True)
    x_te, y_te = digits_data("test", return_labels=True)
    x_tr, x_te = x_tr.reshape(-1, 1, 8, 8).float(), x_te.reshape(-1, 1, 8, 8).float()
    net = DigitsFeatureNet()
    steps_per_epoch = (len(x_tr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(x_tr), args.batch_size):
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(net(random_shift(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            net.eval()
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_tr):.4f}  test accuracy {accuracy(net, x_te, y_te):.4f}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    net.eval()
    acc_tr, acc_te = accuracy(net, x_tr, y_tr), accuracy(net, x_te, y_te)
    print(f"final: train accuracy {acc_tr:.4f} ({len(x_tr)} images), test accuracy {acc_te:.4f} ({len(x_te)} images)")

    with torch.no_grad():
        scale = float(net.features(x_tr).pow(2).mean().rsqrt())
    print(f"feature scale (mean squared train feature to 1): {scale:.6g}")

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "width": "32",
        "feature_dim": "64",
        "feature_scale": repr(scale),
        "train_accuracy": f"{acc_tr:.4f}",
        "test_accuracy": f"{acc_te:.4f}",
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "script": "scripts/train_digits_features.py",
    }
    tmp = args.out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
