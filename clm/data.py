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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import numpy as np

from clm import hub
from clm.defaults import sample_data_path
from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, IterableDataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger(__name__)

# Bump when the prepared layout changes, so old caches are not reused.
PREPARED_FORMAT_VERSION = 1
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
ELI5_TEXT_COLUMN = "answers.text"


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
        flat = np.fromiter((t for row in rows for t in row), dtype=np.int64) if rows else np.zeros(0, np.int64)
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


def _load_file(path: str, streaming: bool) -> "Dataset | IterableDataset":
    from datasets import load_dataset

    p = _check_readable(path)
    builder = BUILDERS[p.suffix.lower()]
    if p.suffix.lower() == ".jsonl" or (p.suffix.lower() == ".json" and p.read_bytes()[:1] != b"["):
        bad = _first_bad_json_line(p)
        if bad:
            raise DataError(f"{path}: line {bad[0]} is not valid JSON ({bad[1]}); fix or remove that line")
    try:
        return load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
    except Exception as exc:  # datasets raises many types for broken files; name the file and the cause
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not read {path} as {builder}: {cause}; check the file's format") from exc


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


def _tokenize_fn(tokenizer: "PreTrainedTokenizerBase", join_with_eos: bool):
    eos = tokenizer.eos_token_id
    if join_with_eos and eos is None:
        raise DataError("--join_with_eos needs a tokenizer with an EOS token; add --no_join_with_eos")

    def tokenize(texts: list[Any]) -> dict[str, list[list[int]]]:
        ids = tokenizer([_as_text(t) for t in texts])["input_ids"]
        if join_with_eos:
            ids = [row + [eos] for row in ids]
        return {"input_ids": ids}

    return tokenize


def _num_proc(config: "TrainConfig", rows: int) -> Optional[int]:
    # Worker processes cost seconds to start; use them only where each gets a real share of the rows.
    workers = config.preprocessing_num_workers or os.cpu_count() or 1
    workers = min(workers, rows // 1000)
    return workers if workers > 1 else None


def tokenize(ds: "Dataset", tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig") -> "Dataset":
    """One batched pass: flatten, pick the text column, join answers, tokenize, append EOS."""
    from datasets import Features, Sequence, Value

    ds = ds.flatten()
    column = text_column_for(ds.column_names, config.text_column)
    return ds.map(
        _tokenize_fn(tokenizer, config.join_with_eos),
        batched=True,
        input_columns=[column],  # decode only the text column, not the rest of the row
        remove_columns=ds.column_names,
        features=Features({"input_ids": Sequence(Value("int32"))}),
        num_proc=_num_proc(config, len(ds)),
        desc="Tokenizing",
    )


# --------------------------------------------------------------------------------------------- packing
def _flat_tokens(ds: "Dataset") -> np.ndarray:
    """All token ids of a tokenized split, in order, as one array (Arrow buffers, no Python loop)."""
    import pyarrow as pa

    ds = ds.flatten_indices() if ds._indices is not None else ds
    chunks = [c.flatten() for c in ds.data.column("input_ids").chunks]
    if not chunks:
        return np.zeros(0, dtype=np.int32)
    return pa.concat_arrays(chunks).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def pack(tokens: np.ndarray, block_size: int, keep_remainder: bool = False, pad_id: int = 0) -> "Dataset":
    """Cut one token stream into ``block_size`` rows. Only the final remainder is dropped, or, with
    ``keep_remainder``, padded and masked (``attention_mask`` 0 on the padding, ignored in the loss)."""
    import pyarrow as pa
    from datasets import Dataset, Features, Sequence, Value

    n_full = len(tokens) // block_size
    rest = len(tokens) - n_full * block_size
    columns = {"input_ids": tokens[: n_full * block_size]}
    features = {"input_ids": Sequence(Value("int32"), length=block_size)}
    if keep_remainder and rest:
        tail = np.full(block_size, pad_id, dtype=np.int32)
        tail[:rest] = tokens[n_full * block_size:]
        columns["input_ids"] = np.concatenate([columns["input_ids"], tail])
        mask = np.ones((n_full + 1) * block_size, dtype=np.int8)
        mask[n_full * block_size + rest:] = 0
        columns["attention_mask"] = mask
        features["attention_mask"] = Sequence(Value("int8"), length=block_size)
    table = pa.table({k: pa.FixedSizeListArray.from_arrays(pa.array(v), block_size) for k, v in columns.items()})
    return Dataset(table).cast(Features(features))


def pack_split(ds: "Dataset", config: "TrainConfig", pad_id: int, name: str) -> "Dataset":
    tokens = _flat_tokens(ds)
    if len(tokens) < config.block_size and not (config.keep_remainder and len(tokens)):
        raise DataError(
            f"the {name} split has {len(tokens)} tokens, fewer than one block of {config.block_size}; "
            f"add data, lower --block_size, or raise --test_size")
    return pack(tokens, config.block_size, config.keep_remainder, pad_id)


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
    from datasets import DatasetDict, load_from_disk

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

    splits = split(raw, config.test_size, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    prepared = DatasetDict({name: pack_split(tokenize(ds, tokenizer, config), config, pad_id, name)
                            for name, ds in splits.items()})
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(prepared, target)
        logger.info("Prepared data saved to %s", target)
        return load_from_disk(str(target))  # memory-mapped, like any cached dataset
    return prepared


def iter_token_blocks(token_rows: Iterable[list[int]], block_size: int) -> Iterator[np.ndarray]:
    """Pack a stream of token rows into blocks, carrying the remainder across rows (bounded memory)."""
    buffer = np.zeros(0, dtype=np.int32)
    for row in token_rows:
        buffer = np.concatenate([buffer, np.asarray(row, dtype=np.int32)])
        n = len(buffer) // block_size
        for i in range(n):
            yield buffer[i * block_size:(i + 1) * block_size]
        buffer = buffer[n * block_size:]
