"""The Trainer's optimizer recipe in Keras: AdamW (decoupled weight decay, none on biases and LayerNorm),
global-norm gradient clipping, and its linear / cosine / constant learning-rate schedules with warmup."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from clm.backends.tf.runtime import keras, tf

if TYPE_CHECKING:
    from clm.config import TrainConfig


def warmup_steps(config: "TrainConfig", total_steps: int) -> int:
    """As TrainingArguments.get_warmup_steps: warmup_steps, else ceil(total * warmup_ratio)."""
    return config.warmup_steps or math.ceil(total_steps * config.warmup_ratio)


class TrainerSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """transformers.get_scheduler's lambdas: the rate at optimizer step ``s`` (0-based) is ``peak * f(s)``.
    'constant' ignores warmup, as the Trainer's 'constant' does ('constant_with_warmup' is another type)."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, kind: str = "linear"):
        self.peak, self.total_steps, self.warmup_steps, self.kind = peak, total_steps, warmup_steps, kind

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        if self.kind == "constant":
            return tf.fill([], tf.constant(self.peak, tf.float32))
        warm = step / float(max(1, self.warmup_steps))
        span = float(max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / span
            decay = tf.maximum(0.0, 0.5 * (1.0 + tf.cos(math.pi * progress)))
        else:
            decay = tf.maximum(0.0, (self.total_steps - step) / span)
        return self.peak * tf.where(step < self.warmup_steps, warm, decay)

    def get_config(self) -> dict[str, Any]:
        return dict(peak=self.peak, total_steps=self.total_steps, warmup_steps=self.warmup_steps, kind=self.kind)


# Trainer.get_decay_parameter_names' patterns, searched in the lower-cased PyTorch parameter name
TRAINER_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def no_decay_names(model: Any) -> list[str]:
    """Variables the Trainer keeps out of weight decay: biases, every LayerNorm variable, and every variable whose
    PyTorch name the Trainer's patterns match (Mistral's RMSNorm ``input_layernorm``, ``model.norm``).
    transformers' create_optimizer excludes the names "LayerNorm"/"layer_norm"/"bias", which misses TF GPT-2's
    LayerNorms (``ln_1/gamma``, ``ln_f/beta``), so the variables are listed here by their full names."""
    import re

    from transformers.modeling_tf_pytorch_utils import convert_tf_weight_name_to_pt_weight_name

    names = ["LayerNorm", "layer_norm", "bias"]
    for layer in model.submodules:
        if isinstance(layer, keras.layers.LayerNormalization):
            names += [v.name for v in layer.weights]
    for v in model.weights:
        pt_name = convert_tf_weight_name_to_pt_weight_name(v.name, tf_weight_shape=v.shape)[0].lower()
        if any(re.search(p, pt_name) for p in TRAINER_NO_DECAY):
            names.append(re.escape(v.name))
    return names


def make_optimizer(config: "TrainConfig", model: Any, total_steps: int) -> Any:
    from transformers import AdamWeightDecay

    schedule = TrainerSchedule(config.effective_learning_rate, total_steps, warmup_steps(config, total_steps),
                               config.lr_scheduler_type)
    return AdamWeightDecay(
        learning_rate=schedule, weight_decay_rate=config.weight_decay, beta_1=config.adam_beta1,
        beta_2=config.adam_beta2, epsilon=config.adam_epsilon,
        global_clipnorm=config.max_grad_norm if config.max_grad_norm > 0 else None,
        exclude_from_weight_decay=no_decay_names(model))
