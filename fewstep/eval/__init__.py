"""Evaluation: Fréchet distance and KID, feature extractors, reference statistics, FID per NFE,
exact-model error tables and the report."""

from fewstep.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats

__all__ = [
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_stats",
    "kernel_inception_distance",
    "RunningStats",
    "get_extractor",
    "reference_stats",
    "fid_per_nfe",
]

_LAZY = {
    "kernel_inception_distance": "fewstep.eval.kid",
    "RunningStats": "fewstep.eval.stats",
    "get_extractor": "fewstep.eval.features",
    "reference_stats": "fewstep.eval.reference",
    "fid_per_nfe": "fewstep.eval.fid",
}


def __getattr__(name: str):
    # Submodules are imported when first asked for, so `import fewstep.eval.frechet` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fewstep.eval' has no attribute {name!r}")
