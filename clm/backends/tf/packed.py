"""Packed rows (``--packing bfd``/``none``) on transformers' TensorFlow models: each token attends only to earlier
tokens of its own example, and positions restart at each example.

The rows carry ``position_ids`` restarting at 0; ``enable_packed_attention`` wraps the model's main layer so a
call with position ids (and no KV cache) derives a same-example mask (batch, L, L) from them, ANDed with a 2D
padding mask if one comes; the model still adds its causal mask. transformers' TF classes only take a 2D mask,
so the mask is let through where each family would refuse it:

- GPT-2 and GPT-J reshape the mask to (batch, 1, 1, L): it goes in flattened to (batch, L * L) and their
  attention's ``_attn`` reshapes it back (an ordinary (batch, 1, 1, L) mask is left as it is);
- OPT, Mistral and XGLM expand it with a module-level ``_expand_mask``, which is given a rank-3 branch; OPT
  also takes its positions from the mask (a cumulative sum), so its position embedding counts within the
  example instead.

Checked per family against each example run alone, eager and XLA, forward and gradients (logits 1e-5), and
``save_pretrained`` writes the same weights. A call without position ids, or with a 2D mask alone, is unchanged.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from clm.backends.tf.runtime import tf
from clm.errors import ConfigError

FLAT_MASK = {"gpt2": "TFAttention", "gptj": "TFGPTJAttention"}  # main layer reshapes the mask to (b, 1, 1, L)
EXPANDED_MASK = ("opt", "mistral", "xglm")  # the mask goes through the module's _expand_mask
FAMILIES = (*FLAT_MASK, *EXPANDED_MASK)


def check_packed_family(model_type: str) -> None:
    if model_type not in FAMILIES:
        raise ConfigError(f"--packing bfd/none on the tf backend needs attention kept inside each example, which clm "
                          f"gives {', '.join(FAMILIES)} models, not {model_type!r}; use --packing wrapped or "
                          "--backend pt")


def _patch_family(model_type: str) -> None:
    """Let the family's attention take a (batch, L, L) mask (module-wide; ordinary masks take the old path)."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_tf_{model_type}")
    if getattr(module, "_clm_packed", False):
        return
    if model_type in FLAT_MASK:
        attention = getattr(module, FLAT_MASK[model_type])
        attn = attention._attn

        @functools.wraps(attn)
        def _attn(self: Any, q: Any, k: Any, v: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
            if attention_mask is not None:
                attention_mask = tf.reshape(attention_mask, [tf.shape(attention_mask)[0], 1, -1, tf.shape(k)[-2]])
            return attn(self, q, k, v, attention_mask, *args, **kwargs)

        attention._attn = _attn
    else:
        expand = module._expand_mask

        def _expand_mask(mask: Any, *args: Any, **kwargs: Any) -> Any:
            if mask.shape.rank != 3:
                return expand(mask, *args, **kwargs)
            dtype = args[0] if args and isinstance(args[0], tf.DType) else kwargs.get("dtype", tf.float32)
            return tf.where(tf.cast(mask[:, None], tf.bool), tf.zeros([], dtype), tf.constant(dtype.min, dtype))

        module._expand_mask = _expand_mask
        if model_type == "opt":  # positions from the mask: count the tokens of the same example up to each one
            embedding = module.TFOPTLearnedPositionalEmbedding
            call = embedding.call

            def positions(self: Any, attention_mask: Any, past_key_values_length: int = 0) -> Any:
                if attention_mask.shape.rank != 3:
                    return call(self, attention_mask, past_key_values_length)
                seen = tf.linalg.band_part(tf.cast(attention_mask, tf.int64), -1, 0)
                return super(embedding, self).call(tf.reduce_sum(seen, -1) - 1 + self.offset)

            embedding.call = positions
    module._clm_packed = True


def enable_packed_attention(model: Any) -> Any:
    """Make ``model`` (a transformers TF causal LM) keep attention inside each example of a packed row."""
    model_type = model.config.model_type
    check_packed_family(model_type)
    _patch_family(model_type)
    main = getattr(model, model.base_model_prefix)
    if getattr(main, "_clm_packed", False):
        return model
    call = main.call

    @functools.wraps(call)
    def packed_call(*args: Any, **kwargs: Any) -> Any:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("past_key_values") is not None:  # generation's cached steps
            return call(*args, **kwargs)
        ids = args[0] if args and args[0] is not None else kwargs.get("input_ids")
        shape = tf.shape(ids if ids is not None else kwargs["inputs_embeds"])[:2]
        position_ids = tf.broadcast_to(tf.reshape(tf.cast(position_ids, tf.int32), [-1, shape[1]]), shape)
        example = tf.cumsum(tf.cast(tf.equal(position_ids, 0), tf.int32), axis=1)
        mask = tf.equal(example[:, :, None], example[:, None, :])
        if kwargs.get("attention_mask") is not None:
            mask = tf.logical_and(mask, tf.cast(kwargs["attention_mask"], tf.bool)[:, None, :])
        mask = tf.cast(mask, tf.float32)
        kwargs["attention_mask"] = tf.reshape(mask, [shape[0], -1]) if model_type in FLAT_MASK else mask
        return call(*args, **kwargs)

    main.call = packed_call
    main._clm_packed = True
    return model
