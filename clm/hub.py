"""Turn Hub and local-path loading failures into one-line errors that name the fix."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from clm.errors import ClmError


def looks_like_path(name: str) -> bool:
    """A Hub id is 'name' or 'org/name'; anything else (./x, /x, ~/x, a/b/c) is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_local(name: str, what: str) -> None:
    """A path-like name that does not exist is a typo, not a Hub id: say so before any network call."""
    if looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ClmError(f"{what} path {name!r} does not exist; check the path")
    if os.path.isdir(name) and not os.access(name, os.R_OK | os.X_OK):
        raise ClmError(f"{what} directory {name!r} is not readable; check its permissions")


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("connection", "offline", "resolve", "timed out", "timeout", "network", "max retries",
               "couldn't reach", "cannot reach", "localentrynotfound", "we couldn't connect", "name or service")
    return any(m in text for m in markers)


@contextlib.contextmanager
def translate_errors(name: str, what: str) -> Iterator[None]:
    """Wrap a ``from_pretrained``/``load_dataset`` call on ``name`` (a Hub id or a local path)."""
    check_local(name, what)
    try:
        yield
    except ClmError:
        raise
    except Exception as exc:
        if os.path.isdir(name):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClmError(f"could not load {what} from directory {name!r}: {first}") from exc
        if _is_offline_error(exc):
            raise ClmError(
                f"could not download {what} {name!r}: the Hugging Face Hub is unreachable; pass a local path "
                f"instead, or set HF_HUB_OFFLINE=1 to use a copy already in the local cache") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClmError(f"could not load {what} {name!r}: {first}") from exc
