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

from clm.data.mapped import cache_paths, release_mapped
from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from clm.config import TrainConfig

# Rows gathered at a time when packing a shuffled split: bounds the memory beyond the packed blocks (1024
# rows of ~1700 tokens: about 7 MB of ids, a few copies of it in flight).
PACK_CHUNK_ROWS = 1024
SCATTERED_RELEASE_ROWS = 64


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


def _blocks_table(arrays: list[Any], masks: Optional[list[Any]], block_size: int) -> Any:
    import pyarrow as pa

    columns = {"input_ids": pa.chunked_array(arrays, type=pa.list_(pa.int32(), block_size))}
    if masks is not None:
        columns["attention_mask"] = pa.chunked_array(masks, type=pa.list_(pa.int8(), block_size))
    return pa.table(columns)


def _pack_pieces(pieces: Iterable[np.ndarray], block_size: int, keep_remainder: bool, pad_id: int,
                 path: Optional[str] = None, total_tokens: Optional[int] = None) -> tuple["Dataset", int]:
    """Pack a token stream given in pieces: (blocks, tokens seen). Only the final remainder is dropped, or
    padded and masked with ``keep_remainder``. Fixed-size Arrow lists built from NumPy: no cast, no loop.

    With ``path`` the blocks are written there as they are cut (an Arrow file, returned memory-mapped), so
    memory holds one piece, not the split; ``total_tokens`` (needed with ``keep_remainder``) says up front
    whether a padded tail, and so an attention mask column, will come."""
    from datasets import Dataset

    packer = BlockPacker(block_size)
    ids: list[Any] = []
    if keep_remainder and path is not None and total_tokens is None:
        raise ValueError("_pack_pieces: keep_remainder with a path needs total_tokens")
    masked = keep_remainder and (total_tokens is None or total_tokens % block_size > 0)
    writer = None
    if path is not None:
        from datasets import Features
        from datasets.arrow_writer import ArrowWriter

        schema = _blocks_table([], [] if masked else None, block_size).schema
        writer = ArrowWriter(features=Features.from_arrow_schema(schema), path=path)
    ones = None

    def emit(blocks: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        nonlocal ones
        array = _fixed_size(blocks, block_size)
        if writer is None:
            ids.append(array)
            return
        masks = None
        if masked:
            if mask is None:
                if ones is None or len(ones) < blocks.size:
                    ones = np.ones(blocks.size, dtype=np.int8)
                mask = ones[:blocks.size]
            masks = [_fixed_size(mask, block_size)]
        writer.write_table(_blocks_table([array], masks, block_size))

    for piece in pieces:
        blocks = packer.feed(piece)
        if len(blocks):
            emit(blocks)
    rest = len(packer.remainder)
    n_full = packer.tokens // block_size
    tail_mask = None
    if keep_remainder and rest:
        tail = np.full(block_size, pad_id, dtype=np.int32)
        tail[:rest] = packer.remainder
        tail_mask = np.ones(block_size, dtype=np.int8)
        tail_mask[rest:] = 0
        emit(tail, tail_mask)
    if writer is not None:
        writer.finalize()
        writer.close()
        return Dataset.from_file(path), packer.tokens
    masks = None
    if tail_mask is not None:
        mask = np.ones((n_full + 1) * block_size, dtype=np.int8)
        mask[n_full * block_size:] = tail_mask
        masks = [_fixed_size(mask, block_size)]
    return Dataset(_blocks_table(ids, masks, block_size)), packer.tokens


def pack(tokens: Any, block_size: int, keep_remainder: bool = False, pad_id: int = 0) -> "Dataset":
    """Cut one token stream into ``block_size`` rows. Only the final remainder is dropped, or, with
    ``keep_remainder``, padded and masked (``attention_mask`` 0 on the padding, ignored in the loss)."""
    return _pack_pieces([tokens], block_size, keep_remainder, pad_id)[0]


def _row_pieces(column: Any, rows: Optional[np.ndarray], release: list[str]) -> Iterator[np.ndarray]:
    """The token ids of ``column`` (Arrow list<int32>), rows in the order ``rows`` gives (all rows in
    order if None), as flat arrays of at most ``PACK_CHUNK_ROWS`` rows each: bounded extra memory. The
    pages of the memory-mapped files ``release`` that a chunk read are dropped after it (``release_mapped``)."""
    if rows is None:
        for chunk in column.chunks:
            for start in range(0, len(chunk), PACK_CHUNK_ROWS):
                # flatten() honours slices and offsets
                yield chunk.slice(start, PACK_CHUNK_ROWS).flatten().to_numpy(zero_copy_only=False)
                release_mapped(release)
        return
    # Rows in another order: copy each row out of its chunk's (memory-mapped) offsets and values. Not
    # ChunkedArray.take, which concatenates every chunk first: a copy of the whole split's tokens per call.
    # Scattered reads fault in far more than they read (the kernel maps whole windows of pages around each
    # one), so the mapped pages are dropped every SCATTERED_RELEASE_ROWS rows, not once per piece.
    rows = np.asarray(rows, dtype=np.int64)
    bounds = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    views = [(chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=False)) for chunk in column.chunks]
    for start in range(0, len(rows), PACK_CHUNK_ROWS):
        selected = rows[start:start + PACK_CHUNK_ROWS]
        spans = []
        for row, c in zip(selected.tolist(), (np.searchsorted(bounds, selected, side="right") - 1).tolist()):
            offsets, values = views[c]
            spans.append((values, int(offsets[row - bounds[c]]), int(offsets[row - bounds[c] + 1])))
        piece = np.empty(sum(end - begin for _, begin, end in spans), dtype=views[0][1].dtype)
        at = 0
        for i, (values, begin, end) in enumerate(spans, start=1):
            piece[at:at + end - begin] = values[begin:end]
            at += end - begin
            if i % SCATTERED_RELEASE_ROWS == 0:
                release_mapped(release)
        release_mapped(release)
        yield piece


def _token_count(column: Any, rows: Optional[np.ndarray]) -> int:
    """Tokens in ``rows`` of ``column`` (all rows if None), from the list offsets alone."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(column)
    if rows is None:
        return int(pc.sum(lengths).as_py() or 0)
    return int(lengths.to_numpy(zero_copy_only=False).astype(np.int64)[rows].sum())


def pack_split(ds: "Dataset", config: "TrainConfig", pad_id: int, name: str,
               rows: Optional[np.ndarray] = None, path: Optional[str] = None) -> "Dataset":
    """Pack a tokenized split (rows of ``input_ids``) across row and batch boundaries, in ``ds``'s own order
    (a shuffled or selected view is read as such), or in the order ``rows`` (positions in ``ds.data``) gives.
    With ``path`` the blocks are written to that Arrow file as they are cut and returned memory-mapped from it:
    memory stays bounded whatever the split's size."""
    if rows is None and ds._indices is not None:
        rows = ds._indices.column(0).to_numpy()
    # (map on zero rows may leave no column at all: nothing to pack)
    has_ids = "input_ids" in ds.data.column_names
    column = ds.data.column("input_ids") if has_ids else None
    pieces = _row_pieces(column, rows, cache_paths(ds)) if has_ids else []
    total = (_token_count(column, rows) if has_ids else 0) if path is not None and config.keep_remainder else None
    packed, n_tokens = _pack_pieces(pieces, config.block_size, config.keep_remainder, pad_id, path, total)
    if len(packed) == 0:
        raise DataError(
            f"the {name} split has {n_tokens} tokens, fewer than one block of {config.block_size}; "
            f"add data, lower --block_size, or raise --test_size")
    return packed
