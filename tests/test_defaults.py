"""The offline default (packaged GPT-2 tokenizer, tiny config, bundled sample) and Hub/path loading errors."""

from __future__ import annotations

import json

import pytest

from clm import hub
from clm.defaults import (GENERATION_DEFAULTS, TINY_GPT2, gpt2_tokenizer, load_tokenizer, sample_data_path,
                          save_generation_config, tiny_gpt2_config)
from clm.errors import ClmError


def test_packaged_tokenizer_is_gpt2s():
    tok = gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Why is the sky blue?")["input_ids"] == [4162, 318, 262, 6766, 4171, 30]
    assert tok.eos_token_id == tok.pad_token_id == 50256 and len(tok) == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def test_tiny_config_is_small_and_overridable():
    config = tiny_gpt2_config(n_layer=2)
    assert config.n_layer == 2 and config.n_embd == TINY_GPT2["n_embd"] and config.vocab_size == 50257


def test_bundled_sample_exists_in_the_eli5_layout():
    first = json.loads(sample_data_path().read_text().splitlines()[0])
    assert isinstance(first["answers"]["text"], list) and first["answers"]["text"][0]


def test_tokenizer_without_pad_token_gets_eos_as_pad(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from clm.config import TrainConfig

    tok = gpt2_tokenizer()
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=tok.eos_token)
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(TrainConfig(model_name_or_path=str(tmp_path)))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_generation_config_always_holds_the_sampling_keys(tmp_path):
    from transformers import GenerationConfig

    save_generation_config(GenerationConfig(**GENERATION_DEFAULTS, pad_token_id=50256), tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    for key, value in GENERATION_DEFAULTS.items():
        assert saved[key] == value  # top_k=50 equals 4.x's default, which to_diff_dict would drop
    assert saved["pad_token_id"] == 50256


@pytest.mark.parametrize("name,is_path", [("gpt2", False), ("org/model", False), ("./model", True),
                                          ("/abs/model", True), ("a/b/c", True), ("~/m", True)])
def test_path_or_hub_id(name, is_path):
    assert hub.looks_like_path(name) is is_path


def test_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(ClmError, match="does not exist; check the path"):
        hub.check_local(str(tmp_path / "nope"), "model")
    with pytest.raises(ClmError, match="Hub is unreachable.*HF_HUB_OFFLINE=1"):
        with hub.translate_errors("org/model", "model"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    with pytest.raises(ClmError, match=r"could not load model from directory .*: bad config"):
        with hub.translate_errors(str(tmp_path), "model"):
            raise ValueError("bad config\nmore detail")
