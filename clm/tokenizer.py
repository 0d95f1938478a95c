"""Loading and saving tokenizers so one model folder works on every backend and both transformers lines.

transformers 5 saves a tokenizer it built from ``tokenizer.json`` alone as ``"tokenizer_class":
"TokenizersBackend"``, a class 4.57 (the last release with TensorFlow models) does not have. Both lines know
``PreTrainedTokenizerFast`` for the same files (5.x maps it to ``TokenizersBackend``), so clm writes that name,
and reads a folder whose class the installed transformers does not know through the fast tokenizer the folder
holds (tokenizer.json, with the special tokens and chat template of its config)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from clm import hub
from clm.errors import ClmError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Class names one transformers line writes and the other cannot import, and the name both read.
PORTABLE_CLASS = "PreTrainedTokenizerFast"
UNPORTABLE_CLASSES = ("TokenizersBackend",)
_UNKNOWN_CLASS = "does not exist or is not currently imported"


def load_pretrained_tokenizer(name: str, revision: Optional[str] = None,
                              trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """``AutoTokenizer.from_pretrained(name)`` (fast), falling back to the folder's ``tokenizer.json`` when the
    installed transformers does not know the tokenizer class it names. Errors are one line (clm.hub)."""
    from transformers import AutoTokenizer

    with hub.translate_errors(name, "tokenizer"):
        try:
            return AutoTokenizer.from_pretrained(name, use_fast=True, revision=revision,
                                                 trust_remote_code=trust_remote_code)
        except Exception as exc:
            _check_readable(name)  # on failure only: a file that does not parse is named, not transformers' error
            if not (isinstance(exc, ValueError) and _UNKNOWN_CLASS in str(exc)):
                raise
            return _load_fast(name, revision)


def _load_fast(name: str, revision: Optional[str]) -> "PreTrainedTokenizerBase":
    """The fast tokenizer the folder (or Hub repo) holds, whatever class its config names."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging

    # It warns that the class differs from the config's, which is the point of this fallback.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return PreTrainedTokenizerFast.from_pretrained(name, revision=revision)
    finally:
        logging.set_verbosity(verbosity)


def _check_readable(name: str) -> None:
    """A local folder's tokenizer files parse as JSON: otherwise one line names the file and the reason."""
    if not os.path.isdir(name):
        return
    for file in (TOKENIZER_CONFIG, TOKENIZER_FILE):
        path = Path(name) / file
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ClmError(f"could not read tokenizer file {str(path)!r}: {reason}; restore it or pass "
                           f"--tokenizer_name with a tokenizer that works") from exc


def make_portable(directory: str | os.PathLike) -> None:
    """Name the tokenizer class in ``directory``'s tokenizer_config.json so both transformers lines load it."""
    path = Path(directory) / TOKENIZER_CONFIG
    if not path.is_file():
        return
    values = json.loads(path.read_text(encoding="utf-8"))
    if values.get("tokenizer_class") not in UNPORTABLE_CLASSES:
        return
    values["tokenizer_class"] = PORTABLE_CLASS
    path.write_text(json.dumps(values, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: "PreTrainedTokenizerBase", directory: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(directory)``, readable by transformers 4.57 and 5.x alike."""
    tokenizer.save_pretrained(str(directory))
    make_portable(directory)
