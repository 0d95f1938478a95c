"""Checkpoints and the run record, framework-free: names, completeness, listing, pruning, and which backend wrote
a checkpoint.

Both backends write ``output_dir/checkpoint-<step>/`` with ``trainer_state.json`` written last, so a checkpoint
counts only once that file parses. ``transformers.trainer_utils.get_last_checkpoint`` picks the highest step
without that check (and importing it loads torch), so the listing is written here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from clm.errors import ConfigError
from clm.io import write_json

logger = logging.getLogger("clm")

PREFIX = "checkpoint"
CHECKPOINT_RE = re.compile(rf"^{PREFIX}-(\d+)$")
DONE_FILE = "trainer_state.json"  # the Trainer's state file; both backends write it last
RUN_RECORD_FILE = "clm_run.json"
TF_STATE_DIR = "tf_checkpoint"  # the tf backend's tf.train.Checkpoint inside a checkpoint folder
PT_STATE_FILES = ("optimizer.pt", "scheduler.pt")  # the Trainer's optimizer and schedule
KERAS_STATE_FILE = "keras_state.npz"  # the keras backend's weights, optimizer and random-generator state


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}-{step}"


def is_complete(path: str | os.PathLike) -> bool:
    """A missing or truncated ``trainer_state.json`` marks a half-written save."""
    try:
        json.loads((Path(path) / DONE_FILE).read_text())
        return True
    except (OSError, ValueError):
        return False


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / DONE_FILE).read_text())


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones are skipped."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def prune(output_dir: str | os.PathLike, limit: Optional[int], keep: Path,
          also_keep: Optional[str | os.PathLike] = None) -> None:
    """Delete the oldest complete checkpoints beyond ``limit`` (--save_total_limit), never ``keep`` nor
    ``also_keep`` (the best checkpoint, which the Trainer keeps too, even beyond a limit of 1)."""
    if not limit:
        return
    kept = {p for p in {Path(keep).resolve()} | ({Path(also_keep).resolve()} if also_keep else set())
            if p.exists()}
    old = [p for p in list_checkpoints(output_dir) if p.resolve() not in kept]
    for path in old[:max(0, len(old) + len(kept) - max(limit, len(kept)))]:
        logger.info("Deleting %s (--save_total_limit %d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


def written_by(path: str | os.PathLike) -> Optional[str]:
    """'pt', 'tf' or 'keras' from the files a checkpoint holds; None if no backend's state is there."""
    path = Path(path)
    if (path / TF_STATE_DIR).is_dir():
        return "tf"
    if (path / KERAS_STATE_FILE).is_file():
        return "keras"
    if any((path / name).is_file() for name in PT_STATE_FILES):
        return "pt"
    return None


def check_resumable(path: str | os.PathLike, backend: str) -> None:
    """One line when a checkpoint is half-written or belongs to the other backend."""
    if not is_complete(path):
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r} is not a complete checkpoint (no {DONE_FILE}); "
                          f"pick a {PREFIX}-<step> directory")
    owner = written_by(path)
    if owner is not None and owner != backend:
        raise ConfigError(f"checkpoint {str(path)!r} was written by the {owner} backend; resume it with "
                          f"--backend {owner}, or start fresh with --overwrite_output_dir")


class RunRecord:
    """``output_dir/clm_run.json``: marks a directory as clm's and keeps what a resumed run must not
    recompute (the loss before training)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / RUN_RECORD_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.load().get(key, default)

    def update(self, **values: Any) -> None:
        write_json(self.path, {**self.load(), **values})
