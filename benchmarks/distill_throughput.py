"""Training throughput of latent consistency distillation (LCD): fewstep's trainer against a plain
loop written the way diffusers' LCM distillation example writes it, measured in the same run.

    python benchmarks/distill_throughput.py                 # GPU if present (SD-sized), else a tiny CPU config
    python benchmarks/distill_throughput.py --config sd --batch-size 8 --steps 20

Model: a randomly initialised ``UNet2DConditionModel`` with Stable Diffusion 1.5's architecture
(latent 4x64x64, text states 77x768) as teacher, its copy with a 256-d guidance embedding as
student, an EMA target; ``--config tiny`` is a small UNet (latent 4x16x16) for CPUs.  Variants:
fp32, bf16 autocast, bf16 + gradient checkpointing, torch.compile (bf16 on GPU, fp32 on CPU), and
xformers attention (bf16) when xformers is installed; attention is SDPA otherwise.

Each (variant, implementation) runs in its own process: ``--warmup`` steps, then ``--steps``
timed steps.  Reported: training steps per second and peak memory (``torch.cuda.max_memory_allocated``
on GPU, peak resident set size of the process on CPU), and the ratio fewstep / plain loop.

The plain loop (``plain_step``) is what the diffusers example does per step: sample a DDIM-grid
index and guidance scale, noise the latents, one student forward with c_skip/c_out, two teacher
forwards (conditional and unconditional) and a DDIM step under ``no_grad``, one target forward,
Huber loss, backward, clipping, AdamW, EMA update.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shutil
import subprocess
import sys
import time

import torch

VARIANTS = ("fp32", "bf16", "bf16+ckpt", "compile", "xformers")


def make_unet(config: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if config == "sd":  # Stable Diffusion 1.5's UNet
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        ), (4, 64, 64), (77, 768)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    ), (4, 16, 16), (8, 32)


def settings(variant: str, device: str) -> dict:
    return {
        "fp32": {"precision": "no"},
        "bf16": {"precision": "bf16"},
        "bf16+ckpt": {"precision": "bf16", "gradient_checkpointing": True},
        "compile": {"precision": "bf16" if device == "cuda" else "no", "compile": True},
        "xformers": {"precision": "bf16", "attention": "xformers"},
    }[variant]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_fewstep(args, device: str) -> list[float]:
    from diffusers import DDPMScheduler

    from fewstep.distill import LCD, Distiller, DistillConfig, TensorData
    from fewstep.models import DiffusersDenoiser

    unet, shape, text = make_unet(args.config)
    n = max(args.batch_size * 4, 16)
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(n, *shape, generator=g), {"encoder_hidden_states": torch.randn(n, *text, generator=g)})
    teacher = DiffusersDenoiser(unet.eval(), DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    obj = LCD(uncond={"encoder_hidden_states": torch.zeros(1, *text)}, num_ddim_steps=50)
    s = settings(args.variant, device)
    shutil.rmtree(args.tmp, ignore_errors=True)  # its own scratch folder: a trainer refuses to start a second run in one
    cfg = DistillConfig(output_dir=args.tmp, steps=args.warmup + args.steps, batch_size=args.batch_size, lr=1e-6,
                        checkpoint_every=10**9, progress=False, log_every=10**6, cpu=device == "cpu",
                        attention=s.get("attention", "sdpa"), **{k: v for k, v in s.items() if k != "attention"})
    stamps: list[float] = []

    def tick(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    d = Distiller(obj, data, teacher, guidance_embedding_dim=256, callback=tick, config=cfg)
    d._finish = lambda *a, **k: None  # the timing is about training steps, not writing the student
    d._checkpoint = lambda *a, **k: None
    d.train()
    return stamps


def plain_step_factory(args, device: str):
    """The diffusers-example-style LCD step (one call = one optimizer step)."""
    from diffusers import DDPMScheduler

    from fewstep.distill.student import guidance_embedding

    s = settings(args.variant, device)
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
    unet, shape, text = make_unet(args.config)
    teacher = copy.deepcopy(unet).to(device, dtype).eval().requires_grad_(False)
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(dict(unet.config), time_cond_proj_dim=256)
    student.load_state_dict(unet.state_dict(), strict=False)
    student = student.to(device).train()
    if s.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    if s.get("attention") == "xformers":
        student.enable_xformers_memory_efficient_attention()
        teacher.enable_xformers_memory_efficient_attention()
    target = copy.deepcopy(student).requires_grad_(False)
    fwd = torch.compile(student) if s.get("compile") else student
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = sched.alphas_cumprod.to(device)
    k = 1000 // 50
    ddim_t = torch.arange(1, 51, device=device) * k - 1  # 19, 39, ..., 999
    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    latents = torch.randn(b, *shape, generator=g).to(device)
    ehs = torch.randn(b, *text, generator=g).to(device)
    uncond = torch.zeros(b, *text, device=device)

    def scalings(t):
        u = 10.0 * t.float()
        return 0.25 / (u**2 + 0.25), u / (u**2 + 0.25) ** 0.5

    def bc(v):
        return v.reshape(-1, 1, 1, 1)

    def step() -> None:
        idx = torch.randint(0, 50, (b,), device=device)
        t_start = ddim_t[idx]
        t_end = torch.clamp(t_start - k, min=0)
        noise = torch.randn_like(latents)
        a_s, s_s = bc(ac[t_start].sqrt()), bc((1 - ac[t_start]).sqrt())
        noisy = a_s * latents + s_s * noise
        w = 6.0 + 10.0 * torch.rand(b, device=device)
        w_emb = guidance_embedding(w.cpu(), 256, b).to(device)
        cs_s, co_s = scalings(t_start)
        cs_e, co_e = scalings(t_end)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            eps = fwd(noisy, t_start, timestep_cond=w_emb, encoder_hidden_states=ehs).sample
            pred_x0 = (noisy - s_s * eps.float()) / a_s
            model_pred = bc(cs_s) * noisy + bc(co_s) * pred_x0
            with torch.no_grad():
                eps_c = teacher(noisy.to(dtype), t_start, encoder_hidden_states=ehs.to(dtype)).sample.float()
                eps_u = teacher(noisy.to(dtype), t_start, encoder_hidden_states=uncond.to(dtype)).sample.float()
                x0_c, x0_u = (noisy - s_s * eps_c) / a_s, (noisy - s_s * eps_u) / a_s
                wb = bc(w)
                x0_g, eps_g = x0_u + wb * (x0_c - x0_u), eps_u + wb * (eps_c - eps_u)
                a_e, s_e = bc(ac[t_end].sqrt()), bc((1 - ac[t_end]).sqrt())
                x_prev = a_e * x0_g + s_e * eps_g  # the DDIM step
                eps_t = target(x_prev, t_end, timestep_cond=w_emb, encoder_hidden_states=ehs).sample.float()
                target_pred = bc(cs_e) * x_prev + bc(co_e) * (x_prev - s_e * eps_t) / a_e
        loss = (torch.sqrt((model_pred.float() - target_pred.float()) ** 2 + 0.001**2) - 0.001).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 0.05)

    return step


def run_plain(args, device: str) -> list[float]:
    step = plain_step_factory(args, device)
    stamps = []
    for _ in range(args.warmup + args.steps):
        step()
        _sync(device)
        stamps.append(time.perf_counter())
    return stamps


def one(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = (run_fewstep if args.impl == "fewstep" else run_plain)(args, device)
    timed = stamps[args.warmup - 1 :] if args.warmup else stamps
    sps = (len(timed) - 1) / (timed[-1] - timed[0])
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": args.variant, "impl": args.impl, "steps_per_s": sps, "peak_gib": mem, "device": device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=["sd", "tiny"], default=None, help="default: sd on a GPU, tiny on a CPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: %(default)s; the CPU may be shared)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/fewstep-distill-bench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    args.config = args.config or ("sd" if gpu else "tiny")
    args.batch_size = args.batch_size or (8 if args.config == "sd" else 4)
    args.steps = args.steps or (20 if gpu else 8)
    if args.variant:  # a child process: one measurement, as JSON
        torch.set_num_threads(args.threads)
        print(json.dumps(one(args)))
        return 0
    try:
        import xformers  # noqa: F401

        have_xformers = gpu
    except ImportError:
        have_xformers = False
    device = torch.cuda.get_device_name() if gpu else f"CPU ({args.threads} thread(s))"
    print(f"LCD training throughput, {args.config} UNet, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, {device}, torch {torch.__version__}")
    print(f"{'variant':<10} {'fewstep steps/s':>15} {'plain steps/s':>14} {'ratio':>6} {'fewstep peak':>13} {'plain peak':>11}")
    rows = []
    for variant in args.variants.split(","):
        if variant == "xformers" and not have_xformers:
            print(f"{variant:<10} not installed (or no GPU): attention runs on PyTorch SDPA")
            continue
        res = {}
        for impl in ("fewstep", "plain"):
            cmd = [sys.executable, __file__, "--variant", variant, "--impl", impl, "--config", args.config, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--tmp", f"{args.tmp}-{variant}-{impl}",
                   "--threads", str(args.threads)] + (["--cpu"] if args.cpu else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode or not lines:
                res[impl] = None
                print(f"{variant:<10} {impl} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:150]}")
                continue
            res[impl] = json.loads(lines[-1])
        if res.get("fewstep") and res.get("plain"):
            f, q = res["fewstep"], res["plain"]
            unit = "GiB" if gpu else "GiB RSS"
            print(f"{variant:<10} {f['steps_per_s']:>15.3f} {q['steps_per_s']:>14.3f} {f['steps_per_s'] / q['steps_per_s']:>6.2f} "
                  f"{f['peak_gib']:>9.2f} {unit} {q['peak_gib']:>7.2f} {unit}")
            rows.append({"variant": variant, "fewstep": f, "plain": q})
    return 0


if __name__ == "__main__":
    sys.exit(main())
