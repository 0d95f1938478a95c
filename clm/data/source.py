"""Source: raw rows from a Hub dataset, a local file or the bundled ELI5-layout sample, map-based or streamed.

Every way a file or a Hub id can fail ends in one-line ``DataError``/``ClmError`` naming the fix; a streamed
source fails lazily, so ``iter_rows`` translates its read errors into the same messages.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

from clm import hub
from clm.defaults import sample_data_path
from clm.errors import ClmError, DataError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from clm.config import TrainConfig

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
# Bytes of text the json and text builders parse at a time (datasets' default is 10 MB). Their peak memory
# grows with the file at the default (freed chunks are not reused in full); at 1 MB it stays flat, for a few
# percent more load time.
READ_CHUNK_BYTES = 1 << 20


def check_file(path: str, flag: str = "--train_file") -> Path:
    """``path`` as a Path once it is a readable, non-empty file of a supported format, else a DataError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist; check the {flag} path")
    if p.is_dir():
        raise DataError(f"{flag} {path!r} is a directory; give a file (.jsonl, .json, .csv, .txt, .parquet)")
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


def _load_file(path: str, streaming: bool, flag: str = "--train_file") -> "Dataset | IterableDataset":
    from datasets import load_dataset

    p = check_file(path, flag)
    builder = BUILDERS[p.suffix.lower()]
    try:
        # A streamed file is read lazily: iter_rows turns a later read error into the same DataError.
        options = {"chunksize": READ_CHUNK_BYTES} if builder in ("json", "text") else {}
        return load_dataset(builder, data_files=str(p), split="train", streaming=streaming, **options)
    except Exception as exc:  # datasets raises many types for broken files; name the file and the cause
        raise read_error(path, exc, builder) from exc


def load_raw(config: "TrainConfig") -> "Dataset | IterableDataset":
    """Rows from a Hub dataset, a local file, or the bundled ELI5-layout sample (an ``IterableDataset`` with
    ``config.streaming``)."""
    if config.train_file:
        return _load_file(config.train_file, config.streaming)
    if config.dataset_name:
        from datasets import load_dataset

        with hub.translate_errors(config.dataset_name, "dataset"):
            return load_dataset(config.dataset_name, config.dataset_config_name, split=config.dataset_split,
                                streaming=config.streaming)
    return _load_file(str(sample_data_path()), config.streaming)


def load_validation(config: "TrainConfig") -> Optional["Dataset"]:
    """The rows of ``--validation_file`` (always read whole: the eval split is finite), or None."""
    if not config.validation_file:
        return None
    return _load_file(config.validation_file, streaming=False, flag="--validation_file")


def source_name(config: "TrainConfig") -> str:
    """The data source as the user would name it: Hub id, file, or the bundled sample's path."""
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
        raise read_error(source_name(config), exc) from exc


def iter_rows(stream: Iterable[dict[str, Any]], config: "TrainConfig") -> Iterator[dict[str, Any]]:
    """The rows of a streamed source, read errors reported as ``load_raw`` reports them."""
    with _read_errors(config):
        yield from stream
