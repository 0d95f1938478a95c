"""``clm evaluate`` on a finished run: the rows it scores and what it says about them."""

from __future__ import annotations

import json
import logging

import pytest

from clm.cli import main

from conftest import eli5_rows, write_jsonl


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A tiny PyTorch run trained with --seed 0 (the split seed stays at its default)."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("evaluate")
    data = write_jsonl(tmp / "d.jsonl", eli5_rows(40))
    out = tmp / "run"
    flags = ["--train_file", str(data), "--block_size", "32"]
    assert main(["--backend", "pt", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                 "--seed", "0", "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none",
                 "--sample_max_new_tokens", "0", *flags]) == 0
    return out, flags


def test_evaluate_scores_the_runs_own_eval_split_whatever_seed_it_trained_with(run, caplog):
    out, flags = run
    with caplog.at_level(logging.INFO, logger="clm"):
        assert main(["evaluate", "--backend", "pt", "--model_name_or_path", str(out), "--output_dir", str(out),
                     *flags]) == 0
    trained = json.loads((out / "all_results.json").read_text())
    scored = json.loads((out / "eval_results.json").read_text())
    assert scored["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    split = "20% of the rows of local file `d.jsonl`, held out by train_test_split (test_size 0.2, split_seed 42)"
    assert scored["eval_split"] == split
    assert any(split in record.getMessage() for record in caplog.records)
