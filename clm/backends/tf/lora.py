"""LoRA for the TF backend: the target layers (Dense, or GPT-2's Conv1D) wrapped in a Keras layer that adds
``dropout(x) @ A @ B * alpha / r``, with PEFT's initialisation (A Kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in)); B zero) and every other weight frozen. The adapter is written in PEFT's own format
(``clm.lora``); the merged model (W + scale * A @ B) is what ``weights.save_pretrained`` writes.

The wrapper replaces the layer's attribute on its parent, so ``tf.train.Checkpoint`` tracks A and B under the
same parent (resume restores them), and the base layer lives on as ``wrapper.base``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from clm import lora
from clm.backends.tf.runtime import keras, tf
from clm.errors import ConfigError

if TYPE_CHECKING:
    from clm.config import TrainConfig


class LoraLayer(keras.layers.Layer):
    """``base(x) + dropout(x) @ A @ B * scale``; A is (in, r), B (r, out): PEFT's matrices transposed."""

    def __init__(self, base: Any, module_path: str, r: int, alpha: float, dropout: float, **kwargs: Any):
        super().__init__(name=base.name, **kwargs)
        self.base, self.module_path, self.r, self.scale = base, module_path, r, lora.scaling(r, alpha)
        kernel = base.weights[0]
        fan_in, fan_out = kernel.shape
        scope = kernel.name.rsplit("/", 1)[0]  # the base layer's scope: .../attn/c_attn/lora_A:0
        with tf.name_scope(scope + "/"):
            bound = 1.0 / math.sqrt(fan_in)  # torch's kaiming_uniform_(a=sqrt(5)) on a (r, in) weight
            self.lora_A = self.add_weight("lora_A", shape=(fan_in, r), dtype=kernel.dtype,
                                          initializer=keras.initializers.RandomUniform(-bound, bound))
            self.lora_B = self.add_weight("lora_B", shape=(r, fan_out), dtype=kernel.dtype, initializer="zeros")
        self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None

    def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
        x = self.dropout(inputs, training=training) if self.dropout is not None else inputs
        update = tf.matmul(tf.matmul(x, tf.cast(self.lora_A, x.dtype)), tf.cast(self.lora_B, x.dtype))
        return self.base(inputs) + update * tf.cast(self.scale, x.dtype)

    def delta(self) -> np.ndarray:
        """The merged update in the base kernel's (in, out) layout."""
        return self.scale * (self.lora_A.numpy() @ self.lora_B.numpy())


def _linear_layers() -> tuple[type, ...]:
    from transformers.modeling_tf_utils import TFConv1D

    return keras.layers.Dense, TFConv1D


def _children(layer: Any) -> Iterator[tuple[Any, str, Any]]:
    """(parent, attribute, sublayer) for each sublayer held in an attribute, or in a list attribute."""
    for attr, value in list(vars(layer).items()):
        if attr.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            yield layer, attr, value
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, keras.layers.Layer):
                    yield layer, "", item  # a list element: searched, never replaced


def _walk(model: Any) -> Iterator[tuple[Any, str, Any]]:
    seen, stack = {id(model)}, [model]
    while stack:
        for parent, attr, child in _children(stack.pop()):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
                yield parent, attr, child


def module_path(layer: Any) -> str:
    """The PyTorch module name of a TF layer, from its kernel's variable name (``transformer.h.0.attn.c_attn``)."""
    from transformers.modeling_tf_pytorch_utils import convert_tf_weight_name_to_pt_weight_name

    kernel = layer.weights[0]
    name, _ = convert_tf_weight_name_to_pt_weight_name(kernel.name, tf_weight_shape=kernel.shape)
    return name.rsplit(".", 1)[0]


def resolve_targets(model: Any, targets: Optional[Sequence[str]]) -> list[str]:
    """``--lora_target_modules`` as given, else PEFT's default for the family; ``all-linear`` kept as is."""
    return list(targets) if targets else lora.default_target_modules(model.config.model_type)


def apply_lora(model: Any, r: int, alpha: float, dropout: float, targets: Sequence[str]) -> list[LoraLayer]:
    """Wrap the matching layers of a built model and freeze everything else; the wrappers, in model order."""
    linear = _linear_layers()
    found = []
    for parent, attr, child in _walk(model):
        if not attr or not isinstance(child, linear) or not child.built:
            continue
        path = module_path(child)
        if (list(targets) == [lora.ALL_LINEAR] and not path.endswith("lm_head")) or lora.matches(path, targets):
            found.append((parent, attr, child, path))
    if not found:
        raise ConfigError(f"--lora_target_modules {' '.join(targets)} matches no linear layer of this "
                          f"{model.config.model_type} model; its layers: {', '.join(_linear_names(model))}")
    wrappers = []
    for parent, attr, child, path in sorted(found, key=lambda f: f[3]):
        wrapper = LoraLayer(child, path, r, alpha, dropout)
        setattr(parent, attr, wrapper)  # Keras re-tracks the attribute: the wrapper in, the bare layer out
        wrappers.append(wrapper)
    _freeze_all_but_lora(model)
    return wrappers


def _linear_names(model: Any) -> list[str]:
    linear = _linear_layers()
    return sorted({module_path(c).rsplit(".", 1)[-1] for _, _, c in _walk(model) if isinstance(c, linear)})


def _freeze_all_but_lora(layer: Any) -> bool:
    """``trainable = False`` on every layer with no LoRA below it, as PEFT sets requires_grad=False on every base
    weight; a layer above LoRA layers that also owns weights (GPT-2's main layer holds ``wpe``) keeps its own
    weights out of the trainable list. Returns whether ``layer`` holds LoRA."""
    if isinstance(layer, LoraLayer):
        layer.base.trainable = False
        return True
    holds = [_freeze_all_but_lora(child) for child in layer._flatten_layers(include_self=False, recursive=False)]
    if not any(holds):
        layer.trainable = False
        return False
    own = list(layer._trainable_weights)
    if own:
        layer._trainable_weights = []
        layer._non_trainable_weights = list(layer._non_trainable_weights) + own
    return True


def lora_layers(model: Any) -> list[LoraLayer]:
    return sorted((c for _, _, c in _walk(model) if isinstance(c, LoraLayer)), key=lambda w: w.module_path)


def merged_deltas(model: Any) -> dict[Any, np.ndarray]:
    """Base kernel variable (by ``ref()``) -> its LoRA update, for saving the merged model."""
    return {w.base.weights[0].ref(): w.delta() for w in lora_layers(model)}


def lora_variable_refs(model: Any) -> set[Any]:
    return {v.ref() for w in lora_layers(model) for v in (w.lora_A, w.lora_B)}


def adapter_state_dict(model: Any) -> dict[str, np.ndarray]:
    """PEFT's key names and layouts: lora_A.weight (r, in), lora_B.weight (out, r)."""
    state = {}
    for w in lora_layers(model):
        state[lora.peft_key(w.module_path, "A")] = np.ascontiguousarray(w.lora_A.numpy().T)
        state[lora.peft_key(w.module_path, "B")] = np.ascontiguousarray(w.lora_B.numpy().T)
    return state


def save_adapter(model: Any, directory: str | Path, config: "TrainConfig") -> None:
    """``directory/adapter_config.json`` and ``adapter_model.safetensors``, in PEFT's format."""
    from safetensors.numpy import save_file
    from transformers.modeling_tf_utils import TFConv1D

    wrappers = lora_layers(model)
    targets = resolve_targets(model, config.lora_target_modules)
    if targets == [lora.ALL_LINEAR]:  # PEFT, too, saves the names all-linear resolved to
        targets = [w.module_path.rsplit(".", 1)[-1] for w in wrappers]
    directory = Path(directory)
    lora.write_adapter_config(directory, lora.adapter_config(
        base_model=config.model_name_or_path, r=config.lora_r, alpha=config.lora_alpha,
        dropout=config.lora_dropout, target_modules=targets,
        fan_in_fan_out=any(isinstance(w.base, TFConv1D) for w in wrappers)))
    save_file(adapter_state_dict(model), str(directory / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})


def apply_from_config(model: Any, config: "TrainConfig") -> list[LoraLayer]:
    """``--lora_r`` > 0: wrap the model's target layers (call inside the strategy scope, before compile)."""
    return apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                      resolve_targets(model, config.lora_target_modules))
