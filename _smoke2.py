import torch, time, sys, tempfile, fewstep
torch.set_num_threads(1)
from fewstep.distill import SCM, Distiller, DistillConfig, MixtureData, MLPNet
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
from fewstep.trigflow import TrigFlowMap
gm=GaussianMixture.digits(); sch=default_schedule(); teacher=gm.denoiser(sch)
m=TrigFlowMap(sch,0.5)
x0=gm.sample(256,generator=torch.Generator().manual_seed(5))
probe=[]
for ang in [0.3,0.8,1.2,1.45,1.5676]:
    s=float(m.time(min(ang,m.t_max))); a,sg=sch.alpha_sigma(s)
    xs=a*x0+sg*torch.randn(256,64,generator=torch.Generator().manual_seed(6),dtype=torch.float64)
    probe.append((ang,s,xs,gm.ode_solve(xs,sch,s,sch.t_zero,rtol=1e-6,atol=1e-6)))
def report(st,tag):
    out=[]
    with torch.no_grad():
        for ang,s,xs,r in probe:
            out.append(round(float(((st(xs.float(),s).double()-r)**2).mean().sqrt()),3))
    print(tag, out, flush=True)
report(teacher,"teacher-x0")
lr=float(sys.argv[1]); n1=int(sys.argv[2]); n2=int(sys.argv[3]); ad=bool(int(sys.argv[4]))
torch.manual_seed(0)
net=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=float(sys.argv[5]))
def cfg(n): return DistillConfig(output_dir=tempfile.mkdtemp()+"/o", steps=n, batch_size=64, lr=lr, checkpoint_every=10000, progress=False, log_every=50, sampling_ema=None)
d=Distiller(SCM(tangent_warmup=10**9, adaptive_weighting=False), MixtureData(gm), teacher, net, prediction_type="v_prediction", schedule=sch, config=cfg(n1))
d.train(); report(d.student.eval(),"pretrained")
d2=Distiller(SCM(tangent_warmup=0, adaptive_weighting=ad), MixtureData(gm), teacher, d.student, schedule=sch, config=cfg(n2))
for k in range(4):
    d2.config.steps=n2*(k+1)
    d2=Distiller(SCM(tangent_warmup=0, adaptive_weighting=ad), MixtureData(gm), teacher, d2.student.train(), schedule=sch, config=cfg(n2))
    d2.train(); report(d2.student.eval(), f"scm {n2*(k+1)}")
