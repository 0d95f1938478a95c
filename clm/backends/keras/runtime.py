"""Keras 3 and KerasHub, on the Keras backend --keras_backend names. Keras reads KERAS_BACKEND once, at its first
import, so it is set here, when the keras backend is first used, never by ``import clm``."""

from __future__ import annotations

import os
import sys
from typing import Any

from clm.errors import BackendUnavailableError

KERAS_BACKENDS = ("tensorflow", "jax")


def load_keras(name: str) -> tuple[Any, Any]:
    """(keras, keras_hub), with Keras running on ``name``; one line if this process already runs another."""
    imported = sys.modules.get("keras")
    if imported is None:
        os.environ["KERAS_BACKEND"] = name
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import keras_hub

    if keras.backend.backend() != name:
        raise BackendUnavailableError(
            f"Keras already runs on {keras.backend.backend()!r} in this process (imported before, or set by "
            f"KERAS_BACKEND); run --keras_backend {name} in a process of its own")
    del imported
    return keras, keras_hub
