"""Accuracy, as an ``evaluate`` metric script shipped inside clm (loaded by local path: no Hub download).

The same computation as the Hub's ``accuracy`` metric that run_clm.py loads (the fraction of predictions equal
to their reference, optionally weighted), written with NumPy so it needs no scikit-learn.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions equal to their reference (weighted by sample_weight)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels (token ids).
    references (list of int): true labels (token ids).
    normalize (bool): if False, the (weighted) number of correct predictions instead of the fraction.
    sample_weight (list of float): per-prediction weights; default all 1.
Returns:
    accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weight = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        hits = float(np.sum(weight * correct))
        if not normalize:
            return {"accuracy": hits}
        total = float(np.sum(weight))
        return {"accuracy": hits / total if total else float("nan")}
