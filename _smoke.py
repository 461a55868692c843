import torch, time, sys, tempfile, fewstep
torch.set_num_threads(1)
from fewstep.distill import SCM, Distiller, DistillConfig, MixtureData, MLPNet
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
gm=GaussianMixture.digits(); sch=default_schedule()
g=torch.Generator().manual_seed(0)
noise=torch.randn(256,64,generator=g,dtype=torch.float64)
ref=gm.ode_solve(noise,sch,sch.t_max,sch.t_zero,rtol=1e-6,atol=1e-6)
def rmse(a): return float(torch.sqrt(torch.mean((a.detach().double()-ref)**2)))
steps=int(sys.argv[1]); lr=float(sys.argv[2]); warm=int(sys.argv[3])
torch.manual_seed(0)
net=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=float(sys.argv[5]))
obj=SCM(tangent_warmup=warm, adaptive_weighting=bool(int(sys.argv[4])))
d=Distiller(obj, MixtureData(gm), gm.denoiser(sch), net, prediction_type="v_prediction", schedule=sch,
  config=DistillConfig(output_dir=tempfile.mkdtemp()+"/o", steps=steps, batch_size=64, lr=lr, checkpoint_every=10000, progress=False, log_every=50, sampling_ema=None))
def errs():
    with torch.no_grad():
        return [rmse(fewstep.sample(d.student.eval(), noise.float(), "scm", k, schedule=sch, generator=torch.Generator().manual_seed(1))) for k in (1,2)]
print("before", errs())
t0=time.time(); run=d.train(); print("time", time.time()-t0)
print("loss", sum(run.losses[:20])/20, sum(run.losses[-20:])/20)
print("after", errs())
teacher=gm.denoiser(sch)
print("ddim", [rmse(fewstep.sample(teacher, noise.float(), "ddim", k, schedule=sch)) for k in (1,2)])
from fewstep.trigflow import TrigFlowMap
m=TrigFlowMap(sch,0.5)
x0=gm.sample(256,generator=torch.Generator().manual_seed(5))
for ang in [0.3,0.8,1.2,1.45,1.55]:
    s=float(m.time(ang)); a,sg=sch.alpha_sigma(s)
    xs=a*x0+sg*torch.randn(256,64,generator=torch.Generator().manual_seed(6),dtype=torch.float64)
    r=gm.ode_solve(xs,sch,s,sch.t_zero,rtol=1e-6,atol=1e-6)
    with torch.no_grad():
        fs=d.student(xs.float(),s).double()
        dd=teacher(xs.float(),s).double()
    print(ang, "student", float(((fs-r)**2).mean().sqrt()), "teacher-x0", float(((dd-r)**2).mean().sqrt()))
