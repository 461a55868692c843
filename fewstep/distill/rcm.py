r"""Score-regularised continuous-time consistency, rCM (Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency", arXiv:2510.08431; NVlabs/rcm):
sCM plus a reverse-divergence (distribution-matching, DMD-style) term, with a fake-score network
trained alternately.

Two phases (as NVlabs/rcm's ``is_student_phase``): during the tangent warm-up and at every
``student_update_freq``-th step afterwards the student (and sCM's log-variance head) updates, at
the other steps the fake score.  With ``G`` the student's sample from the noisiest time after
``k = step mod max_simulation_steps`` of its own multistep steps without gradient (rCM's backward
simulation; angles ``min(t_D, t_prev)``) and ``t_D`` drawn by ``dmd_time_shift`` (uniform flow time
under SD3's shift ``s``: ``sigma = s u / (1 + (s - 1) u)``, ``tan t = sigma / ((1 - sigma) sigma_d)``):

* **student** (after warm-up): the sCM loss plus ``dmd_weight`` times
  ``mean((G - sg(G - grad))^2)``, ``grad = (D_fake(x_D, t_D) - D_teacher(x_D, t_D)) /
  mean|G - D_teacher(x_D, t_D)|`` (DMD's normalised reverse-KL gradient, Yin et al. 2024, eq. 7-8),
  ``x_D = cos(t_D) G + sin(t_D) z``;  the student's two forwards (sCM's ``F`` and ``G``) are one
  batched call, as NVlabs/rcm does, so DDP sees one forward per backward;
* **fake score**: denoising score matching on the student's samples,
  ``mean((sg(G) - D_fake(x_D, t_D))^2) / sin^2(t_D)``.

NVlabs/rcm sums over dimensions with a loss scale of 100 on the sCM term and 1 on DMD; here both
are means over dimensions (so one ``dmd_weight`` means the same at any data size) and the weight is
explicit.  The fake score is a copy of the teacher's network by default (rCM initialises it from
the teacher), or any network given with its prediction type.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fewstep.distill.data import rand, randn
from fewstep.distill.objective import Batch, Models, TrainableNetwork
from fewstep.distill.scm import SCM, _col
from fewstep.models.diffusers_models import DiffusersDenoiser

__all__ = ["RCM"]


class RCM(SCM):
    """rCM (see the module docstring); the remaining arguments are :class:`SCM`'s.

    Args:
        fake_score: the fake-score network (``nn.Module``, called like the teacher's network);
            default a copy of the teacher's network (``teacher.model``).
        fake_prediction_type: what ``fake_score`` predicts (default: the teacher's).
        dmd_weight: weight of the distribution-matching term.
        student_update_freq: after the warm-up, the student updates every this many steps.
        max_simulation_steps: backward-simulation steps cycle through ``0 .. this - 1``.
        dmd_time_shift: SD3 shift of the DMD / fake-score times (rCM: 5).
        fake_lr, fake_betas, fake_weight_decay: the fake score's AdamW (rCM: betas (0, 0.999)).
    """

    name = "rcm"
    paper = "Zheng et al. 2025, Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency (rCM)"

    def __init__(
        self,
        *,
        fake_score: torch.nn.Module | None = None,
        fake_prediction_type: str | None = None,
        dmd_weight: float = 1.0,
        student_update_freq: int = 5,
        max_simulation_steps: int = 4,
        dmd_time_shift: float = 5.0,
        fake_lr: float | None = None,
        fake_betas: tuple[float, float] = (0.0, 0.999),
        fake_weight_decay: float | None = None,
        **scm: Any,
    ):
        if scm.get("teacher", True) is False:
            raise ValueError("rCM distils a teacher (its DMD term needs the teacher's score): teacher=False is sCM's consistency training")
        super().__init__(**scm)
        for name, v in (("student_update_freq", student_update_freq), ("max_simulation_steps", max_simulation_steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not dmd_weight >= 0 or not dmd_time_shift > 0:
            raise ValueError(f"dmd_weight must be >= 0 and dmd_time_shift > 0, got {dmd_weight}, {dmd_time_shift}")
        if fake_score is not None and not isinstance(fake_score, torch.nn.Module):
            raise TypeError(f"fake_score must be an nn.Module, got {type(fake_score).__name__}")
        self.fake_network = fake_score
        self.fake_prediction_type = fake_prediction_type
        self.dmd_weight = float(dmd_weight)
        self.student_update_freq = student_update_freq
        self.max_simulation_steps = max_simulation_steps
        self.dmd_time_shift = float(dmd_time_shift)
        self.fake_opt = TrainableNetwork(torch.nn.Identity(), fake_lr, tuple(fake_betas), fake_weight_decay)

    def extra_networks(self, student: Any, teacher: Any) -> dict[str, TrainableNetwork]:
        nets = super().extra_networks(student, teacher)
        net = self.fake_network
        pt = self.fake_prediction_type or getattr(teacher, "prediction_type", None)
        if net is None:
            net = getattr(teacher, "model", None)
            if not isinstance(net, torch.nn.Module):
                raise ValueError("rCM's fake score starts as a copy of the teacher's network, but the teacher has none (.model); "
                                 "pass fake_score=<nn.Module> and fake_prediction_type=...")
            net = copy.deepcopy(net)
        if pt is None:
            raise ValueError("pass fake_prediction_type=... (the teacher does not say what its network predicts)")
        kw = {"timestep_scale": teacher.timestep_scale} if isinstance(teacher, DiffusersDenoiser) and self.fake_network is None else {}
        fake = DiffusersDenoiser(net.requires_grad_(True).train(), schedule=self.schedule, prediction_type=pt, **kw)
        o = self.fake_opt
        nets["fake_score"] = TrainableNetwork(fake, o.lr, o.adam_betas, o.weight_decay)
        return nets

    def phase(self, step: int) -> tuple[str, ...]:
        """Student (with the log-variance head) during the warm-up and every
        ``student_update_freq``-th step after it; the fake score otherwise."""
        if step < self.tangent_warmup or step % self.student_update_freq == 0:
            return ("student", "logvar") if self.adaptive_weighting else ("student",)
        return ("fake_score",)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dmd_weight": self.dmd_weight, "student_update_freq": self.student_update_freq,
                "max_simulation_steps": self.max_simulation_steps, "dmd_time_shift": self.dmd_time_shift}

    # -- pieces ---------------------------------------------------------------------------------
    def dmd_times(self, batch: Batch) -> torch.Tensor:
        """(B,) TrigFlow times of the DMD and fake-score terms (shifted uniform flow times)."""
        u = rand(batch.gens)
        s = self.dmd_time_shift
        sigma = s * u / (1 + (s - 1) * u)
        return torch.atan2(sigma, (1 - sigma) * self.sigma_data).clamp(self.t_lo, self.t_hi)

    def _f(self, model: Any, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        x_s, s = self.schedule_point(x_t, t)
        return model(x_s, s.to(x_t.device), **cond).float()

    def simulate(self, models: Models, batch: Batch, cond: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, t)``: the input of the student's generating call, after ``step mod
        max_simulation_steps`` of its own steps from the noisiest time (no gradient)."""
        t = torch.full((batch.x0.shape[0],), self.t_hi, dtype=torch.float64)
        z = self.sigma_data * randn(batch.gens, batch.x0.shape[1:], device=batch.x0.device)
        x = _col(torch.cos(t), z) * batch.x0.float() + _col(torch.sin(t), z) * z
        with torch.no_grad():
            for _ in range(batch.step % self.max_simulation_steps):
                x0 = self._f(models.target, x, t, cond)
                t = torch.minimum(self.dmd_times(batch), t)
                z = self.sigma_data * randn(batch.gens, batch.x0.shape[1:], device=batch.x0.device)
                x = _col(torch.cos(t), z) * x0 + _col(torch.sin(t), z) * z
        return x, t

    def noised_sample(self, batch: Batch, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.dmd_times(batch)
        z = self.sigma_data * randn(batch.gens, G.shape[1:], device=G.device)
        return _col(torch.cos(t), G) * G + _col(torch.sin(t), G) * z, t

    def loss(self, models: Models, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cond = dict(batch.cond)
        student_phase = "student" in self.phase(batch.step)
        if student_phase and batch.step < self.tangent_warmup:
            return super().loss(models, batch)
        x_g, t_g = self.simulate(models, batch, cond)
        if not student_phase:  # the fake score's denoising loss on the student's samples
            with torch.no_grad():
                G = self._f(models.target, x_g, t_g, cond)
            x_d, t_d = self.noised_sample(batch, G)
            fake = self._f(models.networks["fake_score"], x_d, t_d, cond)
            per = (G - fake).flatten(1).square().mean(1) / torch.sin(t_d).to(G.device, torch.float32).square()
            return per.mean(), {"phase": 1.0}
        # the student: sCM's F and the generator's sample in one batched call
        t, z, x_t = self.draw(batch)
        b = x_t.shape[0]
        both = self._f(models.student, torch.cat([x_t, x_g]), torch.cat([t, t_g]), _cat(cond, b))
        F = self.student_F(both[:b], x_t, t)
        G = both[b:]
        with torch.no_grad():
            dxdt = self.velocity(models, batch, x_t, t, z, cond)
            g = self.tangent(models, x_t, t, dxdt, F.detach(), batch.step, cond)
            x_d, t_d = self.noised_sample(batch, G.detach())
            fake = self._f(models.networks["fake_score"], x_d, t_d, cond)
            real = self.teacher_x0(models, x_d, t_d, cond)
            scale = (G.detach().double() - real.double()).abs().flatten(1).mean(1).clamp_min(1e-5)
            grad = ((fake.double() - real.double()) / _col(scale, G).double()).float()
        dmd = (G - (G - grad).detach()).flatten(1).square().mean(1)
        per = self.scm_loss(models, F, g, t) + self.dmd_weight * dmd
        return per.mean(), {"phase": 0.0, "dmd": float(dmd.detach().mean())}


def _cat(cond: dict[str, Any], batch: int) -> dict[str, Any]:
    """The conditioning of a batch doubled (tensors with ``batch`` rows, also nested)."""
    from fewstep._util import tree_map

    return tree_map(lambda v: torch.cat([v, v]) if v.ndim and v.shape[0] == batch else v, cond)
