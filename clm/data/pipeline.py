"""The pipeline: source -> rows -> text -> tokens -> blocks, in one of two modes built from the same stages.

- ``prepare_dataset``: the whole data set, split as the guide splits it, tokenized, packed and cached on disk
  (``clm.data.cache``): a ``DatasetDict`` of train/test blocks.
- ``prepare_streaming`` (``--streaming``): the first ``eval_samples`` rows become a finite test split, prepared
  by the same functions as above; the rest is shuffled with a buffer, tokenized in batches and packed on the
  fly by the same packer, so the train split is the blocks ``pack`` would cut from the concatenated stream.
  Memory holds the shuffle buffer, one batch and fewer than ``block_size`` carried tokens.

Blocks are ``block_size`` token ids in an ``input_ids`` column (int32); labels and attention masks are derived
at batch time (``clm.collate``) instead of tripling the Arrow cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from clm.collate import IGNORE_INDEX
from clm.data.blocks import BlockPacker, pack_split
from clm.data.cache import cache_root, fingerprint, load_prepared, save_prepared
from clm.data.examples import (MESSAGES, MESSAGES_COLUMN, TEXT, data_format, describe, packing_for,
                               prompt_completion_columns, stream_examples, tokenize_examples)
from clm.data.mapped import trim_heap
from clm.data.packing import PACKED_COLUMNS, pack_examples_split, pack_stream, write_rows
from clm.data.rows import flatten_row, row_text, split, text_column_for
from clm.data.source import iter_rows, load_raw, load_validation, source_name
from clm.data.tokens import pad_id_for, tokenize, tokenize_documents, tokenize_stream
from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger(__name__)

# Documents held in the shuffle buffer (datasets' default): a few MB of text, whatever the corpus size.
SHUFFLE_BUFFER = 1000


def prepare_dataset(config: "TrainConfig", tokenizer: Optional["PreTrainedTokenizerBase"] = None,
                    use_cache: bool = True) -> "DatasetDict":
    """Load, split, tokenize and pack: a ``DatasetDict`` with train and test splits of fixed-length blocks.

    A second call with the same data and settings loads the prepared copy from ``cache_root()``.
    With ``config.streaming`` it returns ``prepare_streaming``'s splits instead.
    """
    from datasets import Dataset, DatasetDict

    if tokenizer is None:
        from clm.defaults import load_tokenizer

        tokenizer = load_tokenizer(config)
    if config.streaming:
        return prepare_streaming(config, tokenizer)

    raw = load_raw(config)
    validation = load_validation(config)  # before the fingerprint, which reads the file's size and time
    kind = data_format(raw.flatten().column_names, config)
    target = cache_root() / fingerprint(config, tokenizer, raw)
    cached = load_prepared(target) if use_cache and not config.overwrite_cache else None
    if cached is not None:
        logger.info("Reusing prepared data from %s (same data and settings; --overwrite_cache to redo)", target)
        return _described(cached, kind, config)

    recompute = False if config.overwrite_cache else None
    pad_id = pad_id_for(tokenizer)
    logger.info("Data format: %s; packing: %s", describe(kind), packing_for(kind, config))

    def tokens(ds: "Dataset", name: str) -> "Dataset":
        if kind == TEXT:
            return tokenize(ds, tokenizer, config, load_from_cache_file=recompute)
        return tokenize_examples(ds, kind, tokenizer, config, load_from_cache_file=recompute, name=name)

    if validation is not None:  # --validation_file: that whole file is the eval split; train is not split
        if data_format(validation.flatten().column_names, config) != kind:
            raise DataError("--validation_file holds another kind of data than the training data; give both in "
                            "one format")
        parts = {"train": (tokens(_first_rows(raw, config.max_train_samples), "train"), None),
                 "test": (tokens(_first_rows(validation, config.max_eval_samples), "eval"), None)}
    else:
        # Tokenize the rows in use once, in file order (one pass, one pool of workers, sequential reads),
        # then pack each split in the guide's order: train_test_split of the row numbers gives the same
        # permutation as splitting the raw rows, since it depends only on the row count, test_size and split_seed.
        order = split(Dataset.from_dict({"row": np.arange(len(raw))}), config.test_size, config.split_seed)
        rows = {name: part.with_format("arrow")[:]["row"].to_numpy() for name, part in order.items()}
        # --max_train_samples / --max_eval_samples: the first rows of each split, before tokenizing
        rows["train"] = rows["train"][:config.max_train_samples]
        rows["test"] = rows["test"][:config.max_eval_samples]
        used = np.unique(np.concatenate(list(rows.values())))
        if len(used) < len(raw):  # tokenize only those; positions below are into the selection
            raw = raw.select(used)
            rows = {name: np.searchsorted(used, r) for name, r in rows.items()}
        if kind != TEXT:  # examples may be dropped: tokenize each split apart, so row positions stay its own
            parts = {name: (tokens(raw.select(r), name), None) for name, r in rows.items()}
        else:
            parts = {name: (tokens(raw, name), r) for name, r in rows.items()}
    trim_heap()  # packing starts from what the data needs, not from tokenizing's high-water mark
    if not use_cache:
        return _described(DatasetDict({name: pack_rows(ds, config, kind, pad_id, name, rows=r)
                                       for name, (ds, r) in parts.items()}), kind, config)
    # Rows go straight to the cache's Arrow files as they are cut: memory stays flat in the corpus size.
    with save_prepared(target) as folder:
        for name, (ds, r) in parts.items():
            pack_rows(ds, config, kind, pad_id, name, rows=r, path=str(folder.blocks_file(name)))
    logger.info("Prepared data saved to %s", target)
    return _described(load_prepared(target), kind, config)


def _described(dataset: "DatasetDict", kind: str, config: "TrainConfig") -> "DatasetDict":
    """The splits, told their data format and packing (``data_format``, ``packing``): the run reports them."""
    dataset.data_format, dataset.packing = kind, packing_for(kind, config)
    return dataset


def pack_rows(ds: "Dataset", config: "TrainConfig", kind: str, pad_id: int, name: str,
              rows: Optional[np.ndarray] = None, path: Optional[str] = None) -> "Dataset":
    """A tokenized split packed as --packing (or the format's default) says: wrapped text keeps the guide's
    single ``input_ids`` column; wrapped examples add their ``labels``; bfd and none rows add ``labels`` and
    ``position_ids``."""
    from datasets import Dataset

    mode = packing_for(kind, config)
    if mode != "wrapped":
        return pack_examples_split(ds, config.block_size, mode, pad_id, name, rows=rows, path=path)
    if "labels" not in ds.column_names:
        return pack_split(ds, config, pad_id, name, rows=rows, path=path)
    # The labels cut the same way as the ids: the same lengths, so the same blocks
    ids = pack_split(ds.select_columns(["input_ids"]), config, pad_id, name, rows=rows)
    labels = pack_split(ds.select_columns(["labels"]).rename_column("labels", "input_ids"), config, IGNORE_INDEX,
                        name, rows=rows)
    table = ids.data.table.append_column("labels", labels.data.table.column("input_ids"))
    return write_rows(table, path) if path is not None else Dataset(table)


def _first_rows(ds: "Dataset", limit: Optional[int]) -> "Dataset":
    return ds.select(range(limit)) if limit is not None and limit < len(ds) else ds


# --------------------------------------------------------------------------------------------- streaming
def _eval_split(rows: list[dict[str, Any]], kind: str, column: str, config: "TrainConfig",
                tokenizer: "PreTrainedTokenizerBase", pad_id: int) -> "Dataset":
    """The first rows of the stream as a finite split, prepared by the map-based functions."""
    from datasets import Dataset

    if kind == TEXT:  # one column under the text column's own name: tokenize() finds it as in the full rows
        tokenized = tokenize(Dataset.from_dict({column: [row_text(row, column) for row in rows]}), tokenizer,
                             config)
    else:
        tokenized = tokenize_examples(Dataset.from_list(rows), kind, tokenizer, config, name="eval")
    return pack_rows(tokenized, config, kind, pad_id, "eval")


def _train_rows(source: "IterableDataset", kind: str, column: str, config: "TrainConfig",
                tokenizer: "PreTrainedTokenizerBase") -> Iterator[dict[str, list[int]]]:
    """The generator behind the train split: called afresh on every pass, so no state leaks between passes."""
    rows = iter_rows(source, config)
    mode = packing_for(kind, config)
    if kind == TEXT:
        texts = (row_text(row, column) for row in rows)
        if mode == "wrapped":
            yield from _wrapped_text(texts, config, tokenizer)
            return
        examples: Iterator[tuple[list[int], Optional[list[int]]]] = (
            (ids, None) for ids in tokenize_documents(texts, tokenizer, config.join_with_eos))
    else:
        examples = stream_examples(rows, kind, tokenizer, config)
    produced = 0
    if mode == "wrapped":  # examples with labels: ids and labels cut by two packers fed the same lengths
        packers = {"input_ids": BlockPacker(config.block_size), "labels": BlockPacker(config.block_size)}
        for ids, labels in examples:
            cut = {"input_ids": packers["input_ids"].feed(ids), "labels": packers["labels"].feed(labels)}
            for r in range(len(cut["input_ids"])):
                produced += 1
                yield {name: blocks[r].tolist() for name, blocks in cut.items()}
    else:  # bfd/none: a bounded group of examples at a time
        for row in pack_stream(examples, config.block_size, mode, pad_id_for(tokenizer)):
            produced += 1
            yield row
    if produced == 0:
        raise DataError(f"the training stream gave no row of {config.block_size} tokens; add data, lower "
                        "--block_size or lower --eval_samples")


def _wrapped_text(texts: Iterator[str], config: "TrainConfig",
                  tokenizer: "PreTrainedTokenizerBase") -> Iterator[dict[str, list[int]]]:
    packer = BlockPacker(config.block_size)
    blocks = 0
    for block in packer.blocks(tokenize_stream(texts, tokenizer, config.join_with_eos)):
        blocks += 1
        yield {"input_ids": block.tolist()}
    if blocks == 0:
        raise DataError(f"the training stream has {packer.tokens} tokens, fewer than one block of "
                        f"{config.block_size}; add data, lower --block_size or lower --eval_samples")


def _stream_columns(kind: str, column: str, config: "TrainConfig") -> list[str]:
    """The top-level columns the stream's rows need (the rest is not decoded)."""
    if kind == TEXT:
        names = [column]
    elif kind == MESSAGES:
        names = [MESSAGES_COLUMN]
    else:
        names = list(prompt_completion_columns(config))
    return sorted({name.split(".")[0] for name in names})


def prepare_streaming(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                      shuffle_buffer: Optional[int] = None) -> "DatasetDict":
    """``{"train": IterableDataset of packed rows, "test": Dataset}`` for ``--streaming`` (bounded memory).

    The train split is a plain ``datasets.IterableDataset`` of rows of ``block_size`` int32 ids
    (``input_ids``; for examples also ``labels``, and for bfd/none ``position_ids``): the Trainer, Keras or a
    DataLoader can read it, and ``split_dataset_by_node`` shards it.
    """
    from datasets import Dataset, DatasetDict, Features, IterableDataset, Sequence, Value

    raw = load_raw(config)
    if isinstance(raw, Dataset):  # a source that came back materialized: stream it all the same
        raw = raw.to_iterable_dataset()
    validation = load_validation(config)
    n_eval = 0 if validation is not None else config.eval_samples
    head = list(iter_rows(raw.take(n_eval + 1), config))  # one more row: are any left to train on?
    if validation is None and len(head) <= n_eval:
        raise DataError(f"the stream has {len(head)} rows and --eval_samples takes {n_eval} for evaluation, "
                        f"leaving none to train on; lower --eval_samples or add data")
    if not head:
        raise DataError(f"the stream {source_name(config)} has no rows to train on; add data")
    columns = flatten_row(head[0]).keys()
    kind = data_format(columns, config)
    column = text_column_for(columns, config.text_column) if kind == TEXT else ""
    pad_id = pad_id_for(tokenizer)
    if validation is not None:  # --validation_file: the eval split is that file; the whole stream trains
        eval_rows = _first_rows(validation, config.max_eval_samples)
        tokenized = (tokenize(eval_rows, tokenizer, config) if kind == TEXT
                     else tokenize_examples(eval_rows, kind, tokenizer, config, name="eval"))
        test = pack_rows(tokenized, config, kind, pad_id, "eval")
    else:
        test = _eval_split(head[:n_eval], kind, column, config, tokenizer, pad_id)

    source = raw.skip(n_eval) if n_eval else raw
    if config.max_train_samples is not None:  # the first rows of the training stream, then shuffled
        source = source.take(config.max_train_samples)
    source = source.shuffle(seed=config.seed, buffer_size=shuffle_buffer or SHUFFLE_BUFFER)
    needed = _stream_columns(kind, column, config)
    if raw.column_names and set(needed) <= set(raw.column_names):  # decode only the columns in use
        source = source.select_columns(needed)
    row = Sequence(Value("int32"), length=config.block_size)
    names = ["input_ids"] if kind == TEXT and packing_for(kind, config) == "wrapped" else (
        ["input_ids", "labels"] if packing_for(kind, config) == "wrapped" else list(PACKED_COLUMNS))
    train = IterableDataset.from_generator(
        _train_rows, features=Features({name: row for name in names}),
        gen_kwargs={"source": source, "kind": kind, "column": column, "config": config, "tokenizer": tokenizer})
    logger.info("Streaming %s (%s): %s for evaluation (%d rows), training on the rest packed on the fly (%s) "
                "into rows of %d", source_name(config), describe(kind),
                config.validation_file or f"{n_eval} rows held out", len(test), packing_for(kind, config),
                config.block_size)
    return _described(DatasetDict({"train": train, "test": test}), kind, config)
