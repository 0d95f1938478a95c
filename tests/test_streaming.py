"""--streaming: blocks packed on the fly equal clm.data.pack on the same token stream; a finite eval split
identical to the non-streaming one; errors; the Trainer trains from the stream with max_steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clm import TrainConfig, data
from clm.errors import DataError
from clm.data import flatten_row, prepare_streaming

from conftest import eli5_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("own_cache")


def stream_config(path, **kw) -> TrainConfig:
    return TrainConfig(train_file=str(path), streaming=True, **{"max_steps": 1, "eval_samples": 10,
                                                                "block_size": 16, **kw})


def token_stream(tokenizer, rows, join_with_eos=True) -> np.ndarray:
    ids = tokenizer([" ".join(r["answers"]["text"]) for r in rows])["input_ids"]
    return np.array([t for row in ids for t in row + ([tokenizer.eos_token_id] if join_with_eos else [])],
                    dtype=np.int32)


def test_block_packer_blocks_equal_pack_for_any_piece_sizes():
    rng = np.random.default_rng(0)
    for block in (1, 3, 16, 50):
        tokens = rng.integers(0, 50000, rng.integers(0, 400)).astype(np.int32)
        cuts = np.sort(rng.integers(0, len(tokens) + 1, 7))
        pieces = np.split(tokens, cuts)  # some pieces empty, some shorter than a block
        ours = [b.tolist() for b in data.BlockPacker(block).blocks(pieces)]
        assert ours == data.pack(tokens, block)["input_ids"][:]


@pytest.mark.parametrize("join_with_eos", [True, False])
def test_stream_blocks_equal_packing_the_same_token_stream(tmp_path, tokenizer, join_with_eos):
    rows = eli5_rows(60, words=25)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = stream_config(path, join_with_eos=join_with_eos)
    dd = prepare_streaming(config, tokenizer, shuffle_buffer=1)  # a buffer of one keeps the file's order
    blocks = [r["input_ids"] for r in dd["train"]]
    expected = data.pack(token_stream(tokenizer, rows[10:], join_with_eos), 16)["input_ids"][:]
    assert blocks == expected and len(blocks) > 20
    assert dd["train"].features["input_ids"].length == 16
    assert dd["train"].features["input_ids"].feature.dtype == "int32"


def test_eval_split_is_finite_and_identical_to_packing_the_first_rows(tmp_path, tokenizer):
    rows = eli5_rows(60, words=25)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = stream_config(path)
    test = data.prepare_dataset(config, tokenizer)["test"]  # prepare_dataset hands streaming to prepare_streaming
    from datasets import Dataset

    assert isinstance(test, Dataset) and len(test) > 0
    head = data.load_raw(config.replace(streaming=False, max_steps=-1)).select(range(10))
    pad_id = tokenizer.pad_token_id
    expected = data.pack_split(data.tokenize(head, tokenizer, config), config, pad_id, "test")
    assert test["input_ids"][:] == expected["input_ids"][:]
    assert test.features == expected.features


def test_shuffled_stream_is_deterministic_and_every_pass_starts_afresh(tmp_path, tokenizer):
    rows = eli5_rows(80, words=25)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train = prepare_streaming(stream_config(path), tokenizer, shuffle_buffer=50)["train"]
    first = [r["input_ids"] for r in train]
    partial = [r["input_ids"] for _, r in zip(range(3), train)]  # an abandoned pass leaves no carry behind
    second = [r["input_ids"] for r in train]
    unshuffled = data.pack(token_stream(tokenizer, rows[10:]), 16)["input_ids"][:]
    assert first == second and partial == first[:3]
    assert len(first) == len(unshuffled) and first != unshuffled


def test_stream_needs_rows_beyond_the_eval_samples(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(10))
    with pytest.raises(DataError, match="leaving none to train on"):
        prepare_streaming(stream_config(path, eval_samples=10), tokenizer)


def test_stream_with_too_few_tokens_for_one_block_says_so(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"word {i}"} for i in range(30)])
    with pytest.raises(DataError, match="the eval split has .* fewer than one block"):
        prepare_streaming(stream_config(path, block_size=256, eval_samples=1), tokenizer)
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "many words here " * 40}] + [{"text": "hi"}] * 3)
    train = prepare_streaming(stream_config(path, block_size=64, eval_samples=1), tokenizer)["train"]
    with pytest.raises(DataError, match="training stream has .* fewer than one block"):
        list(train)


def test_stream_text_column_and_its_errors(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": f"text {i} " * 30, "other": i} for i in range(30)])
    with pytest.raises(DataError, match="no usable text column; columns found: body, other"):
        prepare_streaming(stream_config(path), tokenizer)
    dd = prepare_streaming(stream_config(path, text_column="body"), tokenizer)
    assert len(dd["test"]) > 0 and len(list(dd["train"])) > 0


def test_bad_json_line_in_the_stream_is_reported_with_its_number(tmp_path, tokenizer):
    lines = [json.dumps({"text": f"row {i} " * 20}) for i in range(40)]
    lines[30] = '{"text": broken'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # The JSON reader parses whole blocks, so the error may come while the eval rows are read or later.
    with pytest.raises(DataError, match="line 31 is not valid JSON"):
        list(prepare_streaming(stream_config(path), tokenizer)["train"])


def test_flatten_row_matches_dataset_flatten():
    from datasets import Dataset

    row = {"q": "x", "answers": {"text": ["a", "b"], "meta": {"score": 3}}, "n": 1}
    assert list(flatten_row(row)) == Dataset.from_list([row]).flatten().column_names
    assert flatten_row(row)["answers.meta.score"] == 3


def test_trainer_trains_from_the_stream_with_max_steps(tmp_path, tokenizer):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from clm.backends.pt.batches import torch_collate
    from clm.backends.pt.trainer import ClmTrainer, training_arguments
    from clm.defaults import tiny_gpt2_config

    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(60, words=25))
    config = stream_config(path, block_size=32, max_steps=4, per_device_train_batch_size=4,
                           per_device_eval_batch_size=4, output_dir=str(tmp_path / "out"), report_to="none",
                           logging_steps=1)
    dd = prepare_streaming(config, tokenizer)
    model = AutoModelForCausalLM.from_config(tiny_gpt2_config(n_embd=32, n_layer=1, n_head=2, n_positions=64))
    trainer = ClmTrainer(model=model, args=training_arguments(config, save_strategy="no", eval_strategy="no"),
                         train_dataset=dd["train"], eval_dataset=dd["test"], data_collator=torch_collate)
    result = trainer.train()
    assert trainer.state.global_step == 4 and np.isfinite(result.training_loss)
    assert np.isfinite(trainer.evaluate()["eval_loss"])


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_clm_train_streaming_end_to_end(tmp_path, small_model_dir, backend):
    pytest.importorskip("torch")
    if backend == "tf":
        pytest.importorskip("tensorflow")
    import clm

    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(60, words=25))
    metrics = clm.train(stream_config(path, backend=backend, model_name_or_path=str(small_model_dir), block_size=32,
                                      max_steps=3, per_device_train_batch_size=4, report_to="none",
                                      output_dir=str(tmp_path / "out")))
    assert metrics["train_steps"] == 3 and np.isfinite(metrics["eval_loss"])
    assert (tmp_path / "out" / "all_results.json").is_file()
