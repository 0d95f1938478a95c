"""TrainConfig validation, presets, the CLI parser, config files, generate options, the backend registry, light
imports and the public names."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys

import pytest

import clm
from clm.backends import available_backends, get_backend, resolve_backend_name
from clm.cli import build_parser, parse_config, parse_generate
from clm.config import GENERATION_DEFAULTS, PRESETS, GenerateConfig, TrainConfig, field_choices
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


def test_public_names_stay_what_they_are_after_an_in_process_run(tiny_model_dir, eli5_file, tmp_path):
    """Importing a submodule sets it as an attribute of its package: one named like a public function (a
    ``clm/push.py``) would replace ``clm.push`` once a run imported it."""
    pytest.importorskip("torch")
    before = {name: getattr(clm, name) for name in clm.__all__}
    clm.train(TrainConfig(backend="pt", model_name_or_path=str(tiny_model_dir), train_file=str(eli5_file),
                          output_dir=str(tmp_path / "out"), block_size=32, per_device_train_batch_size=4,
                          max_steps=1, report_to="none", sample_max_new_tokens=0))
    for name, value in before.items():
        now = getattr(clm, name)
        assert now is value and callable(now) and not inspect.ismodule(now), name


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
    ({"lr_scheduler_type": "cos"}, "--lr_scheduler_type must be one of: linear, cosine, constant; got 'cos'"),
    ({"report_to": "wandb-ish"}, "--report_to 'wandb-ish' is not one of: tensorboard, wandb, mlflow"),
    ({"tf_strategy": "mirror"}, "--tf_strategy must be one of: auto, one_device, mirrored, multi_worker, tpu"),
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


def test_preset_never_overrides_a_value_given_even_when_it_equals_the_default():
    c = parse_config("train", ["--preset", "guide", "--output_dir", "clm-output", "--weight_decay", "0.01"])
    assert c.output_dir == "clm-output"  # the field's default, given: the preset's folder must not replace it
    assert (c.model_name_or_path, c.dataset_name, c.learning_rate) == ("distilbert/distilgpt2", "eli5_category",
                                                                       2e-5)


@pytest.mark.parametrize("source", [["--train_file", "mine.jsonl"], ["--dataset_name", "wikitext"]])
def test_a_data_source_given_replaces_the_presets(source):
    c = parse_config("train", ["--preset", "guide", *source])
    assert (c.train_file or c.dataset_name) == source[1]
    assert c.dataset_split == "train" and (c.dataset_name is None) == (source[0] == "--train_file")
    assert (c.model_name_or_path, c.learning_rate, c.output_dir) == ("distilbert/distilgpt2", 2e-5,
                                                                     "my_awesome_eli5_clm-model")


def test_library_preset_is_the_cli_preset():
    argv = ["--preset", "guide", "--output_dir", "clm-output", "--train_file", "mine.jsonl", "--block_size", "64"]
    kwargs = {"output_dir": "clm-output", "train_file": "mine.jsonl", "block_size": 64}
    cli = parse_config("train", argv)
    assert TrainConfig(preset="guide", **kwargs) == cli == TrainConfig.from_preset("guide", **kwargs)
    assert cli != TrainConfig(**kwargs)  # the preset did contribute (model, learning rate)


def test_a_copy_keeps_its_values_and_does_not_reapply_the_preset():
    c = TrainConfig(preset="guide", learning_rate=1e-4)
    copy = c.replace(output_dir="clm-output", dataset_name=None, train_file="mine.jsonl")
    assert (copy.output_dir, copy.learning_rate, copy.train_file, copy.dataset_name) == (
        "clm-output", 1e-4, "mine.jsonl", None)
    assert copy.replace(block_size=64).model_name_or_path == "distilbert/distilgpt2"


def test_config_file_values_are_given_values_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "guide", "output_dir": "clm-output", "train_file": "mine.jsonl"}))
    c = parse_config("train", ["--config", str(path)])
    assert (c.output_dir, c.train_file, c.dataset_name, c.learning_rate) == ("clm-output", "mine.jsonl", None,
                                                                             2e-5)


def test_prepare_writes_to_its_own_folder_unless_told():
    assert parse_config("prepare", ["--preset", "guide"]).output_dir == "clm-prepared"
    assert parse_config("prepare", ["--output_dir", "d"]).output_dir == "d"
    assert parse_config("train", []).output_dir == "clm-output"


@pytest.mark.compat  # HfArgumentParser must turn Literal into choices on transformers 4.57 too
def test_choice_fields_list_their_choices_in_help():
    assert field_choices(TrainConfig)["preset"] == tuple(PRESETS)
    text = build_parser(TrainConfig, "train").format_help()
    for field, choices in field_choices(TrainConfig).items():
        assert f"--{field} {{{','.join(choices)}}}" in text
    assert {"lr_scheduler_type", "eval_strategy", "tf_strategy", "preset"} <= set(field_choices(TrainConfig))


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


@pytest.mark.compat
def test_generate_prompts_repeat_or_follow_one_flag():
    options = parse_generate(["--model_name_or_path", "m", "--prompt", "a", "b", "--prompt", "c",
                              "--no_do_sample", "--top-k", "5"])
    assert (options.prompt, options.do_sample, options.top_k) == (["a", "b", "c"], False, 5)
    assert GenerateConfig("m", "one prompt").prompt == ["one prompt"]


def test_generate_defaults_are_written_once():
    from clm import defaults
    from clm.runner import generate

    options = parse_generate(["--model_name_or_path", "m", "--prompt", "hi"])
    assert options.sampling() == GENERATION_DEFAULTS == {"max_new_tokens": 100, "do_sample": True, "top_k": 50,
                                                         "top_p": 0.95}  # the guide's
    assert defaults.GENERATION_DEFAULTS is GENERATION_DEFAULTS  # what the trained model's generation_config gets
    params = inspect.signature(generate).parameters
    assert {name: params[name].default for name in GENERATION_DEFAULTS} == GENERATION_DEFAULTS


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "--max_new_tokens must be positive"),
    ({"top_p": 1.5}, "--top_p in (0, 1]"),
    ({"prompt": ["  "]}, "--prompt is empty"),
])
def test_invalid_generate_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerateConfig(**{"model_name_or_path": "m", "prompt": ["hi"], **kwargs})


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
