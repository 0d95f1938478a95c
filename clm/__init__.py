"""clm: fine-tune causal language models with PyTorch or TensorFlow, chosen at run time.

    import clm
    metrics = clm.train(clm.TrainConfig(backend="pt", train_file="my_eli5.jsonl"))
    print(clm.generate("clm-output", "Why is the sky blue?")[0])
    clm.push("clm-output", "you/my-model")   # upload a finished run to the Hub

Importing clm loads neither torch nor tensorflow (nor transformers): names resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clm.config import TrainConfig
from clm.errors import ClmError

__version__ = "0.1.0"

_LAZY = {
    "train": "clm.runner",
    "evaluate": "clm.runner",
    "generate": "clm.runner",
    "push": "clm.runner",
    "prepare_dataset": "clm.data",
    "load_tokenizer": "clm.defaults",
    "get_backend": "clm.backends",
    "available_backends": "clm.backends",
}

__all__ = ["TrainConfig", "ClmError", *_LAZY]

if TYPE_CHECKING:
    from clm.backends import available_backends, get_backend
    from clm.data import prepare_dataset
    from clm.defaults import load_tokenizer
    from clm.runner import evaluate, generate, push, train


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "data":
        return importlib.import_module("clm.data")
    raise AttributeError(f"module 'clm' has no attribute {name!r}")
