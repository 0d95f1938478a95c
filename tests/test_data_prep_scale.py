"""The data layer at scale: packing across batches (only the final remainder dropped), --keep_remainder,
the too-little-data error, the prepared-data cache (reuse and invalidation), parallel tokenizing, and the
guide's blocks reproduced exactly with join_with_eos off."""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import pytest

from clm import TrainConfig, data
from clm.collate import IGNORE_INDEX, collate_blocks
from clm.defaults import gpt2_tokenizer, sample_data_path
from clm.errors import DataError

from conftest import eli5_rows, guide_group_texts, write_jsonl

pytestmark = pytest.mark.usefixtures("own_cache")


def split_token_stream(config, tokenizer, name):
    """The split's documents in the guide's order, tokenized and concatenated by hand."""
    raw = data.load_raw(config)
    rows = raw.train_test_split(test_size=config.test_size, seed=config.seed)[name].flatten()
    column = data.text_column_for(rows.column_names, config.text_column)
    ids = tokenizer([data.as_text(v) for v in rows[column]])["input_ids"]
    eos = [tokenizer.eos_token_id] if config.join_with_eos else []
    return list(chain.from_iterable(row + eos for row in ids))


# --------------------------------------------------------------------------------------------- remainder
def test_only_the_final_remainder_is_dropped_across_map_batches_and_workers(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(2600, words=7))  # train: 2080 rows, three map batches
    config = TrainConfig(train_file=str(path), block_size=64, preprocessing_num_workers=2)
    dd = data.prepare_dataset(config, tokenizer, use_cache=False)
    for name in ("train", "test"):
        stream = split_token_stream(config, tokenizer, name)
        n = len(stream) // 64
        assert len(dd[name]) == n  # the guide would lose up to 63 tokens per 1000-row batch (and per worker)
        assert np.array_equal(np.asarray(dd[name]["input_ids"][:]), np.asarray(stream[: n * 64]).reshape(n, 64))
    one_worker = data.prepare_dataset(config.replace(preprocessing_num_workers=1), tokenizer, use_cache=False)
    assert one_worker["train"]["input_ids"][:] == dd["train"]["input_ids"][:]


def test_long_documents_are_tokenized_in_smaller_batches_and_gathered_in_bounded_pieces(tmp_path, tokenizer,
                                                                                      monkeypatch):
    """Batches bounded by text (not rows) and a shuffled split gathered a few rows at a time give the same
    blocks as tokenizing and concatenating the split by hand."""
    from clm.data import blocks, tokens

    assert tokens.batch_rows(10_000, 10_000 * 40) == tokens.TOKENIZE_BATCH_SIZE  # short rows: the default
    assert tokens.batch_rows(10_000, 10_000 * 10_000) == tokens.TOKENIZE_BATCH_CHARS // 10_000
    assert tokens.batch_rows(3, 100 * tokens.TOKENIZE_BATCH_CHARS) == 1
    monkeypatch.setattr(tokens, "TOKENIZE_BATCH_CHARS", 4_000)  # about 3 rows of 200 words per batch
    monkeypatch.setattr(blocks, "PACK_CHUNK_ROWS", 16)
    monkeypatch.setattr(blocks, "SCATTERED_RELEASE_ROWS", 3)
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(120, words=200))
    config = TrainConfig(train_file=str(path), block_size=64, preprocessing_num_workers=1)
    dd = data.prepare_dataset(config, tokenizer)
    for name in ("train", "test"):
        stream = split_token_stream(config, tokenizer, name)
        n = len(stream) // 64
        assert np.array_equal(np.asarray(dd[name]["input_ids"][:]), np.asarray(stream[: n * 64]).reshape(n, 64))


def test_pack_keeps_int32_fixed_length_rows():
    ds = data.pack(np.arange(10, dtype=np.int64), 4)
    assert ds["input_ids"][:] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.features["input_ids"].length == 4 and ds.features["input_ids"].feature.dtype == "int32"
    assert ds.column_names == ["input_ids"]


def test_keep_remainder_pads_masks_and_collate_ignores_the_padding(tmp_path, tokenizer):
    ds = data.pack(np.arange(1, 11, dtype=np.int32), 4, keep_remainder=True, pad_id=99)
    assert ds["input_ids"][:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 99, 99]]
    assert ds["attention_mask"][:] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    batch = collate_blocks([ds[1], ds[2]])
    assert batch["labels"].tolist() == [[5, 6, 7, 8], [9, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]

    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(40))
    config = TrainConfig(train_file=str(path), block_size=64, keep_remainder=True)
    dd = data.prepare_dataset(config, tokenizer, use_cache=False)
    for name in ("train", "test"):
        stream = split_token_stream(config, tokenizer, name)
        rest = len(stream) % 64
        assert len(dd[name]) == len(stream) // 64 + (rest > 0)
        last = dd[name][-1]
        assert last["input_ids"][:rest] == stream[-rest:] and set(last["input_ids"][rest:]) <= {50256}
        assert last["attention_mask"] == [1] * rest + [0] * (64 - rest)
        assert all(sum(m) == 64 for m in dd[name]["attention_mask"][:-1])
        labels = collate_blocks([last])["labels"][0]
        assert (labels[rest:] == IGNORE_INDEX).all() and (labels[:rest] == stream[-rest:]).all()


def test_keep_remainder_turns_a_short_split_into_one_padded_block(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"a few words {i}"} for i in range(10)])
    dd = data.prepare_dataset(TrainConfig(train_file=str(path), block_size=256, keep_remainder=True), tokenizer,
                              use_cache=False)
    assert len(dd["test"]) == 1 and 0 < sum(dd["test"][0]["attention_mask"]) < 256


# --------------------------------------------------------------------------------------------- too little
def test_too_little_data_for_one_block_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"a few words {i}"} for i in range(10)])
    with pytest.raises(DataError, match=r"the \w+ split has \d+ tokens, fewer than one block of 256"):
        data.prepare_dataset(TrainConfig(train_file=str(path), block_size=256), tokenizer, use_cache=False)
    empty = data.tokenize(data.load_raw(TrainConfig(train_file=str(path))).select([]), tokenizer, TrainConfig())
    with pytest.raises(DataError, match="the test split has 0 tokens"):
        data.pack_split(empty, TrainConfig(), 0, "test")


# --------------------------------------------------------------------------------------------- cache
def test_second_call_reuses_the_prepared_data_and_says_so(tmp_path, tokenizer, caplog, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(60))
    config = TrainConfig(train_file=str(path), block_size=32)
    with caplog.at_level(logging.INFO, logger="clm.data"):
        first = data.prepare_dataset(config, tokenizer)
    assert "Prepared data saved to" in caplog.text
    caplog.clear()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although a prepared copy is cached")

    monkeypatch.setattr(data.pipeline, "tokenize", no_tokenizing)
    with caplog.at_level(logging.INFO, logger="clm.data"):
        second = data.prepare_dataset(config, tokenizer)
    assert "Reusing prepared data" in caplog.text
    for name in ("train", "test"):
        assert second[name]["input_ids"][:] == first[name]["input_ids"][:]
    with pytest.raises(AssertionError, match="tokenized again"):  # --overwrite_cache prepares anew
        data.prepare_dataset(config.replace(overwrite_cache=True), tokenizer)


def test_fingerprint_changes_with_tokenizer_block_size_and_join(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(20))
    config = TrainConfig(train_file=str(path))
    raw = data.load_raw(config)
    base = data.fingerprint(config, tokenizer, raw)
    assert data.fingerprint(TrainConfig(train_file=str(path)), gpt2_tokenizer(), raw) == base  # stable
    other = gpt2_tokenizer()
    other.add_tokens(["<|new-token|>"])
    changed = {
        "tokenizer": data.fingerprint(config, other, raw),
        "block_size": data.fingerprint(config.replace(block_size=64), tokenizer, raw),
        "join_with_eos": data.fingerprint(config.replace(join_with_eos=False), tokenizer, raw),
        "keep_remainder": data.fingerprint(config.replace(keep_remainder=True), tokenizer, raw),
        "split": data.fingerprint(config.replace(test_size=0.3), tokenizer, raw),
    }
    assert base not in changed.values() and len(set(changed.values())) == len(changed)
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])  # the data changed
    assert data.fingerprint(config, tokenizer, data.load_raw(config)) != base


def test_changed_settings_do_not_reuse_the_cache(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(60))
    config = TrainConfig(train_file=str(path), block_size=32)
    data.prepare_dataset(config, tokenizer)
    with caplog.at_level(logging.INFO, logger="clm.data"):
        dd = data.prepare_dataset(config.replace(block_size=16), tokenizer)
    assert "Reusing" not in caplog.text and len(dd["train"][0]["input_ids"]) == 16
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clm.data"):
        data.prepare_dataset(config.replace(join_with_eos=False), tokenizer)
    assert "Reusing" not in caplog.text


# --------------------------------------------------------------------------------------------- the guide
def test_blocks_equal_the_guides_pipeline_with_join_with_eos_off(tokenizer):
    """train_test_split(test_size, seed), flatten, " ".join answers, tokenize, group_texts: the guide, verbatim,
    on the bundled sample (each split fits in one map batch, so the guide drops only the final remainder)."""
    config = TrainConfig(join_with_eos=False, test_size=0.2, seed=42, block_size=128)
    ours = data.prepare_dataset(config, tokenizer, use_cache=False)

    from datasets import load_dataset

    eli5 = load_dataset("json", data_files=str(sample_data_path()), split="train")
    eli5 = eli5.train_test_split(test_size=0.2, seed=42)
    eli5 = eli5.flatten()

    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    tokenized_eli5 = eli5.map(preprocess_function, batched=True, remove_columns=eli5["train"].column_names)
    lm_dataset = tokenized_eli5.map(guide_group_texts, batched=True)
    for name in ("train", "test"):
        assert len(eli5[name]) <= 1000
        assert ours[name]["input_ids"][:] == lm_dataset[name]["input_ids"][:]
        assert len(ours[name]) > 10


# --------------------------------------------------------------------------------------------- texts
def test_arrow_texts_matches_as_text_including_nulls():
    import pyarrow as pa

    cases = [
        pa.array([["a", "b"], [], ["c"]]),
        pa.array([["a", None, "b"], None, ["c"]]),
        pa.array(["x", None, "y"]),
        pa.array([1, 2, None]),
        pa.array([[["nested", "lists"]], [["ok"]]]),
    ]
    for column in cases:
        assert data.arrow_texts(column) == [data.as_text(v) for v in column.to_pylist()]
        assert data.arrow_texts(pa.chunked_array([column, column])) == data.arrow_texts(column) * 2
