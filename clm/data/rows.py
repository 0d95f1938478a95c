"""Rows and text: the guide's split, flattened rows, the text column, and each row as one document.

ELI5 rows hold several answers under ``answers.text``; like the guide they become one document, joined with a
space. The same rules apply to an Arrow batch (``arrow_texts``, map-based) and to one streamed row
(``row_text``), so both modes see identical documents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

from clm.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

ELI5_TEXT_COLUMN = "answers.text"


def split(raw: "Dataset", test_size: float, seed: int) -> "DatasetDict":
    """The guide's split: ``train_test_split`` on the raw rows, before tokenizing."""
    if len(raw) < 2:
        raise DataError(f"the data has {len(raw)} row(s); at least 2 are needed to split off a test set")
    return raw.train_test_split(test_size=test_size, seed=seed)


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
                    f"pass --text_column NAME (plain text), --prompt_column and --completion_column (Q&A), or "
                    f"give conversations in a 'messages' column")


def as_text(value: Any) -> str:
    """A cell as one document: lists (ELI5's answers) joined with a space, as the guide does."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(as_text(v) for v in value)
    return str(value)


def row_text(row: dict[str, Any], column: str) -> str:
    """One streamed (nested) row as its document."""
    return as_text(flatten_row(row).get(column))


def arrow_texts(column: Any) -> list[str]:
    """A batch of one text column (Arrow) as documents, as ``as_text`` would give them: lists of strings
    (ELI5's answers) joined with a space in Arrow, no Python loop; anything unusual goes through ``as_text``."""
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
    return [as_text(v) for v in column.to_pylist()]
