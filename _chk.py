import torch, fewstep
from fewstep.distill import SCM, MLPNet, ConsistencyStudent, MixtureData, sample_generators
from fewstep.distill.objective import Batch, Models
from fewstep.models import GaussianMixture
from fewstep.eval.exact import default_schedule
gm=GaussianMixture.digits(); sch=default_schedule()
obj=SCM(tangent_warmup=0, adaptive_weighting=False); obj.bind(sch,(64,),100)
torch.manual_seed(0)
st=ConsistencyStudent(MLPNet(dim=64),sch,"v_prediction",obj.boundary())
gens=sample_generators(0,0,range(8)); x0,_=MixtureData(gm).sample(gens,"cpu")
b=Batch(x0,{},gens,0)
t,z,x_t=obj.draw(b)
x_s,s=obj.schedule_point(x_t,t)
F1=obj.student_F(st(x_s,s),x_t,t)
F2=obj.network(st)(x_t,t)
print((F1-F2).abs().max().item(), F1.abs().max().item(), t)
# teacher velocity check vs exact: F_teacher with the exact denoiser
m=Models(st,st,gm.denoiser(sch))
v=obj.velocity(m,b,x_t,t,z,{})
print(v.abs().mean().item())
# df/dt check
obj.tangent_warmup=0
tt=t.clone()
with torch.no_grad():
    F=obj.student_F(st(x_s,s),x_t,t)
    sd=0.5
    cos=torch.cos(t)[:,None].float(); sin=torch.sin(t)[:,None].float()
    # raw g (unnormalized): replicate
    cs=(torch.cos(t)*torch.sin(t))
    _,dF=obj.network(st).tangent(x_t,t,cs[:,None].float()*v,cs)
    graw=-cos*cos*(sd*F-v)-(cs[:,None].float()*x_t+sd*dF)
    D=1e-4
    x2=x_t-D*v; t2=t-D
    xs2,s2=obj.schedule_point(x2,t2)
    f1=st(x_s,s); f2=st(xs2,s2)
    dfdt=(f1-f2)/D
    print("rel", ((graw/cos - dfdt).norm()/dfdt.norm()).item())
