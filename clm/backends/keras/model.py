"""KerasHub causal LMs from Hugging Face folders (or Hub ids) and the built-in tiny GPT-2, and back to Hugging Face
format. The model takes the token ids of clm's data layer (Hugging Face tokenizers): no KerasHub preprocessor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

# Families KerasHub 0.32 both converts from and exports to Hugging Face format, with their transformers class
# (KerasHub's export leaves config.json's "architectures" out, and its own loader needs it).
FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}


# KerasHub's GPT-2 layers fix their LayerNorm epsilon at GPT-2's 1e-5; its Llama and Gemma converters leave
# rms_norm_eps out (the backbone's default, 1e-6, whatever the checkpoint says): clm passes it in.
GPT2_EPSILON = 1e-5
EPSILON_NOT_CONVERTED = ("llama", "gemma")


def check_family(model_name: Any, hf_config: Any) -> None:
    """One line for a family KerasHub cannot read and write back, or a setting its layers cannot take."""
    model_type = hf_config.model_type
    if model_type not in FAMILIES:
        raise ConfigError(f"model {model_name!r} is a {model_type!r} model; the keras backend (KerasHub) reads and "
                          f"writes Hugging Face checkpoints of: {', '.join(FAMILIES)}; or use --backend pt")
    epsilon = getattr(hf_config, "layer_norm_epsilon", GPT2_EPSILON)
    if model_type == "gpt2" and abs(epsilon - GPT2_EPSILON) > 1e-12:
        raise ConfigError(f"model {model_name!r} has layer_norm_epsilon {epsilon}; KerasHub's GPT-2 layers use "
                          f"{GPT2_EPSILON} only; use --backend pt or tf")


def preset(name: str) -> str:
    """A local folder as it is; a Hub id as KerasHub's hf:// preset."""
    return name if Path(name).exists() else f"hf://{name}"


def load_model(keras_hub: Any, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
    """The CausalLM to train: the pretrained checkpoint, or clm's built-in tiny GPT-2 (random weights)."""
    if config.uses_builtin_model:
        from clm.defaults import TINY_GPT2

        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=TINY_GPT2["vocab_size"], num_layers=TINY_GPT2["n_layer"],
            num_heads=TINY_GPT2["n_head"], hidden_dim=TINY_GPT2["n_embd"], intermediate_dim=4 * TINY_GPT2["n_embd"],
            max_sequence_length=TINY_GPT2["n_positions"], dropout=0.1)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    return load_pretrained(keras_hub, config.model_name_or_path)


def load_pretrained(keras_hub: Any, path: str) -> Any:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    if hf_config.model_type in EPSILON_NOT_CONVERTED:  # the checkpoint's epsilon, not KerasHub's default
        backbone = keras_hub.models.Backbone.from_preset(preset(path), layer_norm_epsilon=hf_config.rms_norm_eps)
        return keras_hub.models.CausalLM.from_preset(preset(path), backbone=backbone, preprocessor=None)
    return keras_hub.models.CausalLM.from_preset(preset(path), preprocessor=None)


def save_pretrained(model: Any, tokenizer: "PreTrainedTokenizerBase", directory: str) -> None:
    """Hugging Face format: KerasHub's export (config.json, model.safetensors), then clm's tokenizer and
    generation config, and the special token ids of the tokenizer the model was trained with."""
    from transformers import GenerationConfig

    from clm.defaults import GENERATION_DEFAULTS, save_generation_config
    from clm.tokenizer import save_tokenizer

    from clm.backends.keras.lora import merged

    with merged(model):  # LoRA's updates in the base kernels while KerasHub writes them
        model.export_to_transformers(directory)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):  # KerasHub's, if any
        (Path(directory) / name).unlink(missing_ok=True)
    save_tokenizer(tokenizer, directory)
    path = Path(directory) / "config.json"
    values = json.loads(path.read_text())
    values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    values.setdefault("architectures", [FAMILIES[values["model_type"]]])
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    save_generation_config(GenerationConfig(**GENERATION_DEFAULTS, pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id), directory)


# Families whose packed rows clm can keep apart: GPT-2 (absolute positions, gathered per example) and the
# rotary-position decoders (relative: a row's offsets change nothing within an example).
PACKED_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def packed_model(keras: Any, keras_hub: Any, causal_lm: Any) -> Any:
    """A Keras model over ``causal_lm``'s backbone (the same weights) for packed rows (--packing bfd/none): each
    decoder layer gets a same-example mask (KerasHub's layers AND it with the causal one) built from the
    rows' ``position_ids``, and GPT-2 its position embeddings at those positions. KerasHub's backbones take no
    position ids, hence the layers are called here one by one."""
    ops = keras.ops
    backbone = causal_lm.backbone
    absolute = isinstance(backbone, keras_hub.models.GPT2Backbone)
    rotary = tuple(getattr(keras_hub.models, name) for name in ("LlamaBackbone", "Llama3Backbone", "MistralBackbone",
                                                                "QwenBackbone") if hasattr(keras_hub.models, name))
    if not (absolute or isinstance(backbone, rotary)):
        raise ConfigError(f"packed examples (--packing bfd/none) on the keras backend are kept apart for "
                          f"{', '.join(PACKED_FAMILIES)}, not {type(backbone).__name__}; use --packing wrapped")

    class PackedCausalLM(keras.Model):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.backbone = backbone

        def call(self, inputs: dict[str, Any], training: bool = False) -> Any:
            positions = ops.cast(inputs["position_ids"], "int32")
            example = ops.cumsum(ops.cast(ops.equal(positions, 0), "int32"), axis=1)
            same = ops.cast(ops.equal(example[:, :, None], example[:, None, :]), "int32")
            x = backbone.token_embedding(inputs["token_ids"])
            if absolute:
                table = backbone.position_embedding.position_embeddings
                x = backbone.embeddings_add((x, ops.take(table, positions, axis=0)))
                x = backbone.embeddings_dropout(x, training=training)
            for layer in backbone.transformer_layers:
                x = layer(x, decoder_padding_mask=inputs["padding_mask"], decoder_attention_mask=same,
                          training=training)
            return backbone.token_embedding(backbone.layer_norm(x), reverse=True)

    return PackedCausalLM()
