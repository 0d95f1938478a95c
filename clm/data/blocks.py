"""Blocks: one packer (``BlockPacker``) cuts a token stream into fixed-length rows; everything else is built on it.

- ``pack_split``: a tokenized split (any row order) -> ``Dataset`` of blocks, as ``prepare_dataset`` stores it.
- ``pack``: one token array -> ``Dataset`` of blocks.
- ``BlockPacker.blocks``: blocks from a stream of token pieces, in bounded memory (the streaming mode).
- ``group_texts``: the guide's ``Dataset.map`` function.

Only the final remainder of a split is dropped (the guide drops one per map batch), or, with
``keep_remainder``, padded and masked. Arrow and NumPy on whole pieces: no Python loop over tokens.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np

from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from clm.config import TrainConfig

# Rows gathered at a time when packing a shuffled split: bounds the memory beyond the packed blocks.
PACK_CHUNK_ROWS = 8192


class BlockPacker:
    """Cuts a token stream, fed in pieces of any size, into ``block_size`` rows. Holds only the remainder
    (fewer than ``block_size`` tokens) between pieces, so memory does not grow with the stream."""

    def __init__(self, block_size: int, dtype: Any = np.int32) -> None:
        self.block_size = block_size
        self.dtype = dtype
        self.tokens = 0  # fed so far
        self.remainder = np.zeros(0, dtype=dtype)

    def feed(self, tokens: Any) -> np.ndarray:
        """Full blocks completed by ``tokens``, shape (n, block_size) (n may be 0)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self.tokens += len(tokens)
        buffer = np.concatenate([self.remainder, tokens]) if len(self.remainder) else tokens
        n = len(buffer) // self.block_size
        self.remainder = buffer[n * self.block_size:].copy()  # a copy: don't pin the whole piece
        return buffer[: n * self.block_size].reshape(n, self.block_size)

    def blocks(self, pieces: Iterable[Any]) -> Iterator[np.ndarray]:
        """Each block completed by ``pieces`` (token rows or arrays of any length), one at a time; the final
        remainder stays in ``remainder``, so the blocks are those ``pack`` cuts from the concatenation."""
        for piece in pieces:
            yield from self.feed(piece)


def group_texts(examples: dict[str, list[list[Any]]], block_size: int) -> dict[str, list[list[Any]]]:
    """The guide's ``group_texts``: concatenate every column, cut into ``block_size`` pieces, drop the
    remainder, set ``labels`` to a copy of ``input_ids``. Use with ``Dataset.map(batched=True)``.

    Same output as the guide for any batch with at least ``block_size`` tokens; unlike the guide it never
    emits a block shorter than ``block_size`` (a short batch yields no rows). NumPy instead of
    ``sum(lists, [])``, which is quadratic in the batch size.
    """
    result: dict[str, list[list[Any]]] = {}
    for key, rows in examples.items():
        total = sum(map(len, rows))  # chain.from_iterable walks the lists in C, not a Python generator
        flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)
        result[key] = BlockPacker(block_size, np.int64).feed(flat).tolist()  # int64: any id the guide takes
    result["labels"] = [list(block) for block in result["input_ids"]]
    return result


def _fixed_size(values: np.ndarray, block_size: int) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), block_size)


def _pack_pieces(pieces: Iterable[np.ndarray], block_size: int, keep_remainder: bool,
                 pad_id: int) -> tuple["Dataset", int]:
    """Pack a token stream given in pieces: (blocks, tokens seen). Only the final remainder is dropped, or
    padded and masked with ``keep_remainder``. Fixed-size Arrow lists built from NumPy: no cast, no loop."""
    import pyarrow as pa
    from datasets import Dataset

    packer = BlockPacker(block_size)
    ids = []
    for piece in pieces:
        blocks = packer.feed(piece)
        if len(blocks):
            ids.append(_fixed_size(blocks, block_size))
    columns = {"input_ids": ids}
    rest = len(packer.remainder)
    if keep_remainder and rest:
        tail = np.full(block_size, pad_id, dtype=np.int32)
        tail[:rest] = packer.remainder
        ids.append(_fixed_size(tail, block_size))
        n_full = sum(len(a) for a in ids) - 1
        mask = np.ones((n_full + 1) * block_size, dtype=np.int8)
        mask[n_full * block_size + rest:] = 0
        columns["attention_mask"] = [_fixed_size(mask, block_size)]
    types = {"input_ids": pa.int32(), "attention_mask": pa.int8()}
    table = pa.table({name: pa.chunked_array(arrays, type=pa.list_(types[name], block_size))
                      for name, arrays in columns.items()})
    return Dataset(table), packer.tokens


def pack(tokens: Any, block_size: int, keep_remainder: bool = False, pad_id: int = 0) -> "Dataset":
    """Cut one token stream into ``block_size`` rows. Only the final remainder is dropped, or, with
    ``keep_remainder``, padded and masked (``attention_mask`` 0 on the padding, ignored in the loss)."""
    return _pack_pieces([tokens], block_size, keep_remainder, pad_id)[0]


def _row_pieces(column: Any, rows: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    """The token ids of ``column`` (Arrow list<int32>), rows in the order ``rows`` gives (all rows in
    order if None), as flat arrays of at most ``PACK_CHUNK_ROWS`` rows each: bounded extra memory."""
    import pyarrow as pa

    if rows is None:
        pieces = iter(column.chunks)
    else:
        pieces = (chunk for start in range(0, len(rows), PACK_CHUNK_ROWS)
                  for chunk in column.take(pa.array(rows[start:start + PACK_CHUNK_ROWS])).chunks)
    for piece in pieces:
        yield piece.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slices and offsets


def pack_split(ds: "Dataset", config: "TrainConfig", pad_id: int, name: str,
               rows: Optional[np.ndarray] = None) -> "Dataset":
    """Pack a tokenized split (rows of ``input_ids``) across row and batch boundaries, in ``ds``'s own order
    (a shuffled or selected view is read as such), or in the order ``rows`` (positions in ``ds.data``) gives."""
    if rows is None and ds._indices is not None:
        rows = ds._indices.column(0).to_numpy()
    # (map on zero rows may leave no column at all: nothing to pack)
    pieces = _row_pieces(ds.data.column("input_ids"), rows) if "input_ids" in ds.data.column_names else []
    packed, n_tokens = _pack_pieces(pieces, config.block_size, config.keep_remainder, pad_id)
    if len(packed) == 0:
        raise DataError(
            f"the {name} split has {n_tokens} tokens, fewer than one block of {config.block_size}; "
            f"add data, lower --block_size, or raise --test_size")
    return packed
