"""Crash-safe writes, for every file and folder clm writes itself: a crash leaves the previous complete version
(or nothing), never a half-written one.

- ``atomic_path``: one file or folder, written into a hidden temporary sibling, fsynced and renamed over the
  target (``shared``: several processes may race to fill it, as the prepared-data cache does).
- ``write_atomic`` / ``write_json``: a whole file's bytes, text or JSON through ``atomic_path``.
- ``staged_save``: the final model, saved into a hidden folder in output_dir by the framework's own save, then
  fsynced and renamed file by file into output_dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def staged_save(output_dir: str | os.PathLike, owner: bool = True) -> Iterator[Path]:
    """A fresh temporary folder in output_dir to save the final model into; once the block succeeds each file
    is renamed into output_dir, so a crash mid-save leaves the previous complete file, never a half-written
    one. Only the ``owner`` (the main process) clears and renames: other processes may take part in the
    save (FSDP and DeepSpeed gather weights there)."""
    tmp = Path(output_dir) / ".final-save.tmp"
    if owner:
        shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    if owner:
        _fsync(tmp)  # the files' data is on disk before any rename exposes them
        for f in tmp.iterdir():
            os.replace(f, Path(output_dir) / f.name)
        tmp.rmdir()
        _fsync(Path(output_dir))  # the renames themselves


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file, or every file and folder of a tree, to disk, so the rename never exposes lost data."""
    paths = [path]
    for folder, dirs, files in os.walk(path):  # nothing for a file
        paths += [Path(folder, name) for name in dirs + files]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # a folder cannot be opened on Windows; nothing to flush then
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path``; a folder there is first moved aside (rename cannot replace a full one)."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, shared: bool = False) -> Iterator[Path]:
    """A hidden temporary sibling of ``path`` (``.<name>.tmp``) to write one file or folder into.

    When the block succeeds the temporary is fsynced and renamed over ``path`` (replacing a file or folder
    there); when it fails it is removed and ``path`` keeps its previous content. One writer per path is
    assumed (a leftover temporary is a crashed writer's, cleared first). ``shared``: several processes may
    fill ``path`` at once (a cache), so each writes ``.<name>.tmp-<pid>`` and the first to finish wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp" + (f"-{os.getpid()}" if shared else ""))
    _remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if not shared:
            _replace(tmp, path)
        elif not path.exists():
            with contextlib.suppress(OSError):  # another process renamed its copy first: equally good
                os.rename(tmp, path)
    finally:
        _remove(tmp)  # after a failure, or when another process's copy was kept
    _fsync(path.parent)  # the rename itself


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
