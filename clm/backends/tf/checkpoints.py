"""Checkpoints a run resumes from exactly, and the Keras callback that counts steps, logs, evaluates and saves.

``output_dir/checkpoint-<step>/`` holds a ``tf.train.Checkpoint`` (model, optimizer with its step counter and
Adam moments, and every dropout layer's random generator), the model as PyTorch-layout safetensors with config
and tokenizer (so a checkpoint is itself a model directory either backend can evaluate), and
``trainer_state.json`` (global step, log history, the running loss sum). Data position needs no state: the
order of every epoch is a function of the seed (see ``batches``). Each checkpoint is written into a hidden
temporary directory, ``trainer_state.json`` last, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from clm.backends.tf.runtime import keras, tf
from clm.backends.tf.weights import save_pretrained
from clm.errors import ClmError
from clm.reporting import write_json
from clm.runner import CHECKPOINT_DONE_FILE, list_checkpoints

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("clm")

TF_CHECKPOINT = "tf_checkpoint/ckpt"
# The Trainer's TensorBoard tags
SUMMARY_TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_loss": "eval/loss"}


def dropout_generators(model: Any) -> list[Any]:
    """Each dropout layer's ``tf.random.Generator`` (created now if not yet). Keras leaves them out of
    checkpoints; saving them lets a resumed run draw the dropout masks an uninterrupted run draws. They exist
    only when the model was built with Keras' TF random generator enabled (``load_model`` does)."""
    generators = []
    for layer in model.submodules:
        rng = getattr(layer, "_random_generator", None)
        if rng is not None and getattr(rng, "_rng_type", None) == "stateful":
            rng._maybe_init()
            generators.append(rng._generator)
    return generators


class Checkpointer:
    def __init__(self, model: Any, tokenizer: "PreTrainedTokenizerBase", output_dir: str,
                 save_total_limit: Optional[int], is_main_process: bool = True):
        self.model, self.tokenizer, self.output_dir = model, tokenizer, Path(output_dir)
        self.save_total_limit, self.is_main_process = save_total_limit, is_main_process
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              dropout_rng=dropout_generators(model))

    def save(self, step: int, state: dict[str, Any]) -> Path:
        final = self.output_dir / f"checkpoint-{step}"
        if not self.is_main_process:
            # Every worker takes part in writing a multi-worker checkpoint; only the chief's copy is kept.
            scratch = Path(tempfile.mkdtemp(prefix="clm-worker-ckpt-"))
            try:
                self.checkpoint.write(str(scratch / TF_CHECKPOINT))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return final
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoint.write(str(tmp / TF_CHECKPOINT))
        save_pretrained(self.model, self.tokenizer, tmp)
        write_json(tmp / CHECKPOINT_DONE_FILE, state)  # last: marks the checkpoint complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        if not self.save_total_limit:
            return
        old = [p for p in list_checkpoints(self.output_dir) if p != keep]
        for path in old[:max(0, len(old) + 1 - self.save_total_limit)]:
            logger.info("Deleting %s (--save_total_limit %d)", path, self.save_total_limit)
            shutil.rmtree(path, ignore_errors=True)

    def restore(self, path: str | os.PathLike) -> dict[str, Any]:
        path = Path(path)
        if not (path / TF_CHECKPOINT).with_suffix(".index").is_file():
            raise ClmError(f"{path} is not a tf backend checkpoint (no {TF_CHECKPOINT}); resume it with the "
                           f"backend that wrote it, or start fresh with --overwrite_output_dir")
        # Optimizer slots are created at the first step and restored then (deferred restoration).
        self.checkpoint.read(str(path / TF_CHECKPOINT)).assert_existing_objects_matched()
        return json.loads((path / CHECKPOINT_DONE_FILE).read_text())


class ClmCallback(keras.callbacks.Callback):
    """Counts optimizer steps across fit calls; logs the mean training loss of every ``logging_steps`` steps
    (as the Trainer); stops at the last step; at each Keras epoch end (= each checkpoint interval) records the
    validation loss and saves a checkpoint."""

    def __init__(self, *, step: int, total_steps: int, steps_per_epoch: int, logging_steps: int,
                 learning_rate: Callable[[int], float], log_history: list[dict[str, Any]], loss_sum: float,
                 checkpointer: Optional[Checkpointer], state: dict[str, Any], summary_dir: Optional[str] = None):
        super().__init__()
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch
        self.logging_steps, self.learning_rate, self.log_history = logging_steps, learning_rate, log_history
        self.loss_sum, self.checkpointer, self.state = loss_sum, checkpointer, state
        self.writer = tf.summary.create_file_writer(summary_dir) if summary_dir else None
        self._epoch_sum = self._interval_sum = 0.0
        self._interval_steps = 0

    def epoch(self) -> float:
        return round(self.step / self.steps_per_epoch, 4)

    def _log(self, row: dict[str, Any]) -> None:
        self.log_history.append(row)
        if self.writer is not None:  # global-step scalars, continuous across resumes (Keras' restart per fit)
            with self.writer.as_default(step=row["step"]):
                for key, tag in SUMMARY_TAGS.items():
                    if key in row:
                        tf.summary.scalar(tag, row[key])
            self.writer.flush()

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._epoch_sum = 0.0

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        # Keras reports the running mean of this epoch's batch losses; recover this step's loss from it.
        epoch_sum = float(logs["loss"]) * (batch + 1)
        loss, self._epoch_sum = epoch_sum - self._epoch_sum, epoch_sum
        self.step += 1
        self.loss_sum += loss
        self._interval_sum += loss
        self._interval_steps += 1
        if self.step % self.logging_steps == 0:
            self._log({"step": self.step, "loss": self._interval_sum / self._interval_steps,
                       "learning_rate": self.learning_rate(self.step), "epoch": self.epoch()})
            self._interval_sum, self._interval_steps = 0.0, 0
        if self.step >= self.total_steps:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs and "val_eval_loss" in logs:
            self._log({"step": self.step, "eval_loss": float(logs["val_eval_loss"]), "epoch": self.epoch()})
        if self.checkpointer is not None:
            self.checkpointer.save(self.step, self.trainer_state())

    def trainer_state(self) -> dict[str, Any]:
        return {**self.state, "global_step": self.step, "epoch": self.epoch(), "train_loss_sum": self.loss_sum,
                "log_history": self.log_history}
