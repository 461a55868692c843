"""Evaluation: Fréchet distances, exact-model error tables and reports."""

from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats

__all__ = ["frechet_distance", "frechet_distance_from_features", "gaussian_stats"]
