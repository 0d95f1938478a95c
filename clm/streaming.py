"""``--streaming``: train from a stream of rows (Hub or local files) packed into blocks on the fly.

The first ``eval_samples`` rows become a finite eval split, tokenized and packed by the same functions as the
non-streaming path (``clm.data.tokenize`` and ``pack_split``), so evaluation is identical. The rest is
shuffled with a buffer, tokenized in batches and packed with the remainder carried across batches: the same
blocks ``clm.data.pack`` would cut from the concatenated stream. Memory holds the shuffle buffer, one batch
and fewer than ``block_size`` carried tokens, whatever the corpus size.

The train split is a plain ``datasets.IterableDataset`` of ``{"input_ids": list[int]}`` rows (int32, length
``block_size``): the Trainer, Keras or a DataLoader can read it, and ``split_dataset_by_node`` shards it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np

from clm import data, hub
from clm.errors import ClmError, DataError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger(__name__)

# Documents held in the shuffle buffer (datasets' default): a few MB of text, whatever the corpus size.
SHUFFLE_BUFFER = 1000
# Documents per tokenizer call, and a cap on their text: enough for the fast tokenizer's batch parallelism,
# while the tokenizer's per-token objects for one batch stay a few tens of MB even for long documents.
TOKENIZE_BATCH = 1000
TOKENIZE_BATCH_CHARS = 1 << 20


def flatten_row(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A row with nested dicts (Arrow structs) flattened to ``parent.child`` keys, as ``Dataset.flatten``."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_row(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _source_name(config: "TrainConfig") -> str:
    from clm.defaults import sample_data_path

    return config.dataset_name or config.train_file or str(sample_data_path())


@contextlib.contextmanager
def _read_errors(config: "TrainConfig") -> Iterator[None]:
    """A streamed source is read lazily: turn a read failure into the DataError the eager load gives."""
    try:
        yield
    except ClmError:
        raise
    except Exception as exc:
        if config.dataset_name:
            with hub.translate_errors(config.dataset_name, "dataset"):
                raise
        raise data.read_error(_source_name(config), exc) from exc


def _iter_rows(stream: Iterable[dict[str, Any]], config: "TrainConfig") -> Iterator[dict[str, Any]]:
    with _read_errors(config):
        yield from stream


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


def token_pieces(texts: Iterable[str], tokenizer: "PreTrainedTokenizerBase", join_with_eos: bool,
                 batch_size: int = TOKENIZE_BATCH, batch_chars: int = TOKENIZE_BATCH_CHARS) -> Iterator[np.ndarray]:
    """Documents -> flat int32 token arrays, one per batch, tokenized exactly as ``clm.data.tokenize``."""
    import pyarrow as pa

    tokenize = data._tokenize_fn(tokenizer, join_with_eos)
    for batch in _batches(texts, batch_size, batch_chars):
        table = tokenize(pa.array(batch, type=pa.string()))
        yield table.column("input_ids").combine_chunks().flatten().to_numpy()


def _train_blocks(source: "IterableDataset", column: str, config: "TrainConfig",
                  tokenizer: "PreTrainedTokenizerBase") -> Iterator[dict[str, list[int]]]:
    """The generator behind the train split: called afresh on every pass, so no state leaks between passes."""
    texts = (data._as_text(flatten_row(row).get(column)) for row in _iter_rows(source, config))
    packer = data.BlockPacker(config.block_size)
    blocks = 0
    for piece in token_pieces(texts, tokenizer, config.join_with_eos):
        for block in packer.feed(piece):
            blocks += 1
            yield {"input_ids": block.tolist()}
    if blocks == 0:
        raise DataError(f"the training stream has {packer.tokens} tokens, fewer than one block of "
                        f"{config.block_size}; add data, lower --block_size or lower --eval_samples")


def _head(raw: "IterableDataset", n: int, config: "TrainConfig") -> list[dict[str, Any]]:
    return list(_iter_rows(raw.take(n), config))


def eval_split(rows: list[dict[str, Any]], column: str, config: "TrainConfig",
               tokenizer: "PreTrainedTokenizerBase", pad_id: int) -> "Dataset":
    """The first rows of the stream as a finite split, prepared by the non-streaming functions."""
    from datasets import Dataset

    texts = [data._as_text(flatten_row(row).get(column)) for row in rows]
    # One column under the text column's own name: tokenize() finds it as it would in the full rows.
    ds = Dataset.from_dict({column: texts})
    return data.pack_split(data.tokenize(ds, tokenizer, config), config, pad_id, "eval")


def prepare_streaming(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                      shuffle_buffer: Optional[int] = None) -> "dict[str, Dataset | IterableDataset]":
    """``{"train": IterableDataset of packed blocks, "test": Dataset}`` for ``--streaming`` (bounded memory)."""
    from datasets import Dataset, DatasetDict, Features, IterableDataset, Sequence, Value

    raw = data.load_raw(config)
    if isinstance(raw, Dataset):  # a source that came back materialized: stream it all the same
        raw = raw.to_iterable_dataset()
    n_eval = config.eval_samples
    head = _head(raw, n_eval + 1, config)  # one more row tells whether anything is left to train on
    if len(head) <= n_eval:
        raise DataError(f"the stream has {len(head)} rows and --eval_samples takes {n_eval} for evaluation, "
                        f"leaving none to train on; lower --eval_samples or add data")
    column = data.text_column_for(flatten_row(head[0]).keys(), config.text_column)
    pad_id = data.pad_id_for(tokenizer)
    test = eval_split(head[:n_eval], column, config, tokenizer, pad_id)

    source = raw.skip(n_eval).shuffle(seed=config.seed, buffer_size=shuffle_buffer or SHUFFLE_BUFFER)
    top = column.split(".")[0]
    if raw.column_names and top in raw.column_names:  # decode only the column holding the text
        source = source.select_columns([top])
    features = Features({"input_ids": Sequence(Value("int32"), length=config.block_size)})
    train = IterableDataset.from_generator(
        _train_blocks, features=features,
        gen_kwargs={"source": source, "column": column, "config": config, "tokenizer": tokenizer})
    logger.info("Streaming %s: %d rows held out for evaluation (%d blocks), training on the rest packed "
                "on the fly into blocks of %d", _source_name(config), n_eval, len(test), config.block_size)
    return DatasetDict({"train": train, "test": test})
