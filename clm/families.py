"""Model families: which ones each backend can build, read from the model's config alone (no framework import).

PyTorch takes any ``AutoModelForCausalLM`` family; TensorFlow takes the families transformers 4.57 has a TF
causal-LM class for (``TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), and says which in one line otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from clm import hub
from clm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from clm.config import TrainConfig

BUILTIN_MODEL_TYPE = "gpt2"  # clm.defaults.tiny_gpt2_config
# In transformers' TF causal-LM mapping, but not trainable by clm: no loss from labels, or no working PyTorch side
TF_UNUSABLE = {"xlm": "its TF class computes no loss", "transfo-xl": "deprecated, and gone from transformers 5"}


def model_config(config: "TrainConfig") -> Optional["PretrainedConfig"]:
    """The model's config (None for the built-in model), with Hub/path errors as one line."""
    if config.uses_builtin_model:
        return None
    from transformers import AutoConfig

    with hub.translate_errors(config.model_name_or_path, "model"):
        return AutoConfig.from_pretrained(config.model_name_or_path, revision=config.model_revision,
                                          trust_remote_code=config.trust_remote_code)


def model_type(config: "TrainConfig") -> str:
    """``config.json``'s model_type ("gpt2", "opt", "mistral", ...)."""
    model = model_config(config)
    return BUILTIN_MODEL_TYPE if model is None else model.model_type


def tf_families() -> dict[str, str]:
    """model_type -> TF causal-LM class, as transformers (4.x; 5.x has no TF classes) maps them, less
    ``TF_UNUSABLE``."""
    try:
        from transformers.models.auto.modeling_tf_auto import TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return {}
    return {k: v for k, v in TF_MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if k not in TF_UNUSABLE}


def pt_families() -> dict[str, str]:
    """model_type -> PyTorch causal-LM class (``AutoModelForCausalLM``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_family(kind: str, model_name: Any, model_type: str) -> None:
    """One line when ``model_type`` has no causal-LM class for backend ``kind`` ('pt' or 'tf')."""
    if kind == "tf":
        supported = tf_families()
        if model_type in TF_UNUSABLE:
            raise ConfigError(f"model {model_name!r} is a {model_type!r} model, which the tf backend cannot train "
                              f"({TF_UNUSABLE[model_type]}); use --backend pt")
        if model_type not in supported:
            raise ConfigError(
                f"model {model_name!r} is a {model_type!r} model, which has no TensorFlow causal-LM class in "
                f"transformers; the tf backend supports: {', '.join(sorted(supported))}; or use --backend pt")
    elif model_type not in pt_families():
        raise ConfigError(f"model {model_name!r} is a {model_type!r} model, which AutoModelForCausalLM cannot "
                          "build (it has no causal-LM head); choose a causal language model")


def check_config_family(kind: str, config: "TrainConfig") -> None:
    """``check_family`` for ``config.model_name_or_path``; remote code brings its own classes, so it passes."""
    if config.uses_builtin_model or config.trust_remote_code:
        return
    check_family(kind, config.model_name_or_path, model_type(config))
