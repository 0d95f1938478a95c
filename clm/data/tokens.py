"""Tokens: documents to token ids with a fast tokenizer, EOS appended to each document, for a ``Dataset``
(batched ``map``, worker processes when they pay) and for a stream (batches of bounded size).

Both modes call the same batch function, so a document gets the same ids either way. Only ``input_ids`` are
kept: the attention mask (all ones) and labels are derived at batch time (``clm.collate``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from clm.data.mapped import cache_paths, release_mapped
from clm.data.rows import arrow_texts, text_column_for
from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

# Documents per tokenizer call and per Arrow write: enough for the fast tokenizer's batch parallelism.
TOKENIZE_BATCH_SIZE = 1000
# A stream's batch also stops at this much text, so one batch's per-token objects stay a few tens of MB.
TOKENIZE_BATCH_CHARS = 1 << 20
# Rows per worker process below which one process is faster.
MIN_ROWS_PER_WORKER = 1000
MIN_TEXT_BYTES_PER_WORKER = 4 << 20  # about a million tokens, a second or two of tokenizing


def pad_id_for(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The id that fills a --keep_remainder tail block (masked, so never learned): pad, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


def _tokenize_fn(tokenizer: "PreTrainedTokenizerBase", join_with_eos: bool,
                 release: Sequence[str] = ()) -> Callable[[Any], Any]:
    """Batch of texts (Arrow) -> Arrow table of token ids (int32 lists), EOS appended if asked. ``release``: the
    memory-mapped files the texts come from, whose pages are dropped after each batch (``release_mapped``), so
    a pass over the corpus does not keep it all resident."""
    eos = tokenizer.eos_token_id
    if join_with_eos and eos is None:
        raise DataError("--join_with_eos needs a tokenizer with an EOS token; add --no_join_with_eos")

    def tokenize_batch(column: Any) -> Any:
        import pyarrow as pa

        ids = tokenizer(arrow_texts(column), return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        if join_with_eos:
            for row in ids:  # fresh lists: appending in place costs one call per row, not a copy
                row.append(eos)
        release_mapped(release)
        return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))})

    return tokenize_batch


def cpu_count() -> int:
    """The cores this process may use (containers, taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_count(config: "TrainConfig", rows: int, text_bytes: int = 0) -> Optional[int]:
    """Tokenizing processes for ``rows`` rows holding ``text_bytes`` of text; None for one (no pool)."""
    # Worker processes cost a second or so to start; use them only where each gets a real share of the
    # work: enough rows, or enough text (a few long documents are worth splitting too).
    workers = config.preprocessing_num_workers or cpu_count()
    share = max(rows // MIN_ROWS_PER_WORKER, text_bytes // MIN_TEXT_BYTES_PER_WORKER)
    workers = min(workers, share, rows)
    return workers if workers > 1 else None


def batch_rows(rows: int, text_bytes: int) -> int:
    """Rows per tokenizer call for ``rows`` rows holding ``text_bytes`` of text: ``TOKENIZE_BATCH_SIZE``, fewer
    for long documents so a batch holds about ``TOKENIZE_BATCH_CHARS`` of text. The fast tokenizer keeps
    tens of bytes per token of its encodings until the batch returns, so a batch of a thousand long documents
    would cost hundreds of MB."""
    if rows == 0 or text_bytes <= 0:
        return TOKENIZE_BATCH_SIZE
    return max(1, min(TOKENIZE_BATCH_SIZE, TOKENIZE_BATCH_CHARS * rows // text_bytes))


def tokenize(ds: "Dataset", tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig",
             load_from_cache_file: Optional[bool] = None) -> "Dataset":
    """One batched pass: flatten, pick the text column, join answers, tokenize, append EOS.

    Rows of ``input_ids`` (int32 lists), in ``ds``'s order. The function reads and returns Arrow, so the
    only per-row Python work is the tokenizer's own.
    """
    from datasets import Features, Sequence, Value

    ds = ds.flatten()
    column = text_column_for(ds.column_names, config.text_column)
    text_bytes = ds.data.column(column).nbytes
    batch_size = batch_rows(len(ds), text_bytes)
    return ds.with_format("arrow").map(
        _tokenize_fn(tokenizer, config.join_with_eos, cache_paths(ds)),
        batched=True,
        batch_size=batch_size,
        writer_batch_size=batch_size,
        input_columns=[column],  # decode only the text column, not the rest of the row
        remove_columns=ds.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        num_proc=worker_count(config, len(ds), text_bytes),
        load_from_cache_file=load_from_cache_file,
        desc="Tokenizing",
    ).with_format(None)


def _batches(texts: Iterable[str], size: int, chars: int) -> Iterator[list[str]]:
    """Up to ``size`` documents, fewer once they hold ``chars`` characters."""
    batch: list[str] = []
    held = 0
    for text in texts:
        batch.append(text)
        held += len(text)
        if len(batch) == size or held >= chars:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def tokenize_stream(texts: Iterable[str], tokenizer: "PreTrainedTokenizerBase", join_with_eos: bool,
                    batch_size: int = TOKENIZE_BATCH_SIZE,
                    batch_chars: int = TOKENIZE_BATCH_CHARS) -> Iterator[np.ndarray]:
    """Documents -> flat int32 token arrays, one per batch, the ids ``tokenize`` gives the same documents."""
    import pyarrow as pa

    tokenize_batch = _tokenize_fn(tokenizer, join_with_eos)
    for batch in _batches(texts, batch_size, batch_chars):
        table = tokenize_batch(pa.array(batch, type=pa.string()))
        yield table.column("input_ids").combine_chunks().flatten().to_numpy()


def tokenize_documents(texts: Iterable[str], tokenizer: "PreTrainedTokenizerBase",
                       join_with_eos: bool) -> Iterator[list[int]]:
    """Documents -> one id list each (the ids ``tokenize`` gives them), in batches of bounded size."""
    import pyarrow as pa

    tokenize_batch = _tokenize_fn(tokenizer, join_with_eos)
    for batch in _batches(texts, TOKENIZE_BATCH_SIZE, TOKENIZE_BATCH_CHARS):
        yield from tokenize_batch(pa.array(batch, type=pa.string())).column("input_ids").to_pylist()
