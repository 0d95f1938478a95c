"""Shared fixtures: no network, an isolated prepared-data cache, tiny data and models written per test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# all_results.json keys DESIGN.md names, and the rest that both backends report (clm.backends.base.train_metrics)
DESIGN_KEYS = {"train_loss", "eval_loss", "perplexity", "eval_loss_before", "perplexity_before",
               "train_runtime", "world_size"}
METRIC_KEYS = DESIGN_KEYS | {"train_steps", "epoch", "train_samples", "train_tokens_per_second",
                             "train_tokens_per_second_per_process", "eval_samples", "global_batch_size",
                             "resumed_from", "trainable_parameters", "total_parameters"}


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    """Session-wide, so module-scoped fixtures (which run before function-scoped ones) are covered too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("CLM_CACHE", str(tmp_path_factory.getbasetemp() / "clm-cache"))
        mp.delenv("CLM_BACKEND", raising=False)
        yield


def eli5_rows(n: int, layout: str = "eli5_category", words: int = 40) -> list[dict]:
    """Rows in an ELI5 layout with varied, deterministic text."""
    vocab = ("light energy atoms stars water cells heat pressure gravity waves electrons planets "
             "molecules sound ice carbon oxygen magnet orbit mass").split()
    rows = []
    for i in range(n):
        answers = [" ".join(vocab[(i * 7 + j * 3 + k) % len(vocab)] for k in range(words)) + "."
                   for j in range(2 + i % 2)]
        sub = {"a_id": [f"a{i}{j}" for j in range(len(answers))], "text": answers,
               "score": [5 - j for j in range(len(answers))]}
        if layout == "eli5_category":
            sub["text_urls"] = [[] for _ in answers]
        rows.append({"q_id": f"q{i}", "title": f"Question {i}?", "selftext": "", "answers": sub})
    return rows


def guide_group_texts(examples, block_size=128):
    """Verbatim from the Hugging Face causal language modeling guide."""
    concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's tokenizer from the packaged BPE files (the offline default)."""
    from clm.defaults import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture
def eli5_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "my_eli5.jsonl", eli5_rows(40))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A prepared-data cache for this test alone (cache reuse and invalidation are asserted)."""
    monkeypatch.setenv("CLM_CACHE", str(tmp_path / "cache"))


def save_tiny_gpt2(out: Path, **config_overrides) -> Path:
    """A tiny GPT-2 (random weights from seed 0, GPT-2 tokenizer) saved by PyTorch as safetensors."""
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    from clm.defaults import gpt2_tokenizer, tiny_gpt2_config

    torch.manual_seed(0)
    config = tiny_gpt2_config(**{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, **config_overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def run_clm(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m clm ARGS`` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "clm", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


# --------------------------------------------------------------------------------------------- test scope
# CI runs the suite twice: in .venv (transformers 5.x, PyTorch) everything runs and TensorFlow tests skip; in
# .venv-tf (transformers 4.57) only what that environment adds: tests marked `tf` (a backend param "tf" marks
# itself) and PyTorch tests marked `compat` that must also hold on transformers 4.x. Framework-free tests run
# once, and so do compat-module tests marked `latest_only`. CLM_TEST_SCOPE=tf selects that second set; unset,
# everything is collected.
def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "tf":
            item.add_marker(pytest.mark.tf)
    if os.environ.get("CLM_TEST_SCOPE") != "tf":
        return
    keep = [i for i in items if (i.get_closest_marker("tf") or i.get_closest_marker("compat"))
            and not i.get_closest_marker("latest_only")]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def recipe_args(model_dir: Path, data: Path, backend: str, out: Path, *extra: str) -> list[str]:
    """The 24-step run the resume and preemption tests stop and resume: a checkpoint every 4 steps, and no sample
    generations at each evaluation (these runs test training, and TF's eager generate is slow)."""
    return ["--backend", backend, "--model_name_or_path", str(model_dir), "--train_file", str(data),
            "--output_dir", str(out), "--block_size", "32", "--per_device_train_batch_size", "4",
            "--max_steps", "24", "--save_steps", "4", "--learning_rate", "1e-3", "--seed", "7",
            "--report_to", "none", "--logging_steps", "4", "--sample_max_new_tokens", "0", *extra]


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (for torchrun's master and TF_CONFIG workers)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
