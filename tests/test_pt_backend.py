"""The PyTorch backend end to end: train through the CLI, reload, generate, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.compat  # the Trainer path must hold on transformers 4.57 too

from clm.collate import collate_blocks  # noqa: E402

from conftest import METRIC_KEYS, ROOT, run_clm  # noqa: E402


def test_collator_keeps_eos_labels_and_masks_only_padding():
    eos = 50256
    batch = collate_blocks([{"input_ids": [5, eos, 7, 8]},
                            {"input_ids": [eos, 1, 2, 3]}])
    assert batch["labels"].tolist() == batch["input_ids"].tolist()  # EOS stays a target
    padded = collate_blocks([{"input_ids": [5, eos, eos, eos], "attention_mask": [1, 1, 0, 0]}])
    assert padded["labels"].tolist() == [[5, eos, -100, -100]]


@pytest.fixture(scope="module")
def trained_dir(tiny_model_dir, tmp_path_factory):
    from conftest import eli5_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("pt-run")
    data = write_jsonl(tmp / "my_eli5.jsonl", eli5_rows(60))
    out = tmp / "out"
    proc = run_clm("--backend", "pt", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(data),
                   "--output_dir", str(out), "--num_train_epochs", "2", "--block_size", "64",
                   "--learning_rate", "2e-3", "--logging_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    return out


def test_outputs_of_a_training_run(trained_dir):
    results = json.loads((trained_dir / "all_results.json").read_text())
    assert METRIC_KEYS <= set(results)  # the design's keys and the rest, as the tf backend reports them
    assert results["world_size"] == 1 and results["backend"] == "pt"
    assert results["perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    assert results["eval_loss"] < results["eval_loss_before"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "loss_curve.png", "README.md"):
        assert (trained_dir / name).is_file(), name
    assert not list(trained_dir.glob("*.bin")) or {p.name for p in trained_dir.glob("*.bin")} == {
        "training_args.bin"}  # weights are safetensors only
    assert list((trained_dir / "runs").rglob("events.out.tfevents*")), "TensorBoard logs missing"
    assert not (ROOT / "runs").exists(), "TensorBoard logs written to the working directory"
    card = (trained_dir / "README.md").read_text()
    assert "## Hyperparameters" in card and "perplexity" in card and "my_eli5.jsonl" in card
    assert (trained_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_trained_model_reloads_and_generates(trained_dir):
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(trained_dir)
    assert model.generation_config.top_k == 50 and model.generation_config.do_sample
    out = pipeline("text-generation", model=str(trained_dir))("Why is the sky", max_new_tokens=5)
    assert out[0]["generated_text"].startswith("Why is the sky")


def test_generate_command_prints_prompt_and_continuation(trained_dir):
    proc = run_clm("generate", "--model_name_or_path", str(trained_dir), "--prompt", "Why do stars shine",
                   "--max_new_tokens", "8", "--seed", "1", "--backend", "pt")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Why do stars shine")


def test_evaluate_command_writes_eval_results(trained_dir, tmp_path):
    from conftest import eli5_rows, write_jsonl

    data = write_jsonl(tmp_path / "my_eli5.jsonl", eli5_rows(60))
    proc = run_clm("evaluate", "--backend", "pt", "--model_name_or_path", str(trained_dir), "--train_file",
                   str(data), "--block_size", "64", "--output_dir", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    trained = json.loads((trained_dir / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert results["perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    assert results["eval_accuracy"] == pytest.approx(trained["eval_accuracy"], abs=1e-6)  # run_clm's metric
    assert "accuracy" in proc.stdout


def test_library_call_equals_cli(tiny_model_dir, tmp_path):
    import clm
    from conftest import eli5_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(30))
    metrics = clm.train(clm.TrainConfig(backend="pt", model_name_or_path=str(tiny_model_dir),
                                        train_file=str(data), output_dir=str(tmp_path / "o"), max_steps=3,
                                        block_size=32, report_to="none"))
    assert metrics["train_steps"] == 3 and metrics["backend"] == "pt"
    assert json.loads((tmp_path / "o" / "all_results.json").read_text())["eval_loss"] == metrics["eval_loss"]


@pytest.mark.slow
@pytest.mark.latest_only  # the 4.57 Trainer path is covered by the shorter compat runs; this one takes minutes
def test_offline_default_learns(tmp_path):
    """`python -m clm --backend pt` with no other flag: perplexity after at most a third of before."""
    proc = run_clm("--backend", "pt", "--output_dir", str(tmp_path / "default"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "default" / "all_results.json").read_text())
    assert results["perplexity"] <= results["perplexity_before"] / 3


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
