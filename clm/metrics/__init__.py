"""Eval metrics beyond the loss: next-token accuracy as run_clm.py computes it, through ``evaluate``.

The metric script ships in this package (``accuracy.py``) and is loaded by its local path, so nothing is
fetched from the Hub. Framework-free: the backends reduce logits to predicted ids (PyTorch) or to counts
(TensorFlow) and hand NumPy here.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import numpy as np

from clm.collate import IGNORE_INDEX

ACCURACY_SCRIPT = Path(__file__).with_name("accuracy.py")


@functools.lru_cache(maxsize=1)
def accuracy_metric() -> Any:
    """clm's accuracy metric, loaded by path (``keep_in_memory``: no Arrow cache files per process)."""
    import evaluate

    return evaluate.load(str(ACCURACY_SCRIPT), keep_in_memory=True)


def shifted(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """run_clm.py's alignment: the prediction at position t is scored against the label at t + 1. Labels of
    -100 (padding of a kept remainder, padding rows) are left out, as the loss leaves them out."""
    preds = np.asarray(predictions)[:, :-1].reshape(-1)
    refs = np.asarray(labels)[:, 1:].reshape(-1)
    keep = refs != IGNORE_INDEX
    return preds[keep], refs[keep]


def next_token_accuracy(predictions: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """Accuracy of argmax predictions (``[blocks, block_size]`` ids) against the labels, shifted by one."""
    preds, refs = shifted(predictions, labels)
    if refs.size == 0:
        return None
    return float(accuracy_metric().compute(predictions=preds, references=refs)["accuracy"])


def token_loss(row_loss: np.ndarray, labels: np.ndarray) -> Optional[float]:
    """The eval loss over every scored token: the rows' summed next-token losses over the count of labels that
    some position predicts (not -100, first position excluded). Each batch's mean weighted by its rows would
    weigh a token by how full its row is."""
    scored = int(np.sum(np.asarray(labels)[:, 1:] != IGNORE_INDEX))
    return float(np.sum(np.asarray(row_loss, dtype=np.float64)) / scored) if scored else None


def accuracy_from_counts(correct: float, total: float) -> Optional[float]:
    """The same metric from a streaming reduction (correct and counted tokens): the two outcomes "right" and
    "wrong" weighted by their counts, which is what the per-token computation sums to."""
    if total <= 0:
        return None
    wrong = total - correct
    return float(accuracy_metric().compute(predictions=[1, 0], references=[1, 1],
                                           sample_weight=[correct, wrong])["accuracy"])
