"""sCM against rCM on the exact digits mixture, three training seeds (the training of
tests/test_distill_scm.py): FD to exact samples at 1, 2, 4 steps and RMSE to the exact ODE map.

    python benchmarks/scm_rcm_mixture_seeds.py
"""
import sys
import tempfile
import time

import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fewstep
from fewstep.distill import SCM, RCM, Distiller, DistillConfig, MixtureData, MLPNet
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
from fewstep.eval.frechet import frechet_distance_from_features
torch.set_num_threads(1)
gm=GaussianMixture.digits(); sch=default_schedule(); teacher=gm.denoiser(sch)
noise=torch.randn(2000,64,generator=torch.Generator().manual_seed(0))
exact=gm.sample(2000,generator=torch.Generator().manual_seed(9))
ref=gm.ode_solve(noise[:256].double(),sch,sch.t_max,sch.t_zero,rtol=1e-6,atol=1e-6)
fd=lambda x: frechet_distance_from_features(x.double(), exact)
with torch.no_grad():
    dd={k: fd(fewstep.sample(teacher, noise, "ddim", k, schedule=sch)) for k in (1,2,4)}
    r1=float(((fewstep.sample(teacher, noise[:256], "ddim", 1, schedule=sch).double()-ref)**2).mean().sqrt())
print("ddim FD", {k: round(v,3) for k,v in dd.items()}, "rmse1", round(r1,3), flush=True)
for seed in (0,1,2):
    for kind in ("scm","rcm"):
        torch.manual_seed(seed)
        net=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=1e-3)
        obj=SCM(tangent_warmup=200) if kind=="scm" else RCM(tangent_warmup=200, fake_score=MLPNet(dim=64,hidden=256,depth=3,timestep_scale=1e-3), fake_prediction_type="v_prediction")
        d=Distiller(obj, MixtureData(gm), teacher, net, prediction_type="v_prediction", schedule=sch,
            config=DistillConfig(output_dir=tempfile.mkdtemp()+"/o", steps=600, batch_size=64, lr=1e-3, checkpoint_every=10**9, progress=False, log_every=50, sampling_ema=None, seed=seed))
        t0=time.time(); d.train(); el=time.time()-t0
        st=d.student.eval()
        with torch.no_grad():
            out={k: fewstep.sample(st, noise, "scm", k, schedule=sch, generator=torch.Generator().manual_seed(1)) for k in (1,2,4)}
        rm=float(((out[1][:256].double()-ref)**2).mean().sqrt())
        print(kind, "seed", seed, "train %.1fs"%el, "FD", {k: round(fd(v),3) for k,v in out.items()}, "rmse1", round(rm,3), flush=True)
