"""Optional per-cell metrics of :func:`fewstep.eval.fid.fid_per_nfe` (``extra_metrics=``), checked
before any work and computed from the stored features of a cell:

* ``"precision_recall"``: :func:`fewstep.eval.precision_recall.precision_recall` (k = 3) against
  the reference features;
* ``"inception_score"``: :func:`fewstep.eval.inception_score.inception_score` of the extractor's
  classifier logits (``extractor.logits_from_features``: Inception's 1008 classes, or the digits
  network's 10);
* ``"cmmd"``: :func:`fewstep.eval.cmmd.cmmd` against the reference features (meaningful on CLIP
  embeddings, ``--extractor clip``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fewstep._util import close_matches

__all__ = ["EXTRA_METRICS", "check_extra_metrics", "extra_metric_values"]

EXTRA_METRICS = ("precision_recall", "inception_score", "cmmd")


def check_extra_metrics(names: Sequence[str], extractor: Any, reference: Any) -> None:
    """A ``ValueError`` for a metric that is unknown or cannot be computed with this extractor and
    reference (before any sample is generated)."""
    for n in names:
        if n not in EXTRA_METRICS:
            raise ValueError(f"unknown metric {n!r}{close_matches(n, EXTRA_METRICS)}; choose from {', '.join(EXTRA_METRICS)}")
        if n in ("precision_recall", "cmmd") and reference.features is None:
            raise ValueError(f"{n} needs the reference's features, and these reference statistics hold only mu and sigma "
                             "(compute them from the images with fewstep.eval.reference.reference_stats)")
        if n == "inception_score" and not hasattr(extractor, "logits_from_features"):
            raise ValueError(f"inception_score needs an extractor with a classifier (inception, inception-tf, digits), "
                             f"not {getattr(extractor, 'name', extractor)!r}")


def extra_metric_values(names: Sequence[str], features: np.ndarray, reference_features: np.ndarray | None,
                        extractor: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in names:
        if n == "precision_recall":
            from fewstep.eval.precision_recall import precision_recall

            out["precision"], out["recall"] = precision_recall(features, reference_features)
        elif n == "inception_score":
            from fewstep.eval.inception_score import inception_score

            out["inception_score"], out["inception_score_std"] = inception_score(extractor.logits_from_features(features))
        elif n == "cmmd":
            from fewstep.eval.cmmd import cmmd

            out["cmmd"] = cmmd(features, reference_features)
    return out
