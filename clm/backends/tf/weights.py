"""Weights either framework reads: PyTorch-layout safetensors written and read with NumPy, no torch needed.

Saving maps each TF variable to its PyTorch name with transformers' own converter
(``tfgpt2lm_head_model/transformer/h_._0/attn/c_attn/bias:0`` -> ``transformer.h.0.attn.c_attn.bias``).
Loading goes around ``TFAutoModelForCausalLM.from_pretrained`` for safetensors: with safetensors >= 0.8 its
PyTorch-safetensors path fails ("'builtins.safe_open' object is not iterable"), so the state dict is read here
and handed to transformers' ``load_pytorch_state_dict_in_tf2_model``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from clm.backends.tf.runtime import keras, tf
from clm.defaults import save_generation_config
from clm.errors import ClmError
from clm.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


# --------------------------------------------------------------------------------------------- loading
def _safetensors_files(name: str, revision: Optional[str]) -> list[str]:
    """Local paths of the model's safetensors (one file or the shards of an index); [] if it has none."""
    from transformers.utils import cached_file

    kw: dict[str, Any] = dict(revision=revision, _raise_exceptions_for_missing_entries=False)
    single = cached_file(name, WEIGHTS_NAME, **kw)
    if single:
        return [single]
    index = cached_file(name, INDEX_NAME, **kw)
    if not index:
        return []
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    return [cached_file(name, shard, revision=revision) for shard in shards]


def _read_state_dict(files: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    state = {}
    for path in files:
        with safe_open(path, framework="tf") as f:  # "tf", not "np": NumPy has no bfloat16
            for key in f.keys():
                tensor = f.get_tensor(key)
                state[key] = (tf.cast(tensor, tf.float32) if tensor.dtype.is_floating else tensor).numpy()
    return state


def load_pretrained(name: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """A TF causal LM from a directory or Hub id holding PyTorch safetensors (either backend's output, or a
    Hub model), else from its TF weights (tf_model.h5)."""
    from transformers import AutoConfig, TFAutoModelForCausalLM
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

    files = _safetensors_files(name, revision)
    if not files:
        return TFAutoModelForCausalLM.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                                      use_safetensors=False)
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if not trust_remote_code:
        from clm.families import check_family

        check_family("tf", name, config.model_type)
    model = TFAutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.build_in_name_scope()
    tie_output_embeddings(model)
    model, info = load_pytorch_state_dict_in_tf2_model(
        model, _read_state_dict(files), tf_inputs=False, allow_missing_keys=True, output_loading_info=True,
        skip_logger_warnings=True, tf_to_pt_weight_rename=getattr(model, "tf_to_pt_weight_rename", None))
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = (info["missing_keys"] + [k for k, *_ in info["mismatched_keys"]])[:5]
        raise ClmError(f"the weights in {name!r} do not fit a {type(model).__name__}: {', '.join(missing)}")
    try:  # the saved sampling settings (and pad token), as from_pretrained would load them
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(name, revision=revision)
    except OSError:
        pass
    return model


class TiedOutput(keras.layers.Layer):
    """The output projection as the transposed input embedding, as PyTorch ties them (``tie_word_embeddings``)."""

    def __init__(self, embedding: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, hidden: Any) -> Any:
        weight = self.embedding.weights[0]  # (vocab, hidden), like torch's embedding weight
        return tf.matmul(hidden, tf.cast(weight, hidden.dtype), transpose_b=True)


def tie_output_embeddings(model: Any) -> None:
    """Some TF classes (XGLM, Mistral) keep ``lm_head`` as its own Dense layer even when the config ties it to
    the input embedding; PyTorch's safetensors then hold no ``lm_head.weight``, and training would untie the two.
    Replace that layer by the tied projection, so TF trains, counts and saves the weights PyTorch does."""
    head = getattr(model, "lm_head", None)
    if (not getattr(model.config, "tie_word_embeddings", False) or not isinstance(head, keras.layers.Dense)
            or head.use_bias):
        return
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # TF Mistral's main layer does not implement it
        embedding = getattr(getattr(model, model.base_model_prefix, None), "embed_tokens", None)
    if embedding is None or tuple(embedding.weights[0].shape) != tuple(reversed(head.kernel.shape)):
        return
    model.lm_head = TiedOutput(embedding, name="lm_head")


# --------------------------------------------------------------------------------------------- saving
def pt_state_dict(model: Any) -> dict[str, np.ndarray]:
    """The model's variables under their PyTorch names and shapes (tied weights appear once, as in PyTorch's
    own safetensors), LoRA updates merged into their base weights."""
    from transformers.modeling_tf_pytorch_utils import TransposeType, convert_tf_weight_name_to_pt_weight_name

    from clm.backends.tf.lora import lora_variable_refs, merged_deltas

    deltas, adapter = merged_deltas(model), lora_variable_refs(model)  # LoRA: saved merged into its base layers
    state: dict[str, np.ndarray] = {}
    for var in model.weights:
        if var.ref() in adapter:
            continue
        name, transpose = convert_tf_weight_name_to_pt_weight_name(var.name, tf_weight_shape=var.shape)
        array = var.numpy()
        if var.ref() in deltas:
            array = array + deltas[var.ref()]
        if transpose == TransposeType.SIMPLE:  # Keras kernels are (in, out); torch Linear is (out, in)
            array = array.T
        elif transpose != TransposeType.NO:
            raise ClmError(f"cannot convert {var.name} ({transpose}) to the PyTorch layout")
        if name.endswith("bias") and array.ndim == 2 and array.shape[0] == 1:
            array = array[0]  # TF Conv1D keeps biases as (1, n), PyTorch as (n,)
        if name in state:
            raise ClmError(f"two TF variables map to the PyTorch name {name}")
        state[name] = np.ascontiguousarray(array)
    return state


def save_pretrained(model: Any, tokenizer: Optional["PreTrainedTokenizerBase"], directory: str | os.PathLike) -> None:
    """model.safetensors (PyTorch layout, format "pt"), config.json, generation_config.json and the tokenizer:
    what ``AutoModelForCausalLM.from_pretrained`` (transformers 4.x or 5.x) and this backend both load."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(pt_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("TF")]  # GPT2LMHeadModel, as PyTorch saves it
    config.save_pretrained(directory)
    if model.generation_config is not None:
        save_generation_config(model.generation_config, directory)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)

