import time, torch, fewstep
from fewstep.distill import ICT, SLCT, Distiller, DistillConfig, MixtureData, MLPNet
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
import sys
torch.set_num_threads(1)
gm = GaussianMixture.digits(); sch = default_schedule()
g = torch.Generator().manual_seed(0)
noise = torch.randn(256, 64, generator=g, dtype=torch.float64)
ref = gm.ode_solve(noise, sch, sch.t_max, sch.t_zero, rtol=1e-6, atol=1e-6)
def err(st, k):
    with torch.no_grad():
        x = fewstep.sample(st, noise.float(), "cm_multistep", k, schedule=sch, boundary_time=float(sch.t_min))
    return float(((x.double()-ref)**2).mean().sqrt())
for name, obj in [("ict", ICT(s0=10, s1=40)), ("ict+imm", ICT(s0=10, s1=40, noise_assignment=True)), ("slct", SLCT(s0=10, s1=40))]:
    torch.manual_seed(0)
    net = MLPNet(dim=64, hidden=256, depth=3)
    cfg = DistillConfig(output_dir=f"/tmp/slct_try/{name}", steps=300, batch_size=64, lr=2e-4, checkpoint_every=10000, progress=False, log_every=25, sampling_ema=None)
    import shutil; shutil.rmtree(cfg.output_dir, ignore_errors=True)
    d = Distiller(obj, MixtureData(gm), None, net, prediction_type="sample", schedule=sch, config=cfg)
    b = err(d.student, 1)
    t = time.time(); d.train(); 
    print(name, "before", b, "after", [err(d.student.eval(), k) for k in (1,2)], f"{time.time()-t:.1f}s", flush=True)
