"""Packing a token stream into fixed-length blocks: Arrow and NumPy on whole pieces, no loop over tokens.

Only the final remainder of a split is dropped (the guide drops one per map batch), or, with
``keep_remainder``, padded and masked. ``BlockPacker`` holds at most ``block_size - 1`` tokens between pieces,
so the streaming path (``clm.streaming``) packs in bounded memory with the same result.
"""

from __future__ import annotations

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

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.tokens = 0  # fed so far
        self.remainder = np.zeros(0, dtype=np.int32)

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Full blocks completed by ``tokens``, shape (n, block_size), int32 (n may be 0)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        self.tokens += len(tokens)
        buffer = np.concatenate([self.remainder, tokens]) if len(self.remainder) else tokens
        n = len(buffer) // self.block_size
        self.remainder = buffer[n * self.block_size:].copy()  # a copy: don't pin the whole piece
        return buffer[: n * self.block_size].reshape(n, self.block_size)


def _split_token_pieces(column: Any, rows: Optional[np.ndarray]) -> Iterator[np.ndarray]:
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


def pack(tokens: np.ndarray, block_size: int, keep_remainder: bool = False, pad_id: int = 0) -> "Dataset":
    """Cut one token stream into ``block_size`` rows. Only the final remainder is dropped, or, with
    ``keep_remainder``, padded and masked (``attention_mask`` 0 on the padding, ignored in the loss)."""
    return _pack_pieces([tokens], block_size, keep_remainder, pad_id)[0]


def pack_rows(tokenized: "Dataset", rows: Optional[np.ndarray], config: "TrainConfig", pad_id: int,
               name: str) -> "Dataset":
    """Pack the token rows of ``tokenized`` (in the order ``rows`` gives) across row and batch boundaries."""
    # (map on zero rows may leave no column at all: nothing to pack)
    pieces = (_split_token_pieces(tokenized.data.column("input_ids"), rows)
              if "input_ids" in tokenized.data.column_names else [])
    packed, n_tokens = _pack_pieces(pieces, config.block_size, config.keep_remainder, pad_id)
    if len(packed) == 0:
        raise DataError(
            f"the {name} split has {n_tokens} tokens, fewer than one block of {config.block_size}; "
            f"add data, lower --block_size, or raise --test_size")
    return packed


def pack_split(ds: "Dataset", config: "TrainConfig", pad_id: int, name: str) -> "Dataset":
    """Pack a tokenized split (rows of ``input_ids``, any row order or selection) into blocks."""
    rows = None
    if ds._indices is not None:  # a shuffled or selected view: read its rows in its order
        rows = ds._indices.column(0).to_numpy()
    return pack_rows(ds, rows, config, pad_id, name)


def iter_token_blocks(pieces: Iterable[Any], block_size: int) -> Iterator[np.ndarray]:
    """Blocks of ``block_size`` tokens from a stream of token rows or arrays of any length, the remainder
    carried across them (bounded memory); the final remainder is dropped, so ``pack`` on the concatenated
    stream gives the same blocks."""
    packer = BlockPacker(block_size)
    for piece in pieces:
        yield from packer.feed(piece)
