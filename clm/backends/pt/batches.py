"""Batches for the Trainer: the shared NumPy collation (labels = input_ids, EOS kept) as torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clm.collate import collate_blocks


def torch_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch = collate_blocks(features)
    # Full blocks need no mask, but transformers' PyTorch models take a row that starts or ends with the pad id
    # (EOS stands in for it) for a padded one and warn unless a mask is passed: pass the all-ones mask it means.
    batch.setdefault("attention_mask", np.ones_like(batch["input_ids"]))
    return {k: torch.from_numpy(v) for k, v in batch.items()}
