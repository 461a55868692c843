"""Training throughput of latent consistency distillation: fewstep's trainer against plain loops
written the way diffusers' LCM scripts write them, measured in the same run, for a full-UNet
student (``train_lcm_distill_sd_wds.py``) and an LCM-LoRA student (``train_lcm_distill_lora_sdxl.py``).

    python benchmarks/distill_throughput.py                        # GPU if present (SD-sized), else tiny CPU configs
    python benchmarks/distill_throughput.py --config sd,sdxl --modes full,lora --batch-size 8 --steps 20

Models (random weights): ``sd`` is Stable Diffusion 1.5's UNet (latent 4x64x64, text 77x768),
``sdxl`` SDXL's (latent 4x128x128, text 77x2048, ``text_time`` embedding with pooled 1280-d text
embeddings and 6 time ids); ``tiny`` and ``tiny-xl`` are small UNets of the same two shapes for
CPUs.  Modes: ``full`` (LCD: the teacher's copy with a 256-d guidance embedding as student, an EMA
target, Huber loss) and ``lora`` (LCM-LoRA: rank-64 adapters on the attention projections, the
student its own stop-gradient target, the frozen base in the autocast dtype, L2 loss).  Variants:
fp32, bf16 autocast, bf16 + gradient checkpointing, torch.compile (bf16 on GPU, fp32 on CPU), and
xformers attention (bf16) when xformers is installed; attention is SDPA otherwise.  Both sides
train on latents and text states already in memory (the step, not the data pipeline, is timed)
and do the same work: fewstep's separate sampling EMA is switched off (the scripts keep none).

Each (config, mode, variant, implementation) runs in its own process: ``--warmup`` steps, then
``--steps`` timed steps.  Reported: training steps per second and peak memory
(``torch.cuda.max_memory_allocated`` on GPU, peak resident set size of the process on CPU), and
the ratio fewstep / plain loop.

The plain loops (``plain_step_factory``) do per step what the diffusers scripts do: sample a
DDIM-grid index and guidance scale, noise the latents, one student forward with c_skip/c_out,
teacher forwards (conditional and unconditional) and a DDIM step under ``no_grad``, one target
forward, the loss, backward, clipping, AdamW, and (full) the EMA update.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fewstep of this checkout, also in the child processes

VARIANTS = ("fp32", "bf16", "bf16+ckpt", "compile", "xformers")
MODES = ("full", "lora")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_unet(config: str):
    """``(unet, latent shape, text shape, pooled size or None)`` with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if config == "sd":  # Stable Diffusion 1.5's UNet
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        ), (4, 64, 64), (77, 768), None
    if config == "sdxl":  # SDXL's UNet
        return UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ), (4, 128, 128), (77, 2048), 1280
    xl = config == "tiny-xl"
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48) if xl else {}
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if xl else 32, attention_head_dim=8, norm_num_groups=16, **extra,
    ), (4, 16, 16), (8, 64 if xl else 32), (32 if xl else None)


def make_cond(n: int, text, pooled, g: torch.Generator) -> dict:
    """Random conditioning of ``n`` samples (SDXL-shaped: with ``added_cond_kwargs``)."""
    cond = {"encoder_hidden_states": torch.randn(n, *text, generator=g)}
    if pooled:
        cond["added_cond_kwargs"] = {"text_embeds": torch.randn(n, pooled, generator=g), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * n)}
    return cond


def zeros_like_cond(cond: dict, rows: int | None = None) -> dict:
    """The unconditional inputs (zeros; SDXL's time ids unchanged)."""
    out = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"][: rows or None])}
    if "added_cond_kwargs" in cond:
        a = cond["added_cond_kwargs"]
        out["added_cond_kwargs"] = {"text_embeds": torch.zeros_like(a["text_embeds"][: rows or None]),
                                    "time_ids": None if rows else a["time_ids"]}
    return out


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

    unet, shape, text, pooled = make_unet(args.config)
    n = max(args.batch_size * 4, 16)
    g = torch.Generator().manual_seed(0)
    cond = make_cond(n, text, pooled, g)
    data = TensorData(torch.randn(n, *shape, generator=g), cond)
    teacher = DiffusersDenoiser(unet.eval(), DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    lora = args.mode == "lora"
    obj = LCD(uncond=zeros_like_cond(cond, rows=1), num_ddim_steps=50, guidance_embedding=not lora,
              **({"target_ema": 0.0, "loss": "l2"} if lora else {}))
    s = settings(args.variant, device)
    shutil.rmtree(args.tmp, ignore_errors=True)  # its own scratch folder: a trainer refuses to start a second run in one
    cfg = DistillConfig(output_dir=args.tmp, steps=args.warmup + args.steps, batch_size=args.batch_size, lr=1e-6,
                        checkpoint_every=10**9, progress=False, log_every=10**6, cpu=device == "cpu", sampling_ema=None,
                        attention=s.get("attention", "sdpa"), **{k: v for k, v in s.items() if k != "attention"})
    stamps: list[float] = []

    def tick(step: int, loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    lora_cfg = None
    if lora:
        from peft import LoraConfig

        lora_cfg = LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGETS)
    d = Distiller(obj, data, teacher, lora=lora_cfg, guidance_embedding_dim=None if lora else 256, callback=tick, config=cfg)
    d._finish = lambda *a, **k: None  # the timing is about training steps, not writing the student
    d._checkpoint = lambda *a, **k: None
    d.train()
    return stamps


def plain_step_factory(args, device: str):
    """A diffusers-script-style LCD step (one call = one optimizer step): ``full`` as
    train_lcm_distill_sd_wds.py (separate teacher, student with guidance embedding, EMA target),
    ``lora`` as train_lcm_distill_lora_sdxl.py (one UNet in the weight dtype with fp32 adapters,
    the teacher = adapters off, the target = the student under no_grad)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fewstep.distill.student import guidance_embedding

    s = settings(args.variant, device)
    dtype = torch.bfloat16 if s["precision"] == "bf16" else torch.float32
    unet, shape, text, pooled = make_unet(args.config)
    lora = args.mode == "lora"
    if lora:
        from peft import LoraConfig

        student = unet.to(device, dtype).requires_grad_(False)
        student.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=LORA_TARGETS))
        for p in student.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # diffusers' cast_training_params
        teacher = target = None
    else:
        teacher = copy.deepcopy(unet).to(device, dtype).eval().requires_grad_(False)
        student = UNet2DConditionModel.from_config(dict(unet.config), time_cond_proj_dim=256)
        student.load_state_dict(unet.state_dict(), strict=False)
        student = student.to(device)
        target = copy.deepcopy(student).requires_grad_(False)
    student.train()
    if s.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    if s.get("attention") == "xformers":
        student.enable_xformers_memory_efficient_attention()
        if teacher is not None:
            teacher.enable_xformers_memory_efficient_attention()
    fwd = torch.compile(student) if s.get("compile") else student
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ac = sched.alphas_cumprod.to(device)
    k = 1000 // 50
    ddim_t = torch.arange(1, 51, device=device) * k - 1  # 19, 39, ..., 999
    g = torch.Generator().manual_seed(0)
    b = args.batch_size
    latents = torch.randn(b, *shape, generator=g).to(device)
    cond = make_cond(b, text, pooled, g)
    ehs = cond["encoder_hidden_states"].to(device)
    added = {k2: v.to(device) for k2, v in cond.get("added_cond_kwargs", {}).items()} or None
    uncond = torch.zeros_like(ehs)
    added_u = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]} if added else None

    def scalings(t):
        u = 10.0 * t.float()
        return 0.25 / (u**2 + 0.25), u / (u**2 + 0.25) ** 0.5

    def bc(v):
        return v.reshape(-1, 1, 1, 1)

    def call(net, x, t, states, extra, **kw):
        return net(x, t, encoder_hidden_states=states, **({"added_cond_kwargs": extra} if extra else {}), **kw).sample

    def step() -> None:
        idx = torch.randint(0, 50, (b,), device=device)
        t_start = ddim_t[idx]
        t_end = torch.clamp(t_start - k, min=0)
        noise = torch.randn_like(latents)
        a_s, s_s = bc(ac[t_start].sqrt()), bc((1 - ac[t_start]).sqrt())
        noisy = a_s * latents + s_s * noise
        w = (4.0 if lora else 6.0) + (12.0 if lora else 10.0) * torch.rand(b, device=device)
        w_emb = None if lora else {"timestep_cond": guidance_embedding(w.cpu(), 256, b).to(device)}
        cs_s, co_s = scalings(t_start)
        cs_e, co_e = scalings(t_end)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            eps = call(fwd, noisy, t_start, ehs, added, **(w_emb or {}))
            pred_x0 = (noisy - s_s * eps.float()) / a_s
            model_pred = bc(cs_s) * noisy + bc(co_s) * pred_x0
            with torch.no_grad():
                if lora:
                    student.disable_adapters()
                tnet = student if lora else teacher
                eps_c = call(tnet, noisy, t_start, ehs, added).float()
                eps_u = call(tnet, noisy, t_start, uncond, added_u).float()
                if lora:
                    student.enable_adapters()
                x0_c, x0_u = (noisy - s_s * eps_c) / a_s, (noisy - s_s * eps_u) / a_s
                wb = bc(w)
                x0_g, eps_g = x0_u + wb * (x0_c - x0_u), eps_u + wb * (eps_c - eps_u)
                a_e, s_e = bc(ac[t_end].sqrt()), bc((1 - ac[t_end]).sqrt())
                x_prev = a_e * x0_g + s_e * eps_g  # the DDIM step
                eps_t = call(student if lora else target, x_prev, t_end, ehs, added, **(w_emb or {})).float()
                target_pred = bc(cs_e) * x_prev + bc(co_e) * (x_prev - s_e * eps_t) / a_e
        diff = model_pred.float() - target_pred.float()
        loss = diff.square().mean() if lora else (torch.sqrt(diff**2 + 0.001**2) - 0.001).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if target is not None:
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
    return {"config": args.config, "mode": args.mode, "variant": args.variant, "impl": args.impl, "steps_per_s": sps, "peak_gib": mem, "device": device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="comma-separated: sd, sdxl, tiny, tiny-xl (default: sd,sdxl on a GPU, tiny,tiny-xl on a CPU)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: full, lora")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=1, help="measurements per cell (the median and the range are printed)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: %(default)s; the CPU may be shared)")
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/fewstep-distill-bench", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    args.config = args.config or ("sd,sdxl" if gpu else "tiny,tiny-xl")
    args.batch_size = args.batch_size or (4 if gpu else 4)
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
    print(f"LCD training throughput, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, {device}, torch {torch.__version__}")
    print(f"{'config':<8} {'mode':<5} {'variant':<10} {'fewstep steps/s':>15} {'plain steps/s':>14} {'ratio':>12} {'fewstep peak':>13} {'plain peak':>11}")
    rows = []
    unit = "GiB" if gpu else "GiB RSS"
    for config in args.config.split(","):
        for mode in args.modes.split(","):
            for variant in args.variants.split(","):
                if variant == "xformers" and not have_xformers:
                    print(f"{config:<8} {mode:<5} {variant:<10} not installed (or no GPU): attention runs on PyTorch SDPA")
                    continue
                res: dict[str, list] = {"fewstep": [], "plain": []}
                for rep in range(args.repeats):
                    for impl in ("fewstep", "plain"):
                        cmd = [sys.executable, __file__, "--variant", variant, "--impl", impl, "--mode", mode, "--config", config,
                               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                               "--tmp", f"{args.tmp}-{config}-{mode}-{variant}-{impl}", "--threads", str(args.threads)] + (["--cpu"] if args.cpu else [])
                        r = subprocess.run(cmd, capture_output=True, text=True)
                        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
                        if r.returncode or not lines:
                            print(f"{config:<8} {mode:<5} {variant:<10} {impl} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:150]}")
                            continue
                        res[impl].append(json.loads(lines[-1]))
                if res["fewstep"] and res["plain"] and len(res["fewstep"]) == len(res["plain"]):
                    ratios = sorted(f["steps_per_s"] / q["steps_per_s"] for f, q in zip(res["fewstep"], res["plain"]))
                    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
                    fs, qs = med([r["steps_per_s"] for r in res["fewstep"]]), med([r["steps_per_s"] for r in res["plain"]])
                    spread = f"{med(ratios):.2f}" + (f" [{ratios[0]:.2f}-{ratios[-1]:.2f}]" if len(ratios) > 1 else "")
                    fm, qm = max(r["peak_gib"] for r in res["fewstep"]), max(r["peak_gib"] for r in res["plain"])
                    print(f"{config:<8} {mode:<5} {variant:<10} {fs:>15.3f} {qs:>14.3f} {spread:>12} {fm:>9.2f} {unit} {qm:>7.2f} {unit}", flush=True)
                    rows.append({"config": config, "mode": mode, "variant": variant, "fewstep": res["fewstep"], "plain": res["plain"], "ratios": ratios})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
