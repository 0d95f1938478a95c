"""LoRA for the PyTorch backend, with the ``peft`` library as it is: ``get_peft_model`` on the loaded model, the
Trainer's own checkpoints of a PeftModel (adapter, optimizer, schedule) for resume, and at the end the adapter in
PEFT's format plus the merged model (``merge_and_unload``) that evaluate, generate and ``pipeline`` load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm import lora
from clm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from clm.config import TrainConfig


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: "PreTrainedModel", config: "TrainConfig") -> Any:
    """The model wrapped by PEFT: LoRA on ``--lora_target_modules`` (PEFT's default for the family if unset),
    every base weight frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("--lora_r needs the peft library; install it with: pip install 'clm[pt]' "
                          "(or pip install peft)") from exc
    targets = config.lora_target_modules or None
    if targets == [lora.ALL_LINEAR]:
        targets = lora.ALL_LINEAR  # PEFT takes the shorthand as a string
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # no default for the family, or targets matching nothing
        raise ConfigError(f"LoRA: {str(exc).splitlines()[0]} (set --lora_target_modules to the model's layer "
                          "names, e.g. q_proj v_proj, or all-linear)") from exc


def parameter_counts(model: Any) -> dict[str, int]:
    """Trainable and all parameters, a tied tensor once (``parameters()`` skips repeats), as PEFT's
    ``get_nb_trainable_parameters`` counts them."""
    params = list(model.parameters())
    return {"trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params)}


def save_adapter_and_merge(model: Any, directory: str, is_main_process: bool) -> "PreTrainedModel":
    """Write ``directory/adapter`` (PEFT's own files) and return the base model with the adapter merged in
    (in place: the run is over), for the caller to save as the full model."""
    if is_main_process:
        model.save_pretrained(str(Path(directory) / lora.ADAPTER_DIR))
    return model.merge_and_unload()
