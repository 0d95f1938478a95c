"""The prepared-data cache: blocks saved under a fingerprint of everything that shapes them, so a second run on
the same data and settings loads them (memory-mapped) instead of tokenizing again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from clm.defaults import sample_data_path
from clm.reporting import atomic_path

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

# Bump when the prepared layout changes, so old caches are not reused.
PREPARED_FORMAT_VERSION = 1


def cache_root() -> Path:
    """$CLM_CACHE/prepared, else $HF_HOME/clm/prepared (~/.cache/huggingface/clm/prepared)."""
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
    # A Hub dataset by datasets' own fingerprint; a file by path, size and modification time (no read).
    if config.dataset_name:
        return f"hub:{config.dataset_name}:{config.dataset_config_name}:{config.dataset_split}:{raw._fingerprint}"
    return _file_id(config.train_file or sample_data_path())


def _file_id(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"


def fingerprint(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", raw: "Dataset") -> str:
    """Changes whenever the data (validation file and row limits included), tokenizer, block size, split or
    join settings change."""
    parts = [PREPARED_FORMAT_VERSION, _source_id(config, raw), _tokenizer_hash(tokenizer), config.block_size,
             config.join_with_eos, config.keep_remainder, config.text_column, config.test_size, config.seed]
    # Added only when set, so caches prepared before these options existed keep their fingerprint.
    extra = {"validation_file": _file_id(config.validation_file) if config.validation_file else None,
             "max_train_samples": config.max_train_samples, "max_eval_samples": config.max_eval_samples}
    if any(v is not None for v in extra.values()):
        parts.append(extra)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def load_prepared(target: Path) -> Optional["DatasetDict"]:
    """The prepared splits saved at ``target``, or None if none were saved there."""
    from datasets import load_from_disk

    return load_from_disk(str(target)) if (target / "dataset_dict.json").exists() else None


def save_prepared(prepared: "DatasetDict", target: Path) -> "DatasetDict":
    """Save ``prepared`` at ``target`` and return it memory-mapped from there, like any cached dataset."""
    from datasets import load_from_disk

    with atomic_path(target, shared=True) as tmp:  # shared: another process preparing the same data may win
        prepared.save_to_disk(str(tmp))
    return load_from_disk(str(target))
