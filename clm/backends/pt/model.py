"""The PyTorch model: AutoModelForCausalLM from the Hub, a directory or the built-in config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModelForCausalLM, PreTrainedModel, set_seed

from clm import hub
from clm.defaults import GENERATION_DEFAULTS, tiny_gpt2_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig


def load_model(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> PreTrainedModel:
    set_seed(config.seed)  # the built-in model's random init depends on it
    if config.uses_builtin_model:
        model = AutoModelForCausalLM.from_config(tiny_gpt2_config())
    else:
        with hub.translate_errors(config.model_name_or_path, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                config.model_name_or_path, revision=config.model_revision,
                trust_remote_code=config.trust_remote_code)
    # transformers picks the loss from the class name and finds none in e.g. GPT2LMHeadModel's, so it warns at the
    # first loss and falls back to the causal-LM loss: name that loss.
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    # Saved with the model, so pipeline("text-generation") samples as the guide does.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.update(**GENERATION_DEFAULTS, pad_token_id=tokenizer.pad_token_id)
    return model


def load_pretrained(path: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(path)
