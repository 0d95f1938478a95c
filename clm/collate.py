"""Batch collation shared by both backends, in NumPy so neither framework is needed here.

Labels are a copy of ``input_ids`` with only padding set to -100. The guide's
``DataCollatorForLanguageModeling(mlm=False)`` with ``pad_token = eos_token`` also masks every EOS label,
so a fine-tuned model never learns to stop; blocks are fixed-length, so nothing else needs masking.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IGNORE_INDEX = -100


def collate_blocks(features: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    input_ids = np.asarray([f["input_ids"] for f in features], dtype=np.int64)
    batch = {"input_ids": input_ids}
    labels = input_ids.copy()
    if "attention_mask" in features[0]:
        mask = np.asarray([f["attention_mask"] for f in features], dtype=np.int64)
        labels[mask == 0] = IGNORE_INDEX
        batch["attention_mask"] = mask
    batch["labels"] = labels
    return batch
