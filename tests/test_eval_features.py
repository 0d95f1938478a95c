"""Issue 12, run_clm.py's extras on both backends: next-token accuracy (through a packaged `evaluate` metric),
--validation_file and row limits, the eval schedule with early stopping and the best model, sample
generations at each evaluation, and --report_to. Parity of the accuracy itself is in test_parity.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clm.config import TrainConfig
from clm.errors import ConfigError

from conftest import eli5_rows, recipe_config, run_clm, write_jsonl

# --------------------------------------------------------------------------------------------- the metric


def test_accuracy_is_run_clms_shifted_argmax_and_skips_masked_labels():
    pytest.importorskip("evaluate")
    from clm.metrics import ACCURACY_SCRIPT, accuracy_from_counts, next_token_accuracy

    assert ACCURACY_SCRIPT.parent.name == "metrics" and ACCURACY_SCRIPT.is_file()  # shipped, loaded by path
    preds = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    labels = np.array([[0, 1, 2, 9], [0, 6, -100, -100]])  # -100: padding of a kept remainder
    # scored pairs: (1,1) (2,2) (3,9) (5,6); the prediction at the last position and -100 labels are not
    assert next_token_accuracy(preds, labels) == pytest.approx(0.5)
    assert accuracy_from_counts(2, 4) == pytest.approx(0.5)  # the TF backend's streaming reduction
    assert next_token_accuracy(preds[:1, :1], labels[:1, :1]) is None  # nothing to score


# --------------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kwargs, message", [
    ({"streaming": True, "max_steps": 5, "max_eval_samples": 10}, "--max_eval_samples with --streaming"),
    ({"max_train_samples": 0}, "--max_train_samples must be positive"),
    ({"eval_strategy": "no", "early_stopping_patience": 2}, "need evaluations"),
    ({"load_best_model_at_end": True, "eval_steps": 4}, "evaluations at checkpoints"),
    ({"load_best_model_at_end": True, "save_steps": 4, "eval_steps": 3}, "multiple of --eval_steps"),
    ({"eval_strategy": "no", "eval_steps": 3}, "--eval_steps given with --eval_strategy no"),
    ({"report_to": ["nonsense"]}, "--report_to 'nonsense' is not one of"),
    ({"report_to": ["none", "tensorboard"]}, "goes alone"),
])
def test_bad_combinations_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_eval_schedule_defaults_follow_the_checkpoints():
    assert TrainConfig().eval_schedule == ("epoch", None)
    assert TrainConfig(save_steps=6).eval_schedule == ("steps", 6)
    assert TrainConfig(eval_steps=3).eval_schedule == ("steps", 3)  # --eval_steps alone means steps
    assert TrainConfig(eval_strategy="steps", logging_steps=5).eval_schedule == ("steps", 5)  # the Trainer's
    assert TrainConfig(load_best_model_at_end=True, save_steps=4, eval_steps=2).load_best_model_at_end
    assert TrainConfig(report_to="none").report_to == ["none"]  # a config file's single name


def test_streaming_with_max_eval_samples_is_exit_2_without_traceback(tmp_path):
    proc = run_clm("--streaming", "--max_steps", "3", "--max_eval_samples", "5", "--output_dir",
                   str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--eval_samples" in proc.stderr


# --------------------------------------------------------------------------------------------- data options


def _tokens(tokenizer, rows: list[dict]) -> int:
    """Tokens clm makes of ``rows`` (answers joined with a space, EOS after each document)."""
    return sum(len(tokenizer(" ".join(r["answers"]["text"]))["input_ids"]) + 1 for r in rows)


def test_validation_file_is_the_whole_eval_split_and_train_is_not_split(tmp_path, tokenizer, own_cache):
    from clm.data import prepare_dataset

    train_rows, val_rows = eli5_rows(30), eli5_rows(7, words=25)
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    ds = prepare_dataset(TrainConfig(train_file=str(train), validation_file=str(val), block_size=16), tokenizer)
    assert len(ds["train"]) == _tokens(tokenizer, train_rows) // 16  # every train row, none held out
    assert len(ds["test"]) == _tokens(tokenizer, val_rows) // 16
    first = tokenizer(" ".join(val_rows[0]["answers"]["text"]))["input_ids"][:16]
    assert list(ds["test"][0]["input_ids"]) == first  # the eval split starts with the file's first row

    limited = prepare_dataset(TrainConfig(train_file=str(train), validation_file=str(val), block_size=16,
                                          max_train_samples=10, max_eval_samples=3), tokenizer)
    assert len(limited["train"]) == _tokens(tokenizer, train_rows[:10]) // 16  # rows, before packing
    assert len(limited["test"]) == _tokens(tokenizer, val_rows[:3]) // 16

    with pytest.raises(Exception, match="check the --validation_file path"):
        prepare_dataset(TrainConfig(train_file=str(train), validation_file=str(tmp_path / "no.jsonl")), tokenizer)


def test_row_limits_take_the_first_rows_of_each_split_and_change_the_cache_key(tmp_path, tokenizer, own_cache):
    from datasets import Dataset

    from clm.data import prepare_dataset
    from clm.data.cache import fingerprint
    from clm.data.rows import split

    rows = eli5_rows(40)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = TrainConfig(train_file=str(data), block_size=16, max_train_samples=7, max_eval_samples=3)
    ds = prepare_dataset(config, tokenizer)
    order = split(Dataset.from_dict({"row": list(range(40))}), config.test_size, config.seed)
    assert len(ds["train"]) == _tokens(tokenizer, [rows[i] for i in order["train"]["row"][:7]]) // 16
    assert len(ds["test"]) == _tokens(tokenizer, [rows[i] for i in order["test"]["row"][:3]]) // 16
    full = prepare_dataset(config.replace(max_train_samples=None, max_eval_samples=None), tokenizer)
    assert list(full["test"][0]["input_ids"]) == list(ds["test"][0]["input_ids"])  # same split, then cut

    raw = Dataset.from_list([{"text": "x"}])
    keys = {fingerprint(c, tokenizer, raw) for c in (
        config, config.replace(max_train_samples=8), config.replace(max_eval_samples=None),
        config.replace(validation_file=str(data)))}
    assert len(keys) == 4


def test_streaming_max_train_samples_and_validation_file(tmp_path, tokenizer):
    from clm.data import prepare_dataset

    rows = eli5_rows(30)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    val = write_jsonl(tmp_path / "v.jsonl", eli5_rows(5, words=25))
    config = TrainConfig(train_file=str(data), block_size=16, streaming=True, max_steps=2, eval_samples=4,
                         max_train_samples=6)
    ds = prepare_dataset(config, tokenizer)
    blocks = list(ds["train"])
    assert len(blocks) == _tokens(tokenizer, rows[4:10]) // 16  # the 6 rows after the 4 eval rows

    with_val = prepare_dataset(config.replace(validation_file=str(val), max_eval_samples=2), tokenizer)
    assert len(with_val["test"]) == _tokens(tokenizer, eli5_rows(5, words=25)[:2]) // 16
    assert len(list(with_val["train"])) == _tokens(tokenizer, rows[:6]) // 16  # nothing held out of the stream


def test_default_sample_prompts_are_the_opening_words_of_eval_documents(tokenizer):
    from datasets import Dataset

    from clm.samples import choose_prompts

    eos = tokenizer.eos_token_id
    docs = ["Why is the sky blue at noon", "Stars shine because of fusion in their cores"]
    ids = [t for d in docs for t in tokenizer(d)["input_ids"] + [eos]]
    test = Dataset.from_dict({"input_ids": [ids[:12], ids[12:24]]})
    assert choose_prompts(TrainConfig(), tokenizer, test) == ["Why is the sky blue at", "Stars shine because of fusion in"]
    assert choose_prompts(TrainConfig(sample_prompts=["Hello"]), tokenizer, test) == ["Hello"]
    assert choose_prompts(TrainConfig(sample_max_new_tokens=0), tokenizer, test) == []


# --------------------------------------------------------------------------------------------- both backends


def _need(backend: str) -> None:
    pytest.importorskip("torch")  # the tiny model is written by PyTorch
    pytest.importorskip("evaluate")
    if backend == "tf":
        pytest.importorskip("tensorflow")


def _train(backend: str, model: Path, data: Path, out: Path, **kw):
    import clm

    base = dict(learning_rate=None, max_steps=12, sample_max_new_tokens=0)  # the model's default rate
    return clm.train(recipe_config(**{**base, **kw}, backend=backend, model_name_or_path=model, train_file=data,
                                   output_dir=out))


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_early_stopping_eval_schedule_accuracy_and_samples(backend, tiny_model_dir, tmp_path):
    """Evaluations every 2 steps; a threshold no evaluation can beat stops training at the second one (the
    Trainer's EarlyStoppingCallback rule) on both backends. Accuracy before and after, samples in TensorBoard
    text and the model card."""
    _need(backend)
    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(40))
    out = tmp_path / "out"
    metrics = _train(backend, tiny_model_dir, data, out, learning_rate=1e-2, save_steps=4, eval_steps=2,
                     early_stopping_patience=1, early_stopping_threshold=100.0, sample_max_new_tokens=3,
                     sample_prompts=["Why do stars"], report_to="tensorboard")
    assert metrics["train_steps"] == 4
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_accuracy_before"] == 0.0  # random weights over 50k tokens
    assert 0 < results["eval_accuracy"] < 1
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [r["step"] for r in state["log_history"] if "eval_loss" in r] == [2, 4]
    assert all("eval_accuracy" in r for r in state["log_history"] if "eval_loss" in r)
    card = (out / "README.md").read_text()
    assert "eval_accuracy" in card and "## Sample generations" in card and "**Why do stars**" in card
    events = b"".join(p.read_bytes() for p in (out / "runs").rglob("events.out.tfevents*"))
    assert b"eval/samples" in events and b"Why do stars" in events and b"accuracy" in events


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_bf16_run_samples_and_saves_float32_weights(backend, small_model_dir, tmp_path):
    """Mixed precision end to end: training and evaluation in bfloat16, sample generations at each evaluation
    (TensorFlow's generate needs float32 scores for its top-k/top-p filter) and float32 weights saved."""
    _need(backend)
    from safetensors.numpy import load_file

    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(20))
    out = tmp_path / "out"
    metrics = _train(backend, small_model_dir, data, out, bf16=True, max_steps=2, sample_max_new_tokens=3,
                     sample_prompts=["Why do stars"])
    assert math.isfinite(metrics["eval_loss"]) and metrics["train_steps"] == 2
    assert "**Why do stars**" in (out / "README.md").read_text()
    assert {str(v.dtype) for v in load_file(str(out / "model.safetensors")).values()} == {"float32"}


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_load_best_model_at_end_keeps_the_best_checkpoint(backend, tiny_model_dir, tmp_path):
    """Training on one vocabulary while evaluating on another (--validation_file) makes the eval loss rise
    after the first evaluations; the final model is the best checkpoint's, and --save_total_limit 1 keeps it."""
    _need(backend)
    words = "zebra violin quartz umbrella kettle saxophone marmalade tulip".split()
    val = write_jsonl(tmp_path / "v.jsonl", [{"text": " ".join(words[(i * 3 + k) % 8] for k in range(40))}
                                             for i in range(12)])
    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(40))
    out = tmp_path / "out"
    metrics = _train(backend, tiny_model_dir, data, out, validation_file=str(val), learning_rate=1e-2,
                     max_steps=8, save_steps=2, eval_steps=2, load_best_model_at_end=True, save_total_limit=2,
                     lr_scheduler_type="constant")
    history = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    evals = {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    assert sorted(evals) == [2, 4, 6, 8]
    assert best_step < 8 and evals[8] > evals[best_step]  # the setup does what it should
    assert metrics["eval_loss"] == pytest.approx(evals[best_step], rel=1e-5)  # the final model is the best
    # --save_total_limit 2: the newest and the best survive the pruning (the Trainer's rule)
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{best_step}", "checkpoint-8"}


@pytest.mark.parametrize("backend, report_to, message", [
    ("pt", ["wandb"], "--report_to wandb needs its library"),
    ("tf", ["comet_ml"], "--report_to comet_ml has no Keras callback"),
    ("tf", ["wandb"], "--report_to wandb needs the wandb package"),
])
def test_report_to_names_a_backend_cannot_serve_are_one_line(backend, report_to, message):
    _need(backend)
    import importlib.util

    if importlib.util.find_spec(report_to[0]) is not None:
        pytest.skip(f"{report_to[0]} is installed here")
    import clm

    with pytest.raises(ConfigError, match=message):
        clm.get_backend(backend).check_config(TrainConfig(backend=backend, report_to=report_to))


@pytest.mark.tf
def test_keras_epochs_end_at_every_checkpoint_and_evaluation():
    pytest.importorskip("tensorflow")
    from clm.backends.tf.trainer import interval_plan

    assert interval_plan(10, save_every=4, eval_every=2, eval_at_end=True) == (2, [1, 2, 3, 4, 5])
    assert interval_plan(10, save_every=4, eval_every=3, eval_at_end=True) == (1, [3, 6, 9, 10])
    assert interval_plan(10, save_every=4, eval_every=3, eval_at_end=False) == (1, [3, 6, 9])
    assert interval_plan(10, save_every=4, eval_every=None, eval_at_end=True) == (4, [])  # --eval_strategy no
