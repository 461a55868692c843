import torch, time, sys, tempfile, fewstep
torch.set_num_threads(1)
from fewstep.distill import SCM, RCM, Distiller, DistillConfig, MixtureData, MLPNet
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
from fewstep.eval.frechet import frechet_distance_from_features
gm=GaussianMixture.digits(); sch=default_schedule(); teacher=gm.denoiser(sch)
g=torch.Generator().manual_seed(0)
noise=torch.randn(2000,64,generator=g)
exact=gm.sample(2000,generator=torch.Generator().manual_seed(9))
def fd(x): return frechet_distance_from_features(x.double(), exact)
kind=sys.argv[1]; steps=int(sys.argv[2]); warm=int(sys.argv[3]); dw=float(sys.argv[4]); seed=int(sys.argv[5]) if len(sys.argv)>5 else 0
torch.manual_seed(seed)
net=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=1e-3)
if kind=="scm": obj=SCM(tangent_warmup=warm)
else:
    fake=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=1e-3)
    obj=RCM(tangent_warmup=warm, fake_score=fake, fake_prediction_type="v_prediction", dmd_weight=dw)
d=Distiller(obj, MixtureData(gm), teacher, net, prediction_type="v_prediction", schedule=sch,
  config=DistillConfig(output_dir=tempfile.mkdtemp()+"/o", steps=steps, batch_size=64, lr=1e-3, checkpoint_every=10000, progress=False, log_every=50, sampling_ema=None, seed=seed))
t0=time.time(); run=d.train(); el=time.time()-t0
with torch.no_grad():
    r=[fd(fewstep.sample(d.student.eval(), noise, "scm", k, schedule=sch, generator=torch.Generator().manual_seed(1))) for k in (1,2,4)]
dd=[fd(fewstep.sample(teacher, noise, "ddim", k, schedule=sch)) for k in (1,2,4)]
print(kind, steps, warm, dw, seed, "time %.1f"%el, "FD student", [round(x,3) for x in r], "ddim", [round(x,3) for x in dd], flush=True)
