"""The data layer, one module per stage in flow order (each imports only the stages before it):

    source ─► rows ─► tokens ─► blocks ─► pipeline (+ cache)
    (hub,     (split,  (fast      (BlockPacker:   prepare_dataset: map-based, cached on disk
     file,     flatten, tokenizer, fixed-length,  prepare_streaming: the same stages on a stream
     sample)   text)    EOS)       remainder)

Framework-free: it never imports torch or tensorflow (datasets, pyarrow and transformers only inside the
functions that need them). ``prepare_dataset`` returns a ``DatasetDict`` (train/test) whose rows are
``block_size`` token ids in an ``input_ids`` column.
"""

from __future__ import annotations

from clm.data.blocks import BlockPacker, group_texts, pack, pack_split
from clm.data.cache import cache_root, fingerprint
from clm.data.pipeline import prepare_dataset, prepare_streaming
from clm.data.rows import arrow_texts, as_text, flatten_row, split, text_column_for
from clm.data.source import load_raw, read_error
from clm.data.tokens import pad_id_for, tokenize, tokenize_stream

__all__ = [
    "prepare_dataset", "prepare_streaming",
    "load_raw", "read_error",
    "split", "flatten_row", "text_column_for", "as_text", "arrow_texts",
    "tokenize", "tokenize_stream", "pad_id_for",
    "BlockPacker", "pack", "pack_split", "group_texts",
    "fingerprint", "cache_root",
]
