"""Backend registry: names map to import paths, so only the chosen framework is ever imported (transformers
included: ``load_only``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Optional

from clm.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    from clm.backends.base import Backend

# name -> (import path, the modules it needs, the pip extra that installs them)
BACKENDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pt": ("clm.backends.pt.backend:TorchBackend", ("torch",), "pt"),
    "tf": ("clm.backends.tf.backend:TFBackend", ("tensorflow", "tf_keras"), "tf"),
    "keras": ("clm.backends.keras.backend:KerasBackend", ("keras", "keras_hub"), "keras"),
}
ALIASES = {"pytorch": "pt", "torch": "pt", "tensorflow": "tf"}
# What transformers must be told, when it is first imported, to leave the other framework out: transformers 4.x
# imports TensorFlow along with any PyTorch model when both are installed. It reads these variables once.
FRAMEWORK_ONLY = {"pt": {"USE_TF": "0", "USE_TORCH": "1"}}


def _missing_modules(name: str) -> list[str]:
    return [m for m in BACKENDS[name][1] if importlib.util.find_spec(m) is None]


def is_available(name: str) -> bool:
    """True when the backend's framework is installed (checked without importing it)."""
    return not _missing_modules(_canonical(name))


def available_backends() -> list[str]:
    """Installed backends, in order of preference."""
    return [name for name in BACKENDS if is_available(name)]


def _canonical(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return key


def resolve_backend_name(name: Optional[str] = None) -> str:
    """--backend, else $CLM_BACKEND, else the first installed of pt, tf, keras."""
    name = name or os.environ.get("CLM_BACKEND") or None
    if name:
        return _canonical(name)
    installed = available_backends()
    if not installed:
        raise BackendUnavailableError(
            "no backend installed; install one with: pip install 'clm[pt]' (PyTorch) or 'clm[tf]' (TensorFlow)")
    return installed[0]


def load_only(name: str) -> None:
    """Have transformers load only backend ``name``'s framework, when it is not imported in this process yet: it
    is imported here, with FRAMEWORK_ONLY's variables (those the environment does not set itself). They are
    restored afterwards, so processes started later choose for themselves."""
    values = FRAMEWORK_ONLY.get(name)
    if not values or "transformers" in sys.modules:
        return
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if saved[key] is None})
    try:
        import transformers  # noqa: F401  (reads USE_TF/USE_TORCH now, once)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _check_transformers_has_tf() -> None:
    """transformers 4.x loaded without TensorFlow (USE_TF=0 or USE_TORCH=1, or a pt run came first in this
    process) has no TF models for the rest of the process: say so in one line."""
    utils = sys.modules.get("transformers.utils")
    if utils is not None and not getattr(utils, "is_tf_available", lambda: True)():
        raise BackendUnavailableError(
            "transformers was loaded without TensorFlow in this process (USE_TF=0 or USE_TORCH=1, or a pt run came "
            "first); run the tf backend in a process of its own")


def get_backend(name: Optional[str] = None) -> "Backend":
    """An instance of the named backend (see resolve_backend_name for the default)."""
    key = resolve_backend_name(name)
    path, _, extra = BACKENDS[key]
    missing = _missing_modules(key)
    if missing:
        raise BackendUnavailableError(
            f"backend {key!r} needs {', '.join(missing)}, which is not installed; "
            f"install it with: pip install 'clm[{extra}]'")
    load_only(key)
    if key == "tf":
        _check_transformers_has_tf()
    module_name, cls_name = path.split(":")
    return getattr(importlib.import_module(module_name), cls_name)()
