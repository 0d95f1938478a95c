"""Each backend end to end, as a user runs it: train through the CLI, then the files of the output dir, reloading
and generating, and the evaluate and generate commands on it; and the README's main job (the offline default)
learns. The CLI runs in this process (clm.cli.main) where no signal or launcher is involved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import METRIC_KEYS, ROOT, clm_main, eli5_rows, run_clm, write_jsonl

pytestmark = pytest.mark.compat  # the Trainer path must hold on transformers 4.57 too


def _need(backend: str) -> None:
    pytest.importorskip("torch")  # the test model is written by PyTorch
    if backend == "tf":
        pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_model_dir):
    """``clm --backend B`` on a file of one's own: 20 steps of 8 blocks of 64 tokens, once per backend."""
    runs = {}

    def get(backend: str):
        if backend not in runs:
            tmp = tmp_path_factory.mktemp(f"{backend}-run")
            data = write_jsonl(tmp / "my_eli5.jsonl", eli5_rows(60))
            out = tmp / "out"
            code, stdout = clm_main("--backend", backend, "--model_name_or_path", str(small_model_dir),
                                    "--train_file", str(data), "--output_dir", str(out), "--max_steps", "20",
                                    "--block_size", "64", "--learning_rate", "2e-3", "--logging_steps", "5")
            assert code == 0 and "perplexity" in stdout
            runs[backend] = out, data
        return runs[backend]
    return get


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_outputs_of_a_cli_run(backend, trained, small_model_dir):
    _need(backend)
    out, _ = trained(backend)
    results = json.loads((out / "all_results.json").read_text())
    assert METRIC_KEYS <= set(results)  # the design's keys and the rest, as both backends report them
    assert results["backend"] == backend and results["world_size"] == 1 and results["global_batch_size"] == 8
    assert results["train_steps"] == 20
    assert results["perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    assert results["eval_loss"] < results["eval_loss_before"]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "loss_curve.png", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.h5"))  # weights are safetensors only
    assert {p.name for p in out.glob("*.bin")} <= {"training_args.bin"}
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard logs missing"
    assert not (ROOT / "runs").exists(), "TensorBoard logs written to the working directory"
    card = (out / "README.md").read_text()
    assert "## Hyperparameters" in card and "perplexity" in card and "my_eli5.jsonl" in card
    generation = json.loads((out / "generation_config.json").read_text())
    eos = json.loads((small_model_dir / "config.json").read_text())["eos_token_id"]
    assert generation["top_k"] == 50 and generation["do_sample"] and generation["pad_token_id"] == eos


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_trained_model_reloads_in_transformers_and_generates(backend, trained):
    _need(backend)
    from transformers import AutoModelForCausalLM, pipeline

    out, _ = trained(backend)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.top_k == 50 and model.generation_config.do_sample
    text = pipeline("text-generation", model=str(out))("Why is the sky", max_new_tokens=5)
    assert text[0]["generated_text"].startswith("Why is the sky")


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_evaluate_and_generate_commands_on_a_run(backend, trained, tmp_path):
    _need(backend)
    out, data = trained(backend)
    code, stdout = clm_main("evaluate", "--backend", backend, "--model_name_or_path", str(out), "--train_file",
                            str(data), "--block_size", "64", "--output_dir", str(tmp_path / "eval"))
    assert code == 0 and "accuracy" in stdout
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    run = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(run["eval_loss"], rel=1e-5)
    assert results["perplexity"] == pytest.approx(np.exp(results["eval_loss"]))
    assert results["eval_accuracy"] == pytest.approx(run["eval_accuracy"], abs=1e-6)  # run_clm's metric
    code, stdout = clm_main("generate", "--backend", backend, "--model_name_or_path", str(out), "--prompt",
                            "Why do stars shine", "--max_new_tokens", "8", "--seed", "1")
    assert code == 0 and stdout.startswith("Why do stars shine")


@pytest.mark.slow  # on transformers 4.57 the Trainer path is covered by the shorter runs above:
@pytest.mark.parametrize("backend", [pytest.param("pt", marks=pytest.mark.latest_only), "tf"])
def test_offline_default_learns(backend, tmp_path):
    """`python -m clm --backend B` with no other flag (the README's main job): perplexity after at most a third
    of before."""
    _need(backend)
    proc = run_clm("--backend", backend, "--output_dir", str(tmp_path / "default"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "default" / "all_results.json").read_text())
    assert results["perplexity"] <= results["perplexity_before"] / 3
