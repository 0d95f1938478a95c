"""Packing whole examples into rows of ``block_size`` tokens: ``bfd`` (best-fit decreasing) and ``none`` (one
example per row). The guide's concatenate-and-cut packing (``wrapped``) is ``clm.data.blocks``.

Rows hold ``input_ids``, ``labels`` (-100 where no loss) and ``position_ids``, which restart at 0 at each
example; the backends keep attention inside each example by those restarts. An example longer than a block is
split into block-sized pieces, each its own example. The first label of every piece is -100: nothing in the
row predicts it (a model's loss compares the prediction at t with the label at t + 1, and the token before it
belongs to another example), so ``bfd`` and ``none`` score exactly the same tokens. The padding that fills a
row is one more segment, positions restarting, labels -100.

Examples are packed in groups of ``PACK_GROUP`` (in order), prepared and streamed alike: memory is bounded by
a group whatever the corpus size, and a stream and a prepared split of the same examples in the same order give
the same rows.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np

from clm.collate import IGNORE_INDEX
from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

PACK_GROUP = 10_000  # examples packed together: near-optimal fill, bounded memory
PACKED_COLUMNS = ("input_ids", "labels", "position_ids")


@dataclass
class PackStats:
    """What packing did, for the log (and the benchmark's padding fraction)."""

    examples: int = 0
    split: int = 0  # examples longer than a block, split into pieces
    rows: int = 0
    tokens: int = 0  # real (non-padding) tokens
    padding: int = 0

    def add(self, other: "PackStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def padding_fraction(self) -> float:
        return self.padding / max(1, self.padding + self.tokens)

    def log(self, name: str, mode: str, block_size: int) -> None:
        logger.info("Packed the %s split (%s): %d examples into %d rows of %d tokens, %.1f%% padding%s", name,
                    mode, self.examples, self.rows, block_size, 100 * self.padding_fraction,
                    f"; {self.split} examples longer than a block were split into pieces" if self.split else "")


def _pieces(offsets: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(start, length) of every piece of at most ``block_size`` tokens, example by example; and how many
    examples were split."""
    lengths = np.diff(offsets)
    counts = -(-lengths // block_size)  # ceil; an empty example has no piece
    example = np.repeat(np.arange(len(lengths)), counts)
    k = np.arange(len(example)) - np.repeat(np.cumsum(counts) - counts, counts)
    start = offsets[:-1][example] + k * block_size
    return start, np.minimum(block_size, lengths[example] - k * block_size), int(np.sum(counts > 1))


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bins for items of ``lengths`` (each <= capacity): longest first, each into the bin it fills most
    tightly, a new bin when none has room. Returns each item's bin and offset in it, and the bin count."""
    order = np.argsort(-lengths, kind="stable")
    bins = np.empty(len(lengths), dtype=np.int64)
    at = np.empty(len(lengths), dtype=np.int64)
    room: list[tuple[int, int]] = []  # (space left, bin), sorted: the tightest fit is a bisection away
    filled: list[int] = []
    for item in order.tolist():
        need = int(lengths[item])
        i = bisect.bisect_left(room, (need, -1))
        if i < len(room):
            left, b = room.pop(i)
        else:
            left, b = capacity, len(filled)
            filled.append(0)
        bins[item], at[item] = b, filled[b]
        filled[b] += need
        if left - need > 0:
            bisect.insort(room, (left - need, b))
    return bins, at, len(filled)


def pack_group(ids: np.ndarray, labels: Optional[np.ndarray], offsets: np.ndarray, block_size: int, mode: str,
               pad_id: int) -> tuple[dict[str, np.ndarray], PackStats]:
    """One group of examples (flat ``ids`` and ``labels``, example ``i`` at ``offsets[i]:offsets[i+1]``; labels
    None: every token trained) as rows: ``{"input_ids", "labels", "position_ids"}`` of shape (rows, block_size)."""
    start, length, split = _pieces(offsets, block_size)
    if mode == "bfd":
        row, at, n_rows = best_fit_decreasing(length, block_size)
    else:  # none
        row, at, n_rows = np.arange(len(length)), np.zeros(len(length), dtype=np.int64), len(length)
    out_ids = np.full((n_rows, block_size), pad_id, dtype=np.int32)
    out_labels = np.full((n_rows, block_size), IGNORE_INDEX, dtype=np.int32)
    positions = np.zeros((n_rows, block_size), dtype=np.int32)
    # Token by token without a Python loop: piece p's j-th token goes from start[p] + j to row[p], at[p] + j.
    before = np.cumsum(length) - length
    j = np.arange(int(length.sum())) - np.repeat(before, length)
    source = np.repeat(start, length) + j
    target = np.repeat(row * block_size + at, length) + j
    out_ids.reshape(-1)[target] = ids[source]
    out_labels.reshape(-1)[target] = (ids if labels is None else labels)[source]
    positions.reshape(-1)[target] = j
    out_labels.reshape(-1)[row * block_size + at] = IGNORE_INDEX  # nothing in the row predicts a piece's start
    used = np.bincount(row, weights=length, minlength=n_rows).astype(np.int64)
    cols = np.arange(block_size)
    pad = cols[None, :] >= used[:, None]
    positions[pad] = (cols[None, :] - used[:, None])[pad]  # the padding: one more segment
    stats = PackStats(examples=len(offsets) - 1, split=split, rows=n_rows, tokens=int(length.sum()),
                      padding=n_rows * block_size - int(length.sum()))
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": positions}, stats


def rows_table(rows: dict[str, np.ndarray], block_size: int) -> Any:
    """Packed rows as an Arrow table of fixed-size int32 lists."""
    import pyarrow as pa

    return pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(rows[name].reshape(-1)), block_size)
                     for name in PACKED_COLUMNS})


def _flat(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> Arrow column as (flat values, offsets from 0)."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def pack_examples_split(ds: "Dataset", block_size: int, mode: str, pad_id: int, name: str,
                        rows: Optional[np.ndarray] = None, path: Optional[str] = None) -> "Dataset":
    """A tokenized split (``input_ids``, and ``labels`` if the format has a loss mask) packed by ``mode``
    ('bfd' or 'none'), group by group, in ``rows``' order (positions in ``ds``; all rows if None). With ``path``
    the rows are written to that Arrow file and returned memory-mapped from it."""
    from datasets import Dataset, Features
    from datasets.arrow_writer import ArrowWriter

    order = np.arange(len(ds)) if rows is None else np.asarray(rows)
    stats = PackStats()
    tables = []
    writer = None
    if path is not None:  # group by group into the file: memory holds one group
        schema = rows_table({c: np.zeros((0, block_size), np.int32) for c in PACKED_COLUMNS}, block_size).schema
        writer = ArrowWriter(features=Features.from_arrow_schema(schema), path=path)
    has_labels = "labels" in ds.column_names
    for begin in range(0, len(order), PACK_GROUP):
        part = ds.select(order[begin:begin + PACK_GROUP]).with_format("arrow")[:]
        ids, offsets = _flat(part.column("input_ids"))
        labels = _flat(part.column("labels"))[0] if has_labels else None
        packed, part_stats = pack_group(ids, labels, offsets, block_size, mode, pad_id)
        stats.add(part_stats)
        table = rows_table(packed, block_size)
        if writer is None:
            tables.append(table)
        else:
            writer.write_table(table)
    if stats.rows == 0:
        raise DataError(f"the {name} split has no examples to train on; add data")
    stats.log(name, mode, block_size)
    if writer is not None:
        writer.finalize()
        writer.close()
        return Dataset.from_file(path)
    import pyarrow as pa

    return Dataset(pa.concat_tables(tables))


def pack_stream(examples: Iterable[tuple[list[int], Optional[list[int]]]], block_size: int, mode: str,
                pad_id: int, group: int = PACK_GROUP) -> Iterator[dict[str, list[int]]]:
    """Rows from a stream of (input_ids, labels or None) examples, packed ``group`` examples at a time: memory
    holds one group, whatever the stream's length. The rows ``pack_examples_split`` makes of the same examples
    in the same order."""
    held: list[tuple[list[int], Optional[list[int]]]] = []

    def flush() -> Iterator[dict[str, list[int]]]:
        offsets = np.cumsum([0] + [len(i) for i, _ in held]).astype(np.int64)
        ids = np.fromiter((t for i, _ in held for t in i), dtype=np.int32, count=int(offsets[-1]))
        labels = None if held[0][1] is None else np.fromiter(
            (t for _, lab in held for t in lab), dtype=np.int32, count=int(offsets[-1]))
        packed, _ = pack_group(ids, labels, offsets, block_size, mode, pad_id)
        for r in range(len(packed["input_ids"])):
            yield {name: packed[name][r].tolist() for name in PACKED_COLUMNS}

    for example in examples:
        held.append(example)
        if len(held) == group:
            yield from flush()
            held = []
    if held:
        yield from flush()


def write_rows(table: Any, path: str) -> "Dataset":
    """An Arrow table written to ``path`` as ``datasets`` writes its files, returned memory-mapped from it."""
    from datasets import Dataset, Features
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=Features.from_arrow_schema(table.schema), path=path)
    writer.write_table(table)
    writer.finalize()
    writer.close()
    return Dataset.from_file(path)
