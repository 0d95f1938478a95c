"""Push an output dir to the Hugging Face Hub over its HTTP API (``create_repo``, ``upload_folder``): no git, no
git-lfs, no clone folder, and the token only ever read (from ``HF_TOKEN`` or the login cache) by huggingface_hub.

Framework-free: the PyTorch Trainer's push hooks, the TensorFlow Keras callback and ``clm push`` all drive
``HubPush``, so both backends push the same files at the same moments. ``--hub_strategy`` has the Trainer's
meaning:

- ``end``: only at the end of training.
- ``every_save`` (default): also at each checkpoint save, that checkpoint's model (weights, config, tokenizer;
  no training state) to the repo root, in the background; a save that finds the previous push still running
  skips its push, as the Trainer's does.
- ``checkpoint``: as ``every_save``, plus the newest checkpoint in full under ``last-checkpoint/``.
- ``all_checkpoints``: as ``every_save``, plus each checkpoint in full under its own name.

The end of training waits for the background pushes, then uploads the output dir's public files (what the
final model is: PyTorch-layout safetensors, config, tokenizer, model card, results, loss plot, TensorBoard logs)
and whatever checkpoint pushes the strategy asked for that did not get through, so the repo ends up equal to the
output dir. Never uploaded: hidden or temporary entries, clm's run record, ``_*`` files, and checkpoints unless
the strategy asks for them.
"""

from __future__ import annotations

import logging
import os
import typing
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from clm import checkpoints
from clm.config import HubStrategy
from clm.errors import ClmError, ConfigError

logger = logging.getLogger("clm")

HUB_STRATEGIES: tuple[str, ...] = typing.get_args(HubStrategy)
LAST_CHECKPOINT = "last-checkpoint"  # the Trainer's name in the repo for hub_strategy="checkpoint"
END_MESSAGE = "End of training"  # the Trainer's commit message

# Never pushed, at any depth: hidden and temporary entries (staging folders, atomic-write temps), the Trainer's
# private `_*` files, and clm's run record (this machine's bookkeeping).
PRIVATE = [".*", "*/.*", "_*", checkpoints.RUN_RECORD_FILE, "tmp-checkpoint-*"]
# A checkpoint's training state: pushed with the checkpoint itself, never as the model.
TRAINING_STATE = [*checkpoints.PT_STATE_FILES, "scaler.pt", "rng_state*.pth", checkpoints.DONE_FILE,
                  "training_args.bin", f"{checkpoints.TF_STATE_DIR}/*"]


class HubPushError(ClmError):
    """An upload to the Hub failed; the local output dir is complete and ``clm push`` uploads it again."""

    exit_code = 1  # not a mistake in the input: the network, the token or the Hub


def _status(exc: BaseException) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


_NETWORK = {"ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutException", "ReadTimeout",
            "NetworkError", "RemoteProtocolError", "ProtocolError", "MaxRetryError", "NewConnectionError"}


def describe(exc: BaseException, repo_id: str) -> str:
    """The cause of a failed Hub call, in a few words, with what to do about it."""
    from huggingface_hub import constants

    status = next((s for s in map(_status, _chain(exc)) if s is not None), None)
    if status == 401:
        return ("the Hub refused the token (401 Unauthorized); set HF_TOKEN to a token with write access, or run "
                "`hf auth login`")
    if status == 403:
        return (f"the token may not write to {repo_id} (403 Forbidden); use a token with write access to it, or "
                "a --hub_model_id in your own namespace")
    if status == 404:
        return f"the Hub has no repository {repo_id} (404 Not Found); check --hub_model_id"
    if status == 429:
        return "the Hub is rate-limiting this token (429 Too Many Requests); try again in a few minutes"
    if status is not None and status >= 500:
        return f"the Hub had a server error ({status}); try again later"
    for link in _chain(exc):
        names = {c.__name__ for c in type(link).__mro__}
        if "OfflineModeIsEnabled" in names:
            return "HF_HUB_OFFLINE=1 is set, which blocks uploads; unset it to push"
        if names & _NETWORK or isinstance(link, (ConnectionError, TimeoutError)):
            return f"the Hub at {constants.ENDPOINT} is unreachable ({type(link).__name__}); check the network"
        if isinstance(link, FileNotFoundError):
            return f"{link.filename or link} was removed before its upload finished"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}{f' (HTTP {status})' if status else ''}: {first}".rstrip(": ")


def _scrub(text: str) -> str:
    """Belt and braces: a message never carries the token, whatever a library put in it."""
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text


@dataclass
class _Job:
    what: str  # for messages
    checkpoint: Optional[str]  # the local checkpoint pushed in full, if that is what the job does
    future: Future


class HubPush:
    """One run's pushes to one Hub repo. Creating it creates the repo (so a bad token or an unreachable Hub
    fails before training); ``on_save`` pushes a checkpoint in the background per the strategy; ``finish``
    waits for those, then uploads the output dir and returns the repo URL."""

    def __init__(self, output_dir: str | os.PathLike, hub_model_id: Optional[str] = None,
                 private: Optional[bool] = None, strategy: str = "every_save"):
        from huggingface_hub import HfApi, constants, get_token

        if strategy not in HUB_STRATEGIES:
            raise ConfigError(f"--hub_strategy must be one of {', '.join(HUB_STRATEGIES)}; got {strategy!r}")
        self.output_dir, self.strategy = Path(output_dir), strategy
        self.repo_id = hub_model_id or self.output_dir.absolute().name  # the Trainer's default name
        if constants.HF_HUB_OFFLINE:
            raise HubPushError("cannot push with HF_HUB_OFFLINE=1 set; unset it (local paths still load offline)")
        if get_token() is None:
            raise HubPushError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                               "`hf auth login`")
        self._api = HfApi()  # its own single worker: background uploads run one after another, in order
        self._jobs: list[_Job] = []
        self._pushed: set[str] = set()  # local checkpoints whose full push went through
        try:
            url = self._api.create_repo(self.repo_id, private=private, exist_ok=True)
        except Exception as exc:
            raise self._error("could not create the repository", exc) from exc
        self.repo_id, self.repo_url = url.repo_id, str(url)

    def _error(self, what: str, exc: BaseException) -> HubPushError:
        return HubPushError(_scrub(f"push to the Hub failed ({self.repo_id}): {what}: "
                                   f"{describe(exc, self.repo_id)}"))

    # --------------------------------------------------------------------------------------- in the background
    def _settle(self) -> bool:
        """Record the finished background pushes (a failure is a warning: the end of training pushes again);
        True when none is still running."""
        running = []
        for job in self._jobs:
            if not job.future.done():
                running.append(job)
            elif job.future.exception() is not None:
                logger.warning("%s; the end of training pushes again", self._error(job.what, job.future.exception()))
            elif job.checkpoint is not None:
                self._pushed.add(job.checkpoint)
        self._jobs = running
        return not running

    def on_save(self, checkpoint: str | os.PathLike) -> None:
        """A checkpoint was just saved: push it per the strategy, in the background (the Trainer's
        ``_push_from_checkpoint``)."""
        if self.strategy == "end":
            return
        checkpoint = Path(checkpoint)
        if not self._settle():
            logger.info("Hub: the previous push is still running; not pushing %s", checkpoint.name)
            return
        message = f"Training in progress, step {checkpoint.name.rsplit('-', 1)[-1]}"
        self._jobs.append(_Job(f"the model of {checkpoint.name}", None, self._upload(
            checkpoint, "", message, PRIVATE + TRAINING_STATE, background=True)))
        if self.strategy in ("checkpoint", "all_checkpoints"):
            name = LAST_CHECKPOINT if self.strategy == "checkpoint" else checkpoint.name
            self._jobs.append(_Job(f"{checkpoint.name} as {name}/", checkpoint.name, self._upload(
                checkpoint, name, f"{message}, checkpoint", PRIVATE, background=True)))

    def _upload(self, folder: Path, path_in_repo: str, message: str, ignore: list[str],
                background: bool = False) -> Any:
        return self._api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                       commit_message=message, ignore_patterns=ignore, run_as_future=background)

    def wait(self) -> None:
        """Wait for the background pushes to end (the Trainer's ``_finish_current_push``)."""
        if self._jobs:
            logger.info("Hub: waiting for the last checkpoint push to finish")
            wait([job.future for job in self._jobs])
        self._settle()

    # --------------------------------------------------------------------------------------- the end
    def final_ignore(self) -> list[str]:
        """What the end-of-training upload of output_dir leaves out: the private entries, and every checkpoint
        except, with all_checkpoints, the complete ones not pushed yet."""
        wanted = set()
        if self.strategy == "all_checkpoints":
            wanted = {p.name for p in checkpoints.list_checkpoints(self.output_dir)} - self._pushed
        skip = [f"{p.name}/*" for p in self.output_dir.iterdir()
                if checkpoints.CHECKPOINT_RE.match(p.name) and p.name not in wanted]
        return PRIVATE + skip

    def finish(self, commit_message: str = END_MESSAGE) -> str:
        """Upload the output dir's public files (blocking), and with hub_strategy="checkpoint" the newest
        checkpoint to ``last-checkpoint/`` unless a save-time push got it there. Returns the repo URL."""
        self.wait()
        try:
            self._upload(self.output_dir, "", commit_message, self.final_ignore())
            newest = checkpoints.latest_checkpoint(self.output_dir)
            if self.strategy == "checkpoint" and newest is not None and newest.name not in self._pushed:
                self._upload(newest, LAST_CHECKPOINT, f"{commit_message}, checkpoint", PRIVATE)
        except Exception as exc:
            raise self._error("could not upload the output dir", exc) from exc
        logger.info("Pushed %s to %s", self.output_dir, self.repo_url)
        return self.repo_url

