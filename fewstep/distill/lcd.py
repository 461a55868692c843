"""Latent consistency distillation, LCD (Luo, Tan, Huang, Li & Zhao 2023, "Latent Consistency
Models", Algorithm 1; LCM-LoRA, Luo et al. 2023b).

What sets it apart from :class:`fewstep.distill.cd.CD`:

* **Guided teacher.**  The teacher's step uses the classifier-free-guided data prediction with
  one explicit convention, diffusers' (``w = 1`` is the conditional model):
  ``D_w = D_u + w (D_c - D_u)`` (:class:`fewstep.models.ClassifierFreeGuidance`).  LCM's paper
  writes ``(1 + w') D_c - w' D_u``, i.e. ``w = 1 + w'``; the full-UNet recipe's ``w' in [5, 15]``
  (diffusers' ``train_lcm_distill_sd_wds.py``) is the default ``guidance_range = (6, 16)`` here,
  and LoRA students (``guidance_embedding=False``) default to the LCM-LoRA recipe's
  ``w' in [3, 15]`` (``train_lcm_distill_lora_sdxl.py``), ``(4, 16)``.  ``w`` is drawn uniformly
  per sample.  The unconditional inputs are the recipe's: for SD 1.5 the empty prompt's text
  states, for SDXL zeros for both text embeddings (``force_zeros_for_empty_prompt``, as the SDXL
  pipelines and the LCM-LoRA SDXL script), built by the data's encoder when ``uncond=None``.
* **Guidance embedding.**  The student receives ``w`` through LCM's embedding of ``w - 1`` as the
  UNet's ``timestep_cond`` (:func:`fewstep.distill.student.guidance_embedding`; a
  ``UNet2DConditionModel`` with ``time_cond_proj_dim`` set), so one student serves every scale.
  LoRA students (``guidance_embedding=False``) distil the guided ODE without it, as LCM-LoRA.
* **Skipping-step schedule.**  Pairs span ``skip`` points of a coarse DDIM grid of
  ``num_ddim_steps`` steps, diffusers' ``trailing`` timesteps ending at timestep 0 (LCM's
  ``DDIMSolver``: 50 steps of 20 timesteps for a 1000-step schedule, ``k = 20``).  The teacher
  step is the registry's ``ddim`` by default.
* **Huber loss** ``mean(sqrt((a - b)^2 + c^2) - c)``, ``c = 0.001``, and the boundary condition of
  LCM (``kappa = 10``, ``sigma_d = 0.5``, boundary at timestep 0), identical to diffusers'
  ``LCMScheduler``.

The student is sampled with the registry's ``lcm`` sampler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fewstep.distill.cd import CD
from fewstep.distill.data import rand
from fewstep.distill.objective import Batch, Models
from fewstep._util import tree_map
from fewstep.models.guidance import ClassifierFreeGuidance

__all__ = ["LCD", "GuidedTeacher", "FULL_GUIDANCE_RANGE", "LORA_GUIDANCE_RANGE"]

#: diffusers' ``train_lcm_distill_sd_wds.py`` (full UNet): w' in [5, 15] in LCM's convention
FULL_GUIDANCE_RANGE = (6.0, 16.0)
#: diffusers' ``train_lcm_distill_lora_sdxl.py`` (LCM-LoRA): w' in [3, 15] in LCM's convention
LORA_GUIDANCE_RANGE = (4.0, 16.0)


class GuidedTeacher(torch.nn.Module):
    """A teacher denoiser guided per call: ``forward(x, t, guidance_scale=w, **cond)`` with ``w`` a
    number or one value per sample (so the scales follow their samples through
    :class:`fewstep.distill.teacher.IntervalSolver`)."""

    def __init__(self, teacher: Any, uncond: Mapping[str, Any]):
        super().__init__()
        self.teacher = teacher
        self.uncond = dict(uncond)
        self.schedule = getattr(teacher, "schedule", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, guidance_scale: Any = 1.0, **cond: Any) -> torch.Tensor:
        """``D_u + w (D_c - D_u)`` at ``(x, t)`` with ``w = guidance_scale`` (a number or a (B,)
        tensor, diffusers' convention) and the conditional inputs ``cond``; one batched teacher
        call for both branches."""
        return ClassifierFreeGuidance(self.teacher, guidance_scale, self.uncond)(x, t, **cond)


class LCD(CD):
    """Latent consistency distillation.

    Args:
        uncond: the teacher's unconditional inputs, under the keys of the data's conditioning
            (e.g. ``{"encoder_hidden_states": empty_prompt_states}`` of shape (1, L, C)).
        num_ddim_steps: steps of the coarse DDIM grid (LCM: 50).
        skip: grid steps spanned by one teacher step (LCM: one step of the 50-step grid).
        guidance_range: ``(w_min, w_max)`` in diffusers' convention.
        guidance_embedding: feed ``w`` to the student (full UNet students); ``False`` for LoRA.
        teacher_sampler, teacher_nfe, teacher_options, loss, loss_c, target_ema, boundary_scale,
        sigma_data: as for :class:`CD` (defaults: ``ddim``, Huber with c = 0.001, 0.95, 10, 0.5).
    """

    name = "lcd"
    paper = "Luo et al. 2023, Latent Consistency Models, Algorithm 1"
    sampler = "lcm"

    def __init__(
        self,
        uncond: Mapping[str, Any] | None = None,
        num_ddim_steps: int = 50,
        skip: int = 1,
        guidance_range: tuple[float, float] | None = None,
        guidance_embedding: bool = True,
        *,
        teacher_sampler: str = "ddim",
        loss: str = "huber",
        **kwargs: Any,
    ):
        for k in ("spacing", "end"):
            if k in kwargs:
                raise TypeError(f"LCD fixes {k}: its grid is diffusers' 'trailing' DDIM grid ending at timestep t_min")
        super().__init__(num_ddim_steps, spacing="trailing", end="min", teacher_sampler=teacher_sampler, loss=loss, **kwargs)
        if isinstance(skip, bool) or not isinstance(skip, int) or not 1 <= skip <= num_ddim_steps:
            raise ValueError(f"skip must be an integer in [1, num_ddim_steps={num_ddim_steps}], got {skip!r}")
        if guidance_range is None:
            guidance_range = FULL_GUIDANCE_RANGE if guidance_embedding else LORA_GUIDANCE_RANGE
        lo, hi = (float(v) for v in guidance_range)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"guidance_range must be (w_min, w_max) with 0 <= w_min <= w_max, got {guidance_range}")
        if uncond is not None and (not isinstance(uncond, Mapping) or not uncond):
            raise ValueError(
                "LCD's uncond must be the teacher's unconditional inputs for classifier-free guidance, e.g. "
                "uncond={'encoder_hidden_states': text_encoder(tokenizer([''])...)} (or None: the data source builds them)"
            )
        # None: the trainer takes the data source's empty-prompt inputs (ImageTextData, LatentShards)
        self.uncond = dict(uncond) if uncond is not None else None
        self.skip = skip
        self.guidance_range = (lo, hi)
        self.guidance_embedding = bool(guidance_embedding)
        self._guided: GuidedTeacher | None = None  # built on first use, on the teacher's device

    def draw_extras(self, batch: Batch) -> dict[str, Any]:
        """The guidance scale ``w``, uniform on ``guidance_range``, one per sample."""
        lo, hi = self.guidance_range
        w = lo + (hi - lo) * rand(batch.gens)
        return {"guidance_scale": w.to(batch.x0.device, torch.float32)}

    def network_cond(self, batch: Batch, extras: dict[str, Any]) -> dict[str, Any]:
        """The student's (and target's) inputs: the conditioning, plus ``w`` when it is embedded."""
        if self.guidance_embedding:
            return {**batch.cond, "guidance_scale": extras["guidance_scale"]}
        return dict(batch.cond)

    def teacher_denoiser(self, models: Models) -> Any:
        """The teacher under classifier-free guidance (:class:`GuidedTeacher`), built once per teacher."""
        if self.uncond is None:
            raise ValueError("LCD has no unconditional inputs: pass uncond=... or train through Distiller with a data source that builds them")
        if self._guided is None or self._guided.teacher is not models.teacher:
            self._guided = GuidedTeacher(models.teacher, tree_map(lambda v: v.to(_device(models)), self.uncond))
        return self._guided

    def teacher_cond(self, batch: Batch, extras: dict[str, Any]) -> dict[str, Any]:
        """The teacher's inputs: the conditioning and the per-sample guidance scale."""
        return {**batch.cond, "guidance_scale": extras["guidance_scale"]}

    def sampler_options(self) -> dict[str, Any]:
        """``lcm``'s ``original_inference_steps``: the coarse DDIM grid the student was trained on."""
        return {"original_inference_steps": self.num_intervals}

    def describe(self) -> dict[str, Any]:
        """The CD description plus the skip and the guidance convention."""
        return {
            **super().describe(),
            "skip": self.skip,
            "guidance": {
                "convention": "diffusers: D_u + w (D_c - D_u), w = 1 is the conditional model",
                "range": list(self.guidance_range),
                "embedding": self.guidance_embedding,
            },
        }


def _device(models: Models) -> torch.device:
    dev = models.extras.get("device")
    return torch.device(dev) if dev is not None else torch.device("cpu")
