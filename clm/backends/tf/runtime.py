"""TensorFlow for the tf backend, imported with the environment transformers 4.57's TF classes need.

transformers' TF models are Keras 2 models: with TensorFlow >= 2.16 they need ``tf-keras`` beside Keras 3, and
``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` that same Keras 2. Every module of this backend imports TensorFlow
from here, so the variable is set before the first import.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "enable_determinism_if_asked"]


def enable_determinism_if_asked() -> bool:
    """TensorFlow's own switch, TF_DETERMINISTIC_OPS=1, turns on op determinism (reproducible kernels and
    tf.data order, at some speed cost); clm's seeds, data order and checkpointed dropout RNG do the rest."""
    if os.environ.get("TF_DETERMINISTIC_OPS", "").lower() in ("1", "true"):
        tf.config.experimental.enable_op_determinism()
        return True
    return False
