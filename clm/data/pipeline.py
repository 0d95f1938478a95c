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

from clm.data.blocks import BlockPacker, pack_split
from clm.data.cache import cache_root, fingerprint, load_prepared, save_prepared
from clm.data.mapped import trim_heap
from clm.data.rows import flatten_row, row_text, split, text_column_for
from clm.data.source import iter_rows, load_raw, load_validation, source_name
from clm.data.tokens import pad_id_for, tokenize, tokenize_stream
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
    target = cache_root() / fingerprint(config, tokenizer, raw)
    cached = load_prepared(target) if use_cache and not config.overwrite_cache else None
    if cached is not None:
        logger.info("Reusing prepared data from %s (same data and settings; --overwrite_cache to redo)", target)
        return cached

    recompute = False if config.overwrite_cache else None
    pad_id = pad_id_for(tokenizer)
    if validation is not None:  # --validation_file: that whole file is the eval split; train is not split
        parts = {"train": (tokenize(_first_rows(raw, config.max_train_samples), tokenizer, config,
                                    load_from_cache_file=recompute), None),
                 "test": (tokenize(_first_rows(validation, config.max_eval_samples), tokenizer, config,
                                   load_from_cache_file=recompute), None)}
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
        tokenized = tokenize(raw, tokenizer, config, load_from_cache_file=recompute)
        parts = {name: (tokenized, r) for name, r in rows.items()}
    trim_heap()  # packing starts from what the data needs, not from tokenizing's high-water mark
    if not use_cache:
        return DatasetDict({name: pack_split(ds, config, pad_id, name, rows=r) for name, (ds, r) in parts.items()})
    # Blocks go straight to the cache's Arrow files as they are cut: memory stays flat in the corpus size.
    with save_prepared(target) as folder:
        for name, (ds, r) in parts.items():
            pack_split(ds, config, pad_id, name, rows=r, path=str(folder.blocks_file(name)))
    logger.info("Prepared data saved to %s", target)
    return load_prepared(target)


def _first_rows(ds: "Dataset", limit: Optional[int]) -> "Dataset":
    return ds.select(range(limit)) if limit is not None and limit < len(ds) else ds


# --------------------------------------------------------------------------------------------- streaming
def _eval_split(rows: list[dict[str, Any]], column: str, config: "TrainConfig",
                tokenizer: "PreTrainedTokenizerBase", pad_id: int) -> "Dataset":
    """The first rows of the stream as a finite split, prepared by the map-based functions."""
    from datasets import Dataset

    # One column under the text column's own name: tokenize() finds it as it would in the full rows.
    ds = Dataset.from_dict({column: [row_text(row, column) for row in rows]})
    return pack_split(tokenize(ds, tokenizer, config), config, pad_id, "eval")


def _train_blocks(source: "IterableDataset", column: str, config: "TrainConfig",
                  tokenizer: "PreTrainedTokenizerBase") -> Iterator[dict[str, list[int]]]:
    """The generator behind the train split: called afresh on every pass, so no state leaks between passes."""
    texts = (row_text(row, column) for row in iter_rows(source, config))
    packer = BlockPacker(config.block_size)
    blocks = 0
    for block in packer.blocks(tokenize_stream(texts, tokenizer, config.join_with_eos)):
        blocks += 1
        yield {"input_ids": block.tolist()}
    if blocks == 0:
        raise DataError(f"the training stream has {packer.tokens} tokens, fewer than one block of "
                        f"{config.block_size}; add data, lower --block_size or lower --eval_samples")


def prepare_streaming(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                      shuffle_buffer: Optional[int] = None) -> "DatasetDict":
    """``{"train": IterableDataset of packed blocks, "test": Dataset}`` for ``--streaming`` (bounded memory).

    The train split is a plain ``datasets.IterableDataset`` of ``{"input_ids": list[int]}`` rows (int32, length
    ``block_size``): the Trainer, Keras or a DataLoader can read it, and ``split_dataset_by_node`` shards it.
    """
    from datasets import Dataset, DatasetDict, Features, IterableDataset, Sequence, Value

    raw = load_raw(config)
    if isinstance(raw, Dataset):  # a source that came back materialized: stream it all the same
        raw = raw.to_iterable_dataset()
    validation = load_validation(config)
    if validation is not None:  # --validation_file: the eval split is that file; the whole stream trains
        n_eval = 0
        head = list(iter_rows(raw.take(1), config))
        if not head:
            raise DataError(f"the stream {source_name(config)} has no rows to train on; add data")
        column = text_column_for(flatten_row(head[0]).keys(), config.text_column)
        test = pack_split(tokenize(_first_rows(validation, config.max_eval_samples), tokenizer, config), config,
                          pad_id_for(tokenizer), "eval")
    else:
        n_eval = config.eval_samples
        head = list(iter_rows(raw.take(n_eval + 1), config))  # one more row: are any left to train on?
        if len(head) <= n_eval:
            raise DataError(f"the stream has {len(head)} rows and --eval_samples takes {n_eval} for evaluation, "
                            f"leaving none to train on; lower --eval_samples or add data")
        column = text_column_for(flatten_row(head[0]).keys(), config.text_column)
        test = _eval_split(head[:n_eval], column, config, tokenizer, pad_id_for(tokenizer))

    source = raw.skip(n_eval) if n_eval else raw
    if config.max_train_samples is not None:  # the first rows of the training stream, then shuffled
        source = source.take(config.max_train_samples)
    source = source.shuffle(seed=config.seed, buffer_size=shuffle_buffer or SHUFFLE_BUFFER)
    top = column.split(".")[0]
    if raw.column_names and top in raw.column_names:  # decode only the column holding the text
        source = source.select_columns([top])
    features = Features({"input_ids": Sequence(Value("int32"), length=config.block_size)})
    train = IterableDataset.from_generator(
        _train_blocks, features=features,
        gen_kwargs={"source": source, "column": column, "config": config, "tokenizer": tokenizer})
    logger.info("Streaming %s: %s for evaluation (%d blocks), training on the rest packed on the fly into "
                "blocks of %d", source_name(config), config.validation_file or f"{n_eval} rows held out",
                len(test), config.block_size)
    return DatasetDict({"train": train, "test": test})
