"""Published optimised step tables, as data: Align Your Steps and GITS noise levels.

Every table is a decreasing list of k-diffusion noise levels ``sigma`` (``sigma / alpha`` of a VP
model, the EDM noise level of an EDM model) for one model family; :func:`fewstep.schedules.time_grid`
maps them to a schedule's times (``spacing="ays_sd15"``, ...) and interpolates other step counts
log-linearly, the rule the tables' authors give.

* **Align Your Steps** (Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling
  Schedules in Diffusion Models", ICML 2024): the 10-step schedules the authors publish on NVIDIA's
  "Align Your Steps: how to use" page (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html),
  with their rule for other step counts (interpolate ``log sigma`` linearly over the table's
  positions).  For Stable Diffusion 1.5 and SDXL the page gives the schedule as training timesteps
  of the 1000-step model (``AYS_TIMESTEPS``, also in ``diffusers.schedulers.AysSchedules``); their
  levels are the model's own sigmas there, which is what ComfyUI's AlignYourStepsScheduler uses (the
  page's rounded sigma lists differ from those by up to 0.003).  Stable Video Diffusion's is a
  list of EDM sigmas (``AYS_SIGMAS``).  Each table has 11 levels for 10 steps: the last one is the
  model's smallest training noise level, which a grid onto clean data replaces by ``sigma = 0``
  (as the authors' and ComfyUI's samplers do).
* **GITS** (Chen, Zhou, Wang, Shen & Lyu 2024, "On the Trajectory Regularity of ODE-based
  Diffusion Sampling", ICML 2024): the dynamic-programming schedules the authors computed for
  Stable Diffusion 1.5 with their default coefficient 1.20, one row per step count 2..20 (the
  authors' ComfyUI contribution, comfyanonymous/ComfyUI pull request 3769); more steps
  interpolate the 20-step row log-linearly, as the authors' node does.
"""

from __future__ import annotations

__all__ = ["AYS_TIMESTEPS", "AYS_SIGMAS", "GITS_SD15"]

# 10 steps, training timesteps of a 1000-step VP model (the last, 0, is its sigma_min)
AYS_TIMESTEPS: dict[str, tuple[int, ...]] = {
    "ays_sd15": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0),
    "ays_sdxl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0),
}
# 10 steps, EDM sigma levels (the last is sigma_min)
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "ays_svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

# GITS, Stable Diffusion 1.5, coefficient 1.20: GITS_SD15[n - 2] holds the n + 1 levels of n steps
GITS_SD15: tuple[tuple[float, ...], ...] = (
    (14.61464119, 0.803307, 0.02916753),
    (14.61464119, 1.56271636, 0.52423614, 0.02916753),
    (14.61464119, 2.36326075, 0.92192322, 0.36617002, 0.02916753),
    (14.61464119, 2.84484982, 1.24153244, 0.59516323, 0.25053367, 0.02916753),
    (14.61464119, 5.85520077, 2.05039096, 0.95350921, 0.45573691, 0.17026083, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.24153244, 0.64427125, 0.29807833, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.36964464, 0.803307, 0.45573691, 0.25053367, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.61558151, 0.95350921, 0.59516323, 0.36617002, 0.19894916, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823, 0.19894916, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.95596409, 1.84880662, 1.24153244, 0.83188516, 0.59516323, 0.41087446, 0.27464288, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 3.07277966, 1.98035145, 1.36964464, 0.95350921, 0.69515091, 0.50118381, 0.36617002, 0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.36326075, 1.56271636, 1.08895338, 0.803307, 0.59516323, 0.45573691, 0.34370604, 0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.45070267, 1.61558151, 1.162866, 0.86115354, 0.64427125, 0.50118381, 0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125, 0.50118381, 0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125, 0.50118381, 0.41087446, 0.32104823, 0.25053367, 0.19894916, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125, 0.50118381, 0.41087446, 0.34370604, 0.27464288, 0.22545385, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.20157266, 0.92192322, 0.72133851, 0.57119018, 0.45573691, 0.36617002, 0.29807833, 0.25053367, 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048, 0.59516323, 0.4783645, 0.38853383, 0.32104823, 0.27464288, 0.22545385, 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048, 0.59516323, 0.50118381, 0.41087446, 0.34370604, 0.29807833, 0.25053367, 0.22545385, 0.19894916, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
)
