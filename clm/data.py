"""The data layer: load, split, flatten, join answers, tokenize and pack into fixed-length blocks.

Framework-free: it never imports torch or tensorflow. ``prepare_dataset`` returns a ``DatasetDict``
(train/test) whose rows are ``block_size`` token ids in an ``input_ids`` column; labels and attention masks
are derived at batch time (``clm.collate``) instead of tripling the Arrow cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from clm import hub
from clm.defaults import sample_data_path
from clm.errors import DataError
from clm.packing import BlockPacker, iter_token_blocks, pack, pack_rows, pack_split  # noqa: F401  (public via clm.data)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger(__name__)

# Bump when the prepared layout changes, so old caches are not reused.
PREPARED_FORMAT_VERSION = 1
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
ELI5_TEXT_COLUMN = "answers.text"
# Rows per tokenizer call and per Arrow write; rows per worker process below which one process is faster.
TOKENIZE_BATCH_SIZE = 1000
MIN_ROWS_PER_WORKER = 1000
MIN_TEXT_BYTES_PER_WORKER = 4 << 20  # about a million tokens, a second or two of tokenizing


# --------------------------------------------------------------------------------------------- group_texts
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
        n_blocks = len(flat) // block_size
        result[key] = flat[: n_blocks * block_size].reshape(n_blocks, block_size).tolist()
    result["labels"] = [list(block) for block in result["input_ids"]]
    return result


# --------------------------------------------------------------------------------------------- loading
def _check_readable(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist; check the --train_file path")
    if p.is_dir():
        raise DataError(f"--train_file {path!r} is a directory; give a file (.jsonl, .json, .csv, .txt, .parquet)")
    if not os.access(p, os.R_OK):
        raise DataError(f"data file {path!r} is not readable; check its permissions")
    if p.stat().st_size == 0:
        raise DataError(f"data file {path!r} is empty; give a file with at least one row of text")
    if p.suffix.lower() not in BUILDERS:
        raise DataError(f"data file {path!r} has an unsupported extension {p.suffix!r}; "
                        f"use one of: {', '.join(BUILDERS)}")
    return p


def _first_bad_json_line(path: Path) -> Optional[tuple[int, str]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return number, str(exc)
            if not isinstance(row, dict):
                return number, "expected a JSON object per line"
    return None


def _is_json_lines(p: Path) -> bool:
    if p.suffix.lower() == ".jsonl":
        return True
    if p.suffix.lower() != ".json":
        return False
    with p.open("rb") as f:  # one byte, not the whole file: a JSON array starts with "["
        return f.read(1) != b"["


def read_error(path: str | os.PathLike, exc: BaseException, builder: Optional[str] = None) -> DataError:
    """A one-line DataError for a file datasets could not read: the bad JSON line if there is one, else the
    cause. Only called after a failure, so a good file is never parsed twice."""
    p = Path(path)
    if _is_json_lines(p):
        bad = _first_bad_json_line(p)
        if bad:
            return DataError(f"{path}: line {bad[0]} is not valid JSON ({bad[1]}); fix or remove that line")
    builder = builder or BUILDERS.get(p.suffix.lower(), "data")
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DataError(f"could not read {path} as {builder}: {cause}; check the file's format")


def _load_file(path: str, streaming: bool) -> "Dataset | IterableDataset":
    from datasets import load_dataset

    p = _check_readable(path)
    builder = BUILDERS[p.suffix.lower()]
    try:
        # A streamed file is read lazily: clm.streaming turns a read error into the same DataError.
        return load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
    except Exception as exc:  # datasets raises many types for broken files; name the file and the cause
        raise read_error(path, exc, builder) from exc


def load_raw(config: "TrainConfig") -> "Dataset | IterableDataset":
    """Rows from a Hub dataset, a local file, or the bundled ELI5-layout sample."""
    if config.train_file:
        return _load_file(config.train_file, config.streaming)
    if config.dataset_name:
        from datasets import load_dataset

        with hub.translate_errors(config.dataset_name, "dataset"):
            return load_dataset(config.dataset_name, config.dataset_config_name, split=config.dataset_split,
                                streaming=config.streaming)
    return _load_file(str(sample_data_path()), config.streaming)


def split(raw: "Dataset", test_size: float, seed: int) -> "DatasetDict":
    """The guide's split: ``train_test_split`` on the raw rows, before tokenizing."""
    if len(raw) < 2:
        raise DataError(f"the data has {len(raw)} row(s); at least 2 are needed to split off a test set")
    return raw.train_test_split(test_size=test_size, seed=seed)


# --------------------------------------------------------------------------------------------- text
def text_column_for(columns: Iterable[str], requested: Optional[str]) -> str:
    """The (flattened) column holding the text: the requested one, ELI5's answers.text, or text."""
    columns = list(columns)
    if requested:
        if requested not in columns:
            raise DataError(f"text column {requested!r} not found; columns: {', '.join(columns)}")
        return requested
    for candidate in (ELI5_TEXT_COLUMN, "text"):
        if candidate in columns:
            return candidate
    raise DataError(f"no usable text column; columns found: {', '.join(columns)}; "
                    f"pass --text_column NAME")


def _as_text(value: Any) -> str:
    """A cell as one document: lists (ELI5's answers) joined with a space, as the guide does."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(_as_text(v) for v in value)
    return str(value)


def arrow_texts(column: Any) -> list[str]:
    """A batch of one text column (Arrow) as documents, as ``_as_text`` would give them: lists of strings
    (ELI5's answers) joined with a space in Arrow, no Python loop; anything unusual goes through ``_as_text``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return (pc.fill_null(column, "") if column.null_count else column).to_pylist()
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)):
        if column.null_count == 0 and column.flatten().null_count == 0:  # binary_join turns nulls into null
            return pc.binary_join(column, " ").to_pylist()
    return [_as_text(v) for v in column.to_pylist()]


def pad_id_for(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The id that fills a --keep_remainder tail block (masked, so never learned): pad, else EOS, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


def _tokenize_fn(tokenizer: "PreTrainedTokenizerBase", join_with_eos: bool):
    """Batch of texts (Arrow) -> Arrow table of token ids (int32 lists), EOS appended if asked."""
    eos = tokenizer.eos_token_id
    if join_with_eos and eos is None:
        raise DataError("--join_with_eos needs a tokenizer with an EOS token; add --no_join_with_eos")

    def tokenize(column: Any) -> Any:
        import pyarrow as pa

        # ids only: the attention mask (all ones) and labels are derived at batch time (clm.collate).
        ids = tokenizer(arrow_texts(column), return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        if join_with_eos:
            for row in ids:  # fresh lists: appending in place costs one call per row, not a copy
                row.append(eos)
        return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32()))})

    return tokenize


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def _num_proc(config: "TrainConfig", rows: int, text_bytes: int = 0) -> Optional[int]:
    # Worker processes cost a second or so to start; use them only where each gets a real share of the
    # work: enough rows, or enough text (a few long documents are worth splitting too).
    workers = config.preprocessing_num_workers or _cpu_count()
    share = max(rows // MIN_ROWS_PER_WORKER, text_bytes // MIN_TEXT_BYTES_PER_WORKER)
    workers = min(workers, share, rows)
    return workers if workers > 1 else None


def tokenize(ds: "Dataset", tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig",
             load_from_cache_file: Optional[bool] = None) -> "Dataset":
    """One batched pass: flatten, pick the text column, join answers, tokenize, append EOS.

    Rows of ``input_ids`` (int32 lists), in ``ds``'s order. The function reads and returns Arrow, so the
    only per-row Python work is the tokenizer's own.
    """
    from datasets import Features, Sequence, Value

    ds = ds.flatten()
    column = text_column_for(ds.column_names, config.text_column)
    return ds.with_format("arrow").map(
        _tokenize_fn(tokenizer, config.join_with_eos),
        batched=True,
        batch_size=TOKENIZE_BATCH_SIZE,
        writer_batch_size=TOKENIZE_BATCH_SIZE,
        input_columns=[column],  # decode only the text column, not the rest of the row
        remove_columns=ds.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        num_proc=_num_proc(config, len(ds), ds.data.column(column).nbytes),
        load_from_cache_file=load_from_cache_file,
        desc="Tokenizing",
    ).with_format(None)


# --------------------------------------------------------------------------------------------- caching
def cache_root() -> Path:
    root = os.environ.get("CLM_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "clm")
    return Path(root) / "prepared"


def _tokenizer_hash(tokenizer: "PreTrainedTokenizerBase") -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()


def _source_id(config: "TrainConfig", raw: "Dataset") -> str:
    if config.dataset_name:
        return f"hub:{config.dataset_name}:{config.dataset_config_name}:{config.dataset_split}:{raw._fingerprint}"
    path = Path(config.train_file or sample_data_path()).resolve()
    st = path.stat()
    return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"


def fingerprint(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", raw: "Dataset") -> str:
    """Changes whenever the data, tokenizer, block size, split or join settings change."""
    parts = [PREPARED_FORMAT_VERSION, _source_id(config, raw), _tokenizer_hash(tokenizer), config.block_size,
             config.join_with_eos, config.keep_remainder, config.text_column, config.test_size, config.seed]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def _save_atomic(dd: "DatasetDict", target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is equally good
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- pipeline
def prepare_dataset(config: "TrainConfig", tokenizer: Optional["PreTrainedTokenizerBase"] = None,
                    use_cache: bool = True) -> "DatasetDict":
    """Load, split, tokenize and pack: a ``DatasetDict`` with train and test splits of fixed-length blocks.

    A second call with the same data and settings loads the prepared copy from ``cache_root()``.
    With ``config.streaming`` it returns ``IterableDataset`` splits packed on the fly.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    if tokenizer is None:
        from clm.defaults import load_tokenizer

        tokenizer = load_tokenizer(config)
    if config.streaming:
        from clm.streaming import prepare_streaming

        return prepare_streaming(config, tokenizer)

    raw = load_raw(config)
    target = cache_root() / fingerprint(config, tokenizer, raw)
    if use_cache and not config.overwrite_cache and (target / "dataset_dict.json").exists():
        logger.info("Reusing prepared data from %s (same data and settings; --overwrite_cache to redo)", target)
        return load_from_disk(str(target))

    # Tokenize every row once, in file order (one pass, one pool of workers, sequential reads), then pack
    # each split in the guide's order: train_test_split of the row numbers gives the same permutation as
    # splitting the raw rows, since it depends only on the row count, test_size and seed.
    order = split(Dataset.from_dict({"row": np.arange(len(raw))}), config.test_size, config.seed)
    tokenized = tokenize(raw, tokenizer, config, load_from_cache_file=False if config.overwrite_cache else None)
    pad_id = pad_id_for(tokenizer)
    prepared = DatasetDict({name: pack_rows(tokenized, rows.with_format("arrow")[:]["row"].to_numpy(), config,
                                             pad_id, name)
                            for name, rows in order.items()})
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(prepared, target)
        logger.info("Prepared data saved to %s", target)
        return load_from_disk(str(target))  # memory-mapped, like any cached dataset
    return prepared
