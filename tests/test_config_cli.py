"""TrainConfig validation, presets, the CLI parser, config files, the backend registry, light imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import clm
from clm.backends import available_backends, get_backend, resolve_backend_name
from clm.cli import parse_config
from clm.config import TrainConfig
from clm.errors import BackendUnavailableError, ConfigError


def test_import_clm_loads_no_framework():
    code = ("import sys, clm; clm.TrainConfig(); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_names():
    for name in ("TrainConfig", "train", "evaluate", "generate", "load_tokenizer", "prepare_dataset",
                 "get_backend", "available_backends"):
        assert callable(getattr(clm, name))
    assert callable(clm.data.group_texts)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": 0}, "learning_rate must be positive"),
    ({"learning_rate": -1e-3}, "learning_rate must be positive"),
    ({"num_train_epochs": 0}, "num_train_epochs must be positive"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be positive"),
    ({"block_size": 0}, "block_size must be positive"),
    ({"test_size": 0.0}, "test_size must be between 0 and 1"),
    ({"test_size": 1.5}, "test_size must be between 0 and 1"),
    ({"dataset_name": "eli5", "train_file": "x.jsonl"}, "use one data source"),
    ({"fp16": True, "bf16": True}, "choose one precision"),
    ({"overwrite_output_dir": True, "resume_from_checkpoint": "c"}, "drop one"),
    ({"streaming": True}, "needs --max_steps"),
    ({"preset": "nope"}, "unknown preset 'nope'; choose one of: tiny, guide"),
])
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_learning_rate_default_depends_on_the_model():
    assert TrainConfig().effective_learning_rate == 1e-3  # built-in model from scratch
    assert TrainConfig(model_name_or_path="distilbert/distilgpt2").effective_learning_rate == 2e-5
    assert TrainConfig(learning_rate=3e-4).effective_learning_rate == 3e-4


def test_guide_preset_is_the_guides_recipe():
    c = TrainConfig.from_preset("guide", output_dir="o")
    assert (c.model_name_or_path, c.dataset_name, c.dataset_split) == ("distilbert/distilgpt2", "eli5_category",
                                                                       "train[:5000]")
    assert (c.learning_rate, c.weight_decay, c.num_train_epochs, c.block_size, c.test_size) == (
        2e-5, 0.01, 3.0, 128, 0.2)
    assert c.output_dir == "o"


def test_cli_flags_with_dash_aliases_and_preset_overrides():
    c = parse_config("train", ["--preset", "guide", "--learning-rate", "1e-4", "--no_join_with_eos",
                               "--backend", "pt"])
    assert c.learning_rate == 1e-4 and c.model_name_or_path == "distilbert/distilgpt2"
    assert c.join_with_eos is False and c.backend == "pt"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_then_flags(tmp_path, suffix):
    values = {"block_size": 64, "learning_rate": 5e-4, "output_dir": "from-file"}
    path = tmp_path / f"c{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else "\n".join(f"{k}: {v}" for k, v in values.items()))
    c = parse_config("train", ["--config", str(path), "--output_dir", "from-flag"])
    assert (c.block_size, c.learning_rate, c.output_dir) == (64, 5e-4, "from-flag")


def test_config_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"learning_rat": 1}')
    with pytest.raises(ConfigError, match="unknown settings: learning_rat"):
        parse_config("train", ["--config", str(path)])


def test_help_explains_each_flag():
    out = subprocess.run([sys.executable, "-m", "clm", "--help"], capture_output=True, text=True).stdout
    assert "--learning_rate" in out and "Peak AdamW learning rate" in out and "--preset" in out


def test_backend_selection_order(monkeypatch):
    assert resolve_backend_name("pytorch") == "pt"
    monkeypatch.setenv("CLM_BACKEND", "tf")
    assert resolve_backend_name(None) == "tf"
    assert resolve_backend_name("pt") == "pt"  # the flag wins over the environment
    monkeypatch.delenv("CLM_BACKEND")
    assert resolve_backend_name(None) == available_backends()[0]


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown backend 'jax'; choose one of: pt, tf"):
        get_backend("jax")


def test_missing_framework_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorflow", "torch") else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'clm\[tf\]'"):
        get_backend("tf")
    with pytest.raises(BackendUnavailableError, match="no backend installed"):
        resolve_backend_name(None)
