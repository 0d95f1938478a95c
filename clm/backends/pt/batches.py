"""Batches for the Trainer: the shared NumPy collation (labels = input_ids, EOS kept) as torch tensors."""

from __future__ import annotations

from typing import Any

import torch

from clm.collate import collate_blocks


def torch_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in collate_blocks(features).items()}
