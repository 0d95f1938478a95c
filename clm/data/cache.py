"""The prepared-data cache: blocks saved under a fingerprint of everything that shapes them, so a second run on
the same data and settings loads them (memory-mapped) instead of tokenizing again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from clm.defaults import sample_data_path
from clm.io import atomic_path

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

# The settings that shape examples and rows (None: the data format's default)
EXAMPLE_SETTINGS = ("prompt_column", "completion_column", "completion_only_loss", "assistant_only_loss", "packing")
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
             config.join_with_eos, config.keep_remainder, config.text_column, config.test_size, config.split_seed]
    # Added only when set, so caches prepared before these options existed keep their fingerprint.
    extra = {"validation_file": _file_id(config.validation_file) if config.validation_file else None,
             "max_train_samples": config.max_train_samples, "max_eval_samples": config.max_eval_samples,
             **{name: getattr(config, name) for name in EXAMPLE_SETTINGS},
             "chat_template": _file_id(config.chat_template) if config.chat_template else None}
    if "messages" in raw.column_names:  # the tokenizer's own template renders the conversations
        extra["tokenizer_chat_template"] = getattr(tokenizer, "chat_template", None)
    if any(v is not None for v in extra.values()):
        parts.append(extra)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def load_prepared(target: Path) -> Optional["DatasetDict"]:
    """The prepared splits saved at ``target``, or None if none were saved there."""
    from datasets import load_from_disk

    return load_from_disk(str(target)) if (target / "dataset_dict.json").exists() else None


class PreparedFolder:
    """The folder ``save_prepared`` fills: one Arrow file of blocks per split (``blocks_file``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.splits: list[str] = []

    def blocks_file(self, split: str) -> Path:
        self.splits.append(split)
        return self.path / f".{split}.arrow"

    def finish(self) -> None:
        """Lay the files out as ``DatasetDict.save_to_disk`` does, so ``load_from_disk`` reads them: the
        metadata comes from saving a one-row copy of each split, whose data file is then replaced by the
        split's own (written block by block, never copied through memory)."""
        from datasets import Dataset, DatasetDict

        splits = {}
        for split in self.splits:
            blocks = Dataset.from_file(str(self.path / f".{split}.arrow"))
            splits[split] = Dataset.from_dict(blocks[:1], features=blocks.features)
        DatasetDict(splits).save_to_disk(str(self.path))
        for split in self.splits:
            data_files = json.loads((self.path / split / "state.json").read_text())["_data_files"]
            if len(data_files) != 1:  # one row is one shard, in every datasets version so far
                raise RuntimeError(f"unexpected prepared-data layout: {data_files}")
            os.replace(self.path / f".{split}.arrow", self.path / split / data_files[0]["filename"])


@contextlib.contextmanager
def save_prepared(target: Path) -> Iterator[PreparedFolder]:
    """A staging folder for the prepared splits, renamed to ``target`` when the block succeeds (atomic;
    another process preparing the same data may win, which is equally good)."""
    with atomic_path(target, shared=True) as tmp:
        tmp.mkdir(parents=True)
        folder = PreparedFolder(tmp)
        yield folder
        folder.finish()
