"""clm.reporting: results JSON, loss plot, model card and TensorBoard folder (framework-free)."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from clm import reporting
from clm.config import TrainConfig

METRICS = {"backend": "pt", "eval_loss": 7.5, "eval_loss_before": 10.85, "perplexity": math.exp(7.5),
           "perplexity_before": math.exp(10.85), "train_loss": 8.1, "global_batch_size": 8, "world_size": 1}
HISTORY = [{"step": 0, "eval_loss": 10.85}, {"step": 10, "loss": 9.0}, {"step": 20, "loss": 8.0},
           {"step": 20, "eval_loss": 7.5}]


def test_perplexity_is_exp_of_the_loss_and_never_overflows():
    assert reporting.perplexity(math.log(50.0)) == pytest.approx(50.0)
    assert reporting.perplexity(1e6) == float("inf")
    assert reporting.perplexity(None) is None


def test_write_outputs_writes_results_plot_and_card(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path / "out"), train_file="my_eli5.jsonl", max_steps=20)
    reporting.write_outputs(config, METRICS, HISTORY)
    out = tmp_path / "out"
    assert json.loads((out / reporting.RESULTS_FILE).read_text()) == METRICS
    png = (out / reporting.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    card = (out / reporting.CARD_FILE).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-generation" and "base_model" not in front
    assert "local file `my_eli5.jsonl`" in card and "| max_steps | 20 |" in card and "| eval_loss | 7.5 |" in card
    assert "num_train_epochs" not in card  # max_steps overrides epochs, so the card does not show them
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [reporting.RESULTS_FILE, reporting.PLOT_FILE, reporting.CARD_FILE])  # no temporary files left


def test_card_names_a_hub_base_model_and_dataset(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), model_name_or_path="distilbert/distilgpt2",
                         dataset_name="eli5_category")
    front = yaml.safe_load(reporting.model_card(config, METRICS).split("---")[1])
    assert front["base_model"] == "distilbert/distilgpt2" and front["datasets"] == ["eli5_category"]


def test_card_records_lora_settings_only_for_lora_runs(tmp_path):
    full = reporting.model_card(TrainConfig(output_dir=str(tmp_path)), METRICS)
    lora = reporting.model_card(TrainConfig(output_dir=str(tmp_path), lora_r=4, lora_target_modules=["c_attn"]),
                                {**METRICS, "trainable_parameters": 1024})
    assert "lora_r" not in full
    for row in ("| lora_r | 4 |", "| lora_alpha | 16 |", "| lora_target_modules | c_attn |",
                "| trainable_parameters | 1024 |"):
        assert row in lora


def test_tensorboard_folder_is_under_output_dir_runs(tmp_path):
    folder = reporting.tensorboard_dir(tmp_path)
    assert os.path.dirname(folder) == os.path.join(tmp_path, "runs")


def test_eval_split_names_the_rows_scored(tmp_path):
    held_out = reporting.eval_split(TrainConfig(train_file="d.jsonl", test_size=0.25, split_seed=7, seed=0))
    assert held_out == ("25% of the rows of local file `d.jsonl`, held out by train_test_split (test_size 0.25, "
                        "split_seed 7)")
    assert reporting.eval_split(TrainConfig(validation_file="v.jsonl", max_eval_samples=5)) == (
        "the rows of --validation_file `v.jsonl`, the first 5 of them")
    card = reporting.model_card(TrainConfig(output_dir=str(tmp_path), split_seed=7), METRICS)
    assert "evaluated on 20% of the rows, held out by train_test_split (test_size 0.2, split_seed 7)" in card
