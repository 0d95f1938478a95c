"""The TensorFlow model: TFAutoModelForCausalLM from PyTorch safetensors (``weights``), a TF checkpoint or the
built-in config, with dropout drawn from generators a checkpoint can hold, and Keras mixed precision."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

from clm import hub
from clm.backends.tf.checkpoints import dropout_generators
from clm.backends.tf.runtime import keras
from clm.backends.tf.weights import load_pretrained
from clm.defaults import GENERATION_DEFAULTS, tiny_gpt2_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

__all__ = ["float32_scores", "load_model", "load_pretrained", "precision"]


@contextlib.contextmanager
def precision(config: "TrainConfig") -> Iterator[None]:
    """Keras mixed precision for --fp16/--bf16 while the model is built and compiled (float16 also wraps the
    optimizer in a LossScaleOptimizer at compile); variables stay float32, so saved weights are float32."""
    name = "mixed_float16" if config.fp16 else "mixed_bfloat16" if config.bf16 else None
    previous = keras.mixed_precision.global_policy()
    if name:
        keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_scores() -> Any:
    """A logits-processor list for ``generate`` that casts the next-token scores to float32 first. Under mixed
    precision the model's logits are bfloat16/float16, and generate's top-k/top-p warpers fail on them
    (``tf.where`` against their float32 filter value); PyTorch's generate samples from such logits as they are."""
    from transformers import TFLogitsProcessor, TFLogitsProcessorList

    from clm.backends.tf.runtime import tf

    class Float32Scores(TFLogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any, cur_len: int) -> Any:
            return tf.cast(scores, tf.float32)

    return TFLogitsProcessorList([Float32Scores()])


def load_model(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
    from transformers import TFAutoModelForCausalLM

    keras.utils.set_random_seed(config.seed)  # the built-in model's init and the dropout generators' seeds
    was_enabled = keras.backend.experimental.is_tf_random_generator_enabled()
    keras.backend.experimental.enable_tf_random_generator()  # dropout from generators a checkpoint can hold
    try:
        if config.uses_builtin_model:
            model = TFAutoModelForCausalLM.from_config(tiny_gpt2_config())
            model.build_in_name_scope()
        else:
            with hub.translate_errors(config.model_name_or_path, "model"):
                model = load_pretrained(config.model_name_or_path, config.model_revision,
                                        config.trust_remote_code)
        if config.lora_r:  # LoRA layers (their dropout included) before the generators are listed
            from clm.backends.tf.lora import apply_from_config

            apply_from_config(model, config)
        dropout_generators(model)  # seed them now, independent of anything drawn later
    finally:
        if not was_enabled:
            keras.backend.experimental.disable_tf_random_generator()
    # Saved with the model, so generate() and pipeline("text-generation") sample as the guide does.
    model.generation_config.update(**GENERATION_DEFAULTS, pad_token_id=tokenizer.pad_token_id)
    return model
