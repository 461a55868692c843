"""Train the embedded digits UNet shipped in ``fewstep/models/data/digits_unet/``.

    python scripts/train_digits_unet.py [--steps 6000] [--threads 2] [--out FOLDER]

A diffusers ``UNet2DModel`` (architecture: :func:`fewstep.models.embedded.digits_unet_config`)
trained with DDPM's noise-prediction loss (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models", eq. 14, the "simple" loss) under the linear schedule of
:func:`fewstep.models.embedded.digits_scheduler`, on the train split of scikit-learn's 8x8 digits
(1438 images in [-1, 1]).  AdamW with warm-up and cosine decay; the shipped weights are an
exponential moving average of the parameters.  Deterministic (seed 0), CPU only.

Progress lines give the loss and, every ``--eval-every`` steps, the FID on the digit features of
500 samples (``dpmpp_2m``, 20 NFE) against the test split.  At the end it prints the final metrics:
the FID of ``--eval-samples`` samples at a large NFE against the test split, next to the data's own
train-vs-test FID, and saves the weights in diffusers format (``config.json`` +
``diffusion_pytorch_model.safetensors``, float32) into ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

import fewstep
from fewstep.eval.features import digits_features
from fewstep.eval.frechet import frechet_distance_from_features
from fewstep.models.diffusers_models import DiffusersDenoiser
from fewstep.models.embedded import digits_images, digits_scheduler, digits_unet_config

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fewstep" / "models" / "data" / "digits_unet"


def sample_fid(model: torch.nn.Module, num: int, sampler: str, nfe: int, test_features: torch.Tensor, extractor, seed: int = 1) -> float:
    """FID (digit features) of ``num`` samples against the test split's features."""
    den = DiffusersDenoiser(model, digits_scheduler())
    noise = torch.randn(num, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = torch.cat([fewstep.sample(den, noise[i : i + 250], sampler, nfe) for i in range(0, num, 250)])
    return frechet_distance_from_features(extractor(x), test_features)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (what training.json records)."""
    root = DEFAULT_OUT.parents[3]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def save(model: torch.nn.Module, out: Path, meta: dict) -> None:
    """Write ``model`` in diffusers format into ``out``, replacing it atomically, with ``meta`` as
    ``training.json``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits_unet-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    tmp.chmod(0o755)
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between quick FID checks (0: none)")
    p.add_argument("--eval-samples", type=int, default=1438, help="samples for the final FID")
    p.add_argument("--eval-nfe", type=int, default=100, help="NFE of the final FID (dpmpp_2m)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--save-every-eval", action="store_true", help="also save the EMA weights at every FID check")
    p.add_argument("--immiscible", nargs="?", const="exact", choices=["exact", "fp16"], default=None,
                   help="immiscible diffusion (Li et al. 2024): assign each batch's noises to its images by minimum total "
                   "distance (fewstep.distill.NoiseAssignment); the shipped weights were trained without")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    from diffusers import UNet2DModel

    data = digits_images("train")
    test = digits_images("test")
    extractor = digits_features()
    test_features = extractor(test)
    floor = frechet_distance_from_features(extractor(data), test_features)
    print(f"data: {len(data)} train, {len(test)} test images; train-vs-test FID (digit features) {floor:.3f}", flush=True)

    model = UNet2DModel(**digits_unet_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"UNet2DModel: {sum(q.numel() for q in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    acp = digits_scheduler().alphas_cumprod.to(torch.float32)
    assign = None
    if args.immiscible is not None:
        from fewstep.distill.immiscible import NoiseAssignment

        assign = NoiseAssignment(method=args.immiscible)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0 = time.perf_counter()
    running = 0.0
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0 = data[idx]
        t = torch.randint(0, len(acp), (args.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        if assign is not None:
            eps = assign(x0, eps)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        loss = torch.mean((model(a * x0 + s * eps, t).sample - eps) ** 2)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1:5d}/{args.steps}  loss {running:.4f}  lr {lr_at(step):.2e}  {time.perf_counter() - t0:6.0f} s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ema.eval()
            fid = sample_fid(ema, 500, "dpmpp_2m", 20, test_features, extractor)
            print(f"  EMA FID (500 samples, dpmpp_2m 20 NFE, vs test): {fid:.3f}", flush=True)
            if args.save_every_eval:
                save(ema, args.out, {**vars(args), "out": _shown(args.out), "partial_at_step": step + 1, "fid_500_nfe20": round(fid, 4)})
    train_seconds = time.perf_counter() - t0
    ema.eval()

    fid = sample_fid(ema, args.eval_samples, "dpmpp_2m", args.eval_nfe, test_features, extractor)
    n_ref = min(args.eval_samples, len(data))
    floor_n = frechet_distance_from_features(extractor(data[:n_ref]), test_features)
    print(f"final: trained {args.steps} steps in {train_seconds:.0f} s; FID (digit features, vs test split) of "
          f"{args.eval_samples} samples with dpmpp_2m at {args.eval_nfe} NFE: {fid:.3f}; "
          f"train-vs-test FID ({n_ref} train images): {floor_n:.3f}", flush=True)

    save(ema, args.out, {**vars(args), "out": _shown(args.out), "train_seconds": round(train_seconds),
                          "fid_dpmpp_2m": round(fid, 4), "fid_train_vs_test": round(floor_n, 4)})
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
