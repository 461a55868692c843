"""Denoisers: prediction-type conversion, diffusers wrappers, guidance, and the exact
Gaussian-mixture model."""

from fewstep.models.diffusers_models import DiffusersDenoiser
from fewstep.models.guidance import ClassifierFreeGuidance
from fewstep.models.mixture import GaussianMixture, MixtureDenoiser, MixtureVelocity, digits_data
from fewstep.models.prediction import (
    PREDICTION_TYPES,
    EDMPreconditioning,
    PredictionDenoiser,
    canonical_prediction_type,
    check_prediction_type,
    from_x0,
    to_x0,
)

__all__ = [
    "PREDICTION_TYPES",
    "PredictionDenoiser",
    "DiffusersDenoiser",
    "ClassifierFreeGuidance",
    "GaussianMixture",
    "MixtureDenoiser",
    "MixtureVelocity",
    "EDMPreconditioning",
    "digits_data",
    "canonical_prediction_type",
    "check_prediction_type",
    "to_x0",
    "from_x0",
]
