"""Training and evaluation batches for Keras: a reproducible per-epoch order and fixed-shape batches.

The order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a run resumed at any step sees the
batches an uninterrupted run sees. The Trainer's last batch of an epoch is short; here it is filled with
padding rows whose labels are all -100, which leaves the batch's mean token loss and its gradients exactly as
the short batch's while every batch keeps one shape (one XLA compilation, no retracing).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from clm.backends.tf.distribute import shard_by_data
from clm.backends.tf.runtime import tf
from clm.collate import IGNORE_INDEX, collate_blocks

if TYPE_CHECKING:
    from datasets import Dataset

PAD_ROW_ID = -1  # input_ids of the padding row; no real token id is negative


def steps_per_epoch(n_blocks: int, batch_size: int) -> int:
    return max(1, math.ceil(n_blocks / batch_size))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_indices(n: int, batch_size: int, seed: int, start: int, stop: int, wrap: bool = False) -> np.ndarray:
    """Row indices for optimizer steps [start, stop), ``batch_size`` per step. The last batch of an epoch is
    filled with padding rows (index ``n``), or, with ``wrap`` (several workers, where a worker's share could
    be padding only), with rows from the start of the epoch, as PyTorch's DistributedSampler does."""
    per_epoch = steps_per_epoch(n, batch_size)
    parts = []
    for epoch in range(start // per_epoch, (stop - 1) // per_epoch + 1):
        order = epoch_order(n, seed, epoch)
        fill = per_epoch * batch_size - n
        order = np.concatenate([order, np.resize(order, fill) if wrap else np.full(fill, n)])
        first = epoch * per_epoch
        lo, hi = max(start, first) - first, min(stop, first + per_epoch) - first
        parts.append(order[lo * batch_size:hi * batch_size])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def eval_indices(n: int, batch_size: int) -> np.ndarray:
    return np.concatenate([np.arange(n), np.full(steps_per_epoch(n, batch_size) * batch_size - n, n)])


def with_padding_row(ds: "Dataset") -> "Dataset":
    """``ds`` plus one row (index ``len(ds)``) that collates to a fully masked block."""
    from datasets import Dataset, concatenate_datasets

    first = ds[0]
    row = {name: [[PAD_ROW_ID if name == "input_ids" else 0] * len(first[name])] for name in ds.column_names}
    return concatenate_datasets([ds, Dataset.from_dict(row, features=ds.features)])


def collate_fixed(features: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """clm.collate.collate_blocks, plus an attention mask on every batch (all ones except padding rows), so
    every batch has the same keys. A mask of ones changes no logit: GPT-2 adds (1 - mask) * -10000."""
    batch = collate_blocks(features)
    ids = batch["input_ids"]
    pad = ids[:, 0] == PAD_ROW_ID
    mask = batch.get("attention_mask", np.ones_like(ids))
    if pad.any():
        ids[pad] = 0
        mask[pad] = 0
        batch["labels"][pad] = IGNORE_INDEX
    batch["attention_mask"] = mask
    return batch


def tf_batches(model: Any, ds: "Dataset", indices: np.ndarray, batch_size: int):
    """The guide's ``model.prepare_tf_dataset``, in our order (hence shuffle=False) and with full batches."""
    rows = with_padding_row(ds).select(indices)
    return shard_by_data(model.prepare_tf_dataset(rows, shuffle=False, batch_size=batch_size,
                                                  collate_fn=collate_fixed, drop_remainder=True))


def stream_batches(stream: Any, batch_size: int, block_size: int, skip_blocks: int = 0):
    """Fixed-shape batches from a packed ``IterableDataset`` (--streaming), as ``tf_batches`` gives them,
    repeating the stream if it runs out. ``skip_blocks`` blocks are passed over first, so a resumed run
    continues where the checkpoint left the stream (the stream's shuffle is seeded, so its order repeats)."""
    def rows() -> Any:
        seen, epoch = 0, 0
        while True:
            if hasattr(stream, "set_epoch"):
                stream.set_epoch(epoch)
            empty = True
            for row in stream:
                empty = False
                if seen >= skip_blocks:
                    yield row
                seen += 1
            if empty:
                return
            epoch += 1

    # Packed examples (bfd/none) also carry their position ids
    names = ["input_ids", "attention_mask"] + (["position_ids"] if "position_ids" in (stream.features or {}) else [])

    def batches() -> Any:
        buffer = []
        for row in rows():
            buffer.append(row)
            if len(buffer) == batch_size:
                batch = collate_fixed(buffer)
                buffer = []
                yield {name: batch[name] for name in names}, batch["labels"]

    spec = tf.TensorSpec((batch_size, block_size), tf.int64)
    return shard_by_data(tf.data.Dataset.from_generator(
        batches, output_signature=({name: spec for name in names}, spec)).prefetch(2))
