"""Packed rows (``--packing bfd``/``none``) on PyTorch: each token attends only to earlier tokens of its own
example. The rows carry ``position_ids`` that restart at 0 at every example; from them each batch gets an
explicit block-diagonal causal mask (batch, 1, L, L), additive (0 where a token may attend, the dtype's minimum
elsewhere), passed with the position ids.

Why not transformers' mask-free packed path (position ids alone): it is skipped whenever the model makes a KV
cache (``use_cache``, on by default, in training too), OPT builds its own mask and XGLM never passes position ids
to its mask. The explicit mask was checked on gpt2, opt, mistral, llama, qwen2, gptj and xglm, on transformers
4.57 and 5, sdpa and eager: every real token's logits equal those of its example run alone (1e-7). A boolean
mask is silently ignored by eager attention, hence the additive form; XGLM on 4.x wants 1/0 instead.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import transformers

from clm.errors import ConfigError

# Checked one by one (see above); any other family whose model builds its mask with transformers'
# masking_utils (which accepts a 4D mask as given) is accepted too.
CHECKED_FAMILIES = ("gpt2", "opt", "mistral", "llama", "qwen2", "gptj", "xglm")
OLD_XGLM = transformers.__version__.split(".")[0] == "4"


def check_packed_family(model_type: str) -> None:
    """One line for a family whose attention has not been shown to take the packed mask."""
    if model_type in CHECKED_FAMILIES or _uses_masking_utils(model_type):
        return
    raise ConfigError(f"--packing bfd/none needs attention kept inside each example, which clm has not checked for "
                      f"{model_type!r} models (checked: {', '.join(CHECKED_FAMILIES)} and models built on "
                      f"transformers' masking_utils); use --packing wrapped")


def _uses_masking_utils(model_type: str) -> bool:
    from clm.families import pt_families

    cls = getattr(transformers, pt_families().get(model_type, ""), None)  # imports the family's module
    return cls is not None and hasattr(sys.modules.get(cls.__module__), "create_causal_mask")


def packed_attention(model: Any, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward arguments for packed rows: ``position_ids`` and the block-diagonal causal mask."""
    length = position_ids.shape[-1]
    segment = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    if OLD_XGLM and model.config.model_type == "xglm":  # inverts the mask itself, and adds 2 to positions in place
        return {"position_ids": position_ids.clone(), "attention_mask": allowed.to(dtype)}
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return {"position_ids": position_ids, "attention_mask": mask.masked_fill(~allowed, torch.finfo(dtype).min)}
