"""LoRA, framework-free: PEFT's default target modules per family, its module matching, its adapter file names,
key names and ``adapter_config.json``, so an adapter either backend writes is one ``PeftModel.from_pretrained``
loads.

PyTorch uses the ``peft`` library itself (``clm.backends.pt.lora``); TensorFlow wraps the same layers in a Keras
LoRA layer (``clm.backends.tf.lora``) and writes its adapter with the names and config below.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from clm.errors import ConfigError

ADAPTER_DIR = "adapter"  # output_dir/adapter/
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the families with a TF causal-LM class or a keras
# (KerasHub) one (the tf and keras backends read it without importing peft, which loads torch; tests/test_lora.py
# checks it against PEFT's own). PyTorch runs leave the default to PEFT itself, for every family it knows.
PEFT_DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
}


def default_target_modules(model_type: str) -> list[str]:
    """PEFT's default target modules for ``model_type``; one line naming the flag when PEFT has none."""
    if model_type not in PEFT_DEFAULT_TARGETS:
        raise ConfigError(f"PEFT has no default LoRA target modules for {model_type!r} models; name the layers "
                          f"with --lora_target_modules (e.g. q_proj v_proj, or {ALL_LINEAR})")
    return list(PEFT_DEFAULT_TARGETS[model_type])


def matches(module_path: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for a list of target names: the module's full path, or its last dotted components."""
    return module_path in targets or any(module_path.endswith(f".{t}") for t in targets)


def scaling(r: int, alpha: float) -> float:
    """PEFT's LoRA scale (without rsLoRA): the update is ``x @ A @ B * alpha / r``."""
    return alpha / r


def peft_key(module_path: str, matrix: str) -> str:
    """The key PEFT saves a LoRA matrix under: ``base_model.model.<module>.lora_A.weight`` (A is (r, in), B is
    (out, r), the layout of torch Linear weights)."""
    return f"base_model.model.{module_path}.lora_{matrix}.weight"


def adapter_config(*, base_model: Optional[str], r: int, alpha: float, dropout: float,
                   target_modules: Sequence[str], fan_in_fan_out: bool) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for a causal-LM LoRA (fields left out take PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(set(target_modules)),
        "fan_in_fan_out": fan_in_fan_out,  # GPT-2's Conv1D keeps weights as (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter_config(directory: str | Path, config: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
