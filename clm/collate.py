"""Batch collation shared by both backends, in NumPy so neither framework is needed here.

Labels are a copy of ``input_ids`` with only padding set to -100, or the rows' own (examples). The guide's
``DataCollatorForLanguageModeling(mlm=False)`` with ``pad_token = eos_token`` also masks every EOS label,
so a fine-tuned model never learns to stop; blocks are fixed-length, so nothing else needs masking.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100


def collate_blocks(features: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows to a batch of int64 arrays. Rows that carry ``labels`` (examples: -100 where no loss) keep them;
    ``position_ids`` (bfd/none rows) go to the model, whose attention stays inside each example."""
    input_ids = np.asarray([f["input_ids"] for f in features], dtype=np.int64)
    batch = {"input_ids": input_ids}
    if "labels" in features[0]:
        labels = np.asarray([f["labels"] for f in features], dtype=np.int64)
    else:
        labels = input_ids.copy()
    if "attention_mask" in features[0]:
        mask = np.asarray([f["attention_mask"] for f in features], dtype=np.int64)
        labels[mask == 0] = IGNORE_INDEX
        batch["attention_mask"] = mask
    if "position_ids" in features[0]:
        batch["position_ids"] = np.asarray([f["position_ids"] for f in features], dtype=np.int64)
    batch["labels"] = labels
    return batch
