"""The PyTorch backend's pieces: collation, the library call, TrainingArguments (end to end: test_end_to_end)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.compat  # the Trainer path must hold on transformers 4.57 too

from clm.collate import collate_blocks  # noqa: E402


def test_collator_keeps_eos_labels_and_masks_only_padding():
    eos = 50256
    batch = collate_blocks([{"input_ids": [5, eos, 7, 8]},
                            {"input_ids": [eos, 1, 2, 3]}])
    assert batch["labels"].tolist() == batch["input_ids"].tolist()  # EOS stays a target
    padded = collate_blocks([{"input_ids": [5, eos, eos, eos], "attention_mask": [1, 1, 0, 0]}])
    assert padded["labels"].tolist() == [[5, eos, -100, -100]]


def test_library_call_equals_cli(small_model_dir, tmp_path):
    import clm
    from conftest import eli5_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(30))
    metrics = clm.train(clm.TrainConfig(backend="pt", model_name_or_path=str(small_model_dir),
                                        train_file=str(data), output_dir=str(tmp_path / "o"), max_steps=3,
                                        block_size=32, report_to="none"))
    assert metrics["train_steps"] == 3 and metrics["backend"] == "pt"
    assert json.loads((tmp_path / "o" / "all_results.json").read_text())["eval_loss"] == metrics["eval_loss"]


def test_scale_and_recipe_flags_reach_training_arguments(tmp_path):
    import os

    from clm.backends.pt.trainer import training_arguments
    from clm.config import TrainConfig

    saved = dict(os.environ)  # transformers 4.x exports ACCELERATE_USE_FSDP=true: keep it from later tests
    try:
        args = training_arguments(TrainConfig(output_dir=str(tmp_path), fsdp="full_shard auto_wrap", save_steps=5,
                                              save_total_limit=2, warmup_ratio=0.1, gradient_accumulation_steps=2,
                                              lr_scheduler_type="cosine", report_to="none"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # transformers 4.x keeps FSDP options as a list; 5.x turns them into fsdp=True plus fsdp_config
    assert "full_shard" in str(args.fsdp) or args.fsdp_config.get("reshard_after_forward") is True
    assert args.save_steps == 5 and args.save_total_limit == 2
    assert args.eval_strategy == "steps" and args.gradient_accumulation_steps == 2
    assert args.get_warmup_steps(100) == 10 and str(args.lr_scheduler_type).lower().endswith("cosine")
    assert args.learning_rate == 1e-3  # the built-in model's from-scratch default
