"""LoRA on KerasHub models in PEFT's terms, so an adapter trained here is one PEFT loads onto the Hugging Face
checkpoint: one A (in, r) and one B (r, out) per Hugging Face linear layer, PEFT's initialisation (A
Kaiming-uniform, i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero), ``dropout(x) @ A @ B * alpha / r`` added to the layer's
output, every other weight frozen; the same trainable-parameter count as PEFT for the same targets.

KerasHub's own ``enable_lora`` does not fit: it factors each EinsumDense kernel per head, trains no dropout
branch and fixes alpha = r. KerasHub keeps GPT-2's fused ``c_attn`` as three layers (query, key, value): they
share one adapter, B split by columns, with one dropout draw, as PEFT's one ``c_attn`` adapter has.

Each target layer is replaced on its parent by ``LoraLinear`` (the base layer inside, frozen); ``merged`` adds
the updates into the base kernels for KerasHub's Hugging Face export (the merged model is output_dir) and takes
them out again; ``save_adapter`` writes output_dir/adapter/ with ``clm.lora``'s names and config.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from clm import lora
from clm.errors import ConfigError

if TYPE_CHECKING:
    from clm.config import TrainConfig

_LLAMA_LIKE = {  # Hugging Face module under model.layers.<i> -> the KerasHub layer(s) under the decoder layer
    "self_attn.q_proj": ["_self_attention_layer._query_dense"],
    "self_attn.k_proj": ["_self_attention_layer._key_dense"],
    "self_attn.v_proj": ["_self_attention_layer._value_dense"],
    "self_attn.o_proj": ["_self_attention_layer._output_dense"],
    "mlp.gate_proj": ["_feedforward_gate_dense"],
    "mlp.up_proj": ["_feedforward_intermediate_dense"],
    "mlp.down_proj": ["_feedforward_output_dense"],
}
# family -> (the Hugging Face path of decoder layer i, its linear layers)
LINEAR_LAYERS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "gpt2": ("transformer.h.{i}", {
        "attn.c_attn": ["_self_attention_layer._query_dense", "_self_attention_layer._key_dense",
                        "_self_attention_layer._value_dense"],
        "attn.c_proj": ["_self_attention_layer._output_dense"],
        "mlp.c_fc": ["_feedforward_intermediate_dense"],
        "mlp.c_proj": ["_feedforward_output_dense"]}),
    "llama": ("model.layers.{i}", _LLAMA_LIKE),
    "mistral": ("model.layers.{i}", _LLAMA_LIKE),
    "qwen2": ("model.layers.{i}", _LLAMA_LIKE),
    "gemma": ("model.layers.{i}", {
        "self_attn.q_proj": ["attention.query_dense"], "self_attn.k_proj": ["attention.key_dense"],
        "self_attn.v_proj": ["attention.value_dense"], "self_attn.o_proj": ["attention.output_dense"],
        "mlp.gate_proj": ["gating_ffw"], "mlp.up_proj": ["gating_ffw_2"], "mlp.down_proj": ["ffw_linear"]}),
}
BACKBONE_FAMILIES = {"GPT2Backbone": "gpt2", "LlamaBackbone": "llama", "Llama3Backbone": "llama",
                     "MistralBackbone": "mistral", "QwenBackbone": "qwen2", "GemmaBackbone": "gemma"}


def family_of(backbone: Any) -> str:
    for cls in type(backbone).__mro__:
        if cls.__name__ in BACKBONE_FAMILIES:
            return BACKBONE_FAMILIES[cls.__name__]
    raise ConfigError(f"--lora_r on the keras backend covers {', '.join(LINEAR_LAYERS)} models, not "
                      f"{type(backbone).__name__}; use --backend pt")


def targets(causal_lm: Any, config: "TrainConfig") -> list[str]:
    """``--lora_target_modules`` as given, else PEFT's default for the family."""
    return list(config.lora_target_modules or lora.default_target_modules(family_of(causal_lm.backbone)))


def _geometry(layer: Any) -> tuple[list[int], list[int], list[int]]:
    """(input dims, output dims, kernel axis order) of a Dense or EinsumDense kernel: the kernel's axes as
    [input axes in the input's order] + [output axes in the output's order], which is how a Hugging Face
    (out, in) weight flattens (head-major), permuted into the kernel's own order."""
    equation = getattr(layer, "equation", None) or "ai,io->ao"  # Dense: kernel (in, out)
    inputs, rest = equation.split(",")
    kernel, outputs = rest.split("->")
    shape = dict(zip(kernel, layer.kernel.shape))
    ins, outs = [c for c in inputs if c in kernel], [c for c in outputs if c in kernel]
    order = ins + outs
    return [shape[c] for c in ins], [shape[c] for c in outs], [order.index(c) for c in kernel]


def build_layers(keras: Any) -> tuple[type, type]:
    """The two Keras layer classes (defined once Keras is imported, on whichever framework)."""
    ops = keras.ops

    class LoraAdapter(keras.layers.Layer):
        """PEFT's lora_A / lora_B of one Hugging Face linear layer, shared by the KerasHub layers that hold it."""

        def __init__(self, module_path: str, fan_in: int, fan_out: int, r: int, alpha: float, dropout: float,
                     parts: int, **kwargs: Any) -> None:
            super().__init__(name=module_path.replace(".", "_") + "_lora", **kwargs)
            self.module_path, self.scale, self.parts = module_path, lora.scaling(r, alpha), parts
            bound = 1.0 / math.sqrt(fan_in)  # torch's kaiming_uniform_(a=sqrt(5)) on an (r, in) weight
            self.lora_A = self.add_weight(name="lora_A", shape=(fan_in, r),
                                          initializer=keras.initializers.RandomUniform(-bound, bound))
            self.lora_B = self.add_weight(name="lora_B", shape=(r, fan_out), initializer="zeros")
            self.dropout = keras.layers.Dropout(dropout) if dropout > 0 else None
            object.__setattr__(self, "_held", None)  # x @ A of the part called first, for the others (no tracking)
            self.built = True

        def down(self, x: Any, in_dims: int, part: int, training: Any) -> Any:
            """``dropout(x) @ A`` over x's last ``in_dims`` axes. The layers of one fused matrix are called in
            order on the same input (query, key, value): the first computes it, the others reuse it."""
            if part > 0 and self._held is not None:
                held = self._held
                if part == self.parts - 1:
                    object.__setattr__(self, "_held", None)
                return held
            flat = x if in_dims == 1 else ops.reshape(x, (*ops.shape(x)[:-in_dims], self.lora_A.shape[0]))
            if self.dropout is not None:
                flat = self.dropout(flat, training=training)
            h = ops.matmul(flat, ops.cast(self.lora_A, flat.dtype))
            if self.parts > 1:
                object.__setattr__(self, "_held", h)
            return h

    class LoraLinear(keras.layers.Layer):
        """``base(x) + dropout(x) @ A @ B[:, columns] * scale``, shaped as the base layer's output."""

        def __init__(self, base: Any, adapter: Any, part: int, columns: tuple[int, int], **kwargs: Any) -> None:
            super().__init__(name=base.name, dtype=base.dtype_policy, **kwargs)
            self.base, self.adapter, self.part, self.columns = base, adapter, part, columns
            self.in_dims, self.out_dims, self.perm = _geometry(base)
            self.built = True

        def call(self, inputs: Any, training: Optional[bool] = None) -> Any:
            y = self.base(inputs)
            h = self.adapter.down(inputs, len(self.in_dims), self.part, training)
            lo, hi = self.columns
            up = ops.matmul(h, ops.cast(self.adapter.lora_B[:, lo:hi], h.dtype)) * self.adapter.scale
            return y + ops.cast(ops.reshape(up, ops.shape(y)), y.dtype)

        @property
        def kernel(self) -> Any:  # KerasHub's export reads .kernel / .bias of the layers it knows
            return self.base.kernel

        @property
        def bias(self) -> Any:
            return self.base.bias

        def delta(self) -> np.ndarray:
            """The update in the base kernel's layout."""
            a = keras.ops.convert_to_numpy(self.adapter.lora_A)
            b = keras.ops.convert_to_numpy(self.adapter.lora_B)[:, self.columns[0]:self.columns[1]]
            return (self.adapter.scale * (a @ b)).reshape(self.in_dims + self.out_dims).transpose(self.perm)

    return LoraAdapter, LoraLinear


def _resolve(root: Any, path: str) -> tuple[Any, str, Any]:
    *parents, attr = path.split(".")
    for name in parents:
        root = getattr(root, name)
    return root, attr, getattr(root, attr)


def linear_layers(backbone: Any) -> Iterator[tuple[str, list[tuple[Any, str, Any]]]]:
    """(Hugging Face module path, [(parent, attribute, Keras layer)]) for every linear layer of the decoder."""
    prefix, table = LINEAR_LAYERS[family_of(backbone)]
    for i, layer in enumerate(backbone.transformer_layers):
        for name, paths in table.items():
            yield f"{prefix.format(i=i)}.{name}", [_resolve(layer, path) for path in paths]


def apply_lora(keras: Any, causal_lm: Any, r: int, alpha: float, dropout: float,
               targets: Sequence[str]) -> list[Any]:
    """Wrap the target layers of a built KerasHub CausalLM and freeze every other weight; the adapters."""
    LoraAdapter, LoraLinear = build_layers(keras)
    backbone = causal_lm.backbone
    every = targets == [lora.ALL_LINEAR]
    found = [(path, held) for path, held in linear_layers(backbone) if every or lora.matches(path, targets)]
    if not found:
        names = sorted({path.rsplit(".", 1)[-1] for path, _ in linear_layers(backbone)})
        raise ConfigError(f"--lora_target_modules {' '.join(targets)} matches no linear layer of this "
                          f"{family_of(backbone)} model; its layers: {', '.join(names)}")
    adapters = []
    for path, held in found:
        geometry = [_geometry(layer) for _, _, layer in held]
        fan_in = math.prod(geometry[0][0])
        widths = [math.prod(out) for _, out, _ in geometry]
        adapter = LoraAdapter(path, fan_in, sum(widths), r, alpha, dropout, len(held))
        start = 0
        for part, ((parent, attr, layer), width) in enumerate(zip(held, widths)):
            wrapper = LoraLinear(layer, adapter, part, (start, start + width))
            start += width
            parent._tracker.unlock()  # a built layer's state is locked; the wrapper replaces one sublayer
            setattr(parent, attr, wrapper)
            parent._tracker.lock()
        adapters.append(adapter)
    lora_variables = {id(v) for a in adapters for v in (a.lora_A, a.lora_B)}
    for variable in causal_lm.weights:  # PEFT: requires_grad=False on every base weight
        if id(variable) not in lora_variables:
            variable.trainable = False
    return adapters


def apply_from_config(keras: Any, causal_lm: Any, config: "TrainConfig") -> list[Any]:
    return apply_lora(keras, causal_lm, config.lora_r, config.lora_alpha, config.lora_dropout,
                      targets(causal_lm, config))


def wrappers(causal_lm: Any) -> list[Any]:
    return [layer for layer in causal_lm._flatten_layers(include_self=False, recursive=True)
            if hasattr(layer, "adapter") and hasattr(layer, "delta")]


def adapters(causal_lm: Any) -> list[Any]:
    seen: dict[str, Any] = {}
    for wrapper in wrappers(causal_lm):
        seen.setdefault(wrapper.adapter.module_path, wrapper.adapter)
    return [seen[path] for path in sorted(seen)]


@contextlib.contextmanager
def merged(causal_lm: Any) -> Iterator[None]:
    """The base kernels with the LoRA updates added (for export), restored exactly afterwards."""
    from keras import ops

    saved = []
    try:
        for wrapper in wrappers(causal_lm):
            kernel = wrapper.base.kernel
            before = ops.convert_to_numpy(kernel)
            saved.append((kernel, before))
            kernel.assign((before + wrapper.delta()).astype(before.dtype))
        yield
    finally:
        for kernel, before in saved:
            kernel.assign(before)


def save_adapter(causal_lm: Any, directory: str | Path, config: "TrainConfig") -> None:
    """``directory/adapter_config.json`` and ``adapter_model.safetensors`` in PEFT's format: lora_A.weight
    (r, in), lora_B.weight (out, r), under PEFT's key names."""
    from keras import ops
    from safetensors.numpy import save_file

    held = adapters(causal_lm)
    names = targets(causal_lm, config)
    if names == [lora.ALL_LINEAR]:  # PEFT, too, saves the names all-linear resolved to
        names = [a.module_path.rsplit(".", 1)[-1] for a in held]
    state = {}
    for a in held:
        state[lora.peft_key(a.module_path, "A")] = np.ascontiguousarray(ops.convert_to_numpy(a.lora_A).T)
        state[lora.peft_key(a.module_path, "B")] = np.ascontiguousarray(ops.convert_to_numpy(a.lora_B).T)
    directory = Path(directory)
    lora.write_adapter_config(directory, lora.adapter_config(
        base_model=config.model_name_or_path, r=config.lora_r, alpha=config.lora_alpha,
        dropout=config.lora_dropout, target_modules=names,
        fan_in_fan_out=family_of(causal_lm.backbone) == "gpt2"))
    save_file(state, str(directory / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
