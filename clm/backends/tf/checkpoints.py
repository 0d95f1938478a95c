"""Checkpoints a tf run resumes from exactly: ``output_dir/checkpoint-<step>/`` holds a ``tf.train.Checkpoint``
(model, optimizer with its step counter and Adam moments, and every dropout layer's random generator), the model
as PyTorch-layout safetensors with config and tokenizer (so a checkpoint is itself a model directory either
backend can evaluate), and ``trainer_state.json`` (global step, log history, running loss sum), written last.
Data position needs no state: the order of every epoch is a function of the seed (see ``batches``). Each
checkpoint is written into a hidden temporary folder and renamed into place; names, completeness and pruning
are the framework-free ``clm.checkpoints``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from clm import checkpoints
from clm.backends.tf.runtime import tf
from clm.backends.tf.weights import save_pretrained
from clm.errors import writing
from clm.io import atomic_path, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TF_CHECKPOINT = f"{checkpoints.TF_STATE_DIR}/ckpt"


def dropout_generators(model: Any) -> list[Any]:
    """Each dropout layer's ``tf.random.Generator`` (created now if not yet). Keras leaves them out of
    checkpoints; saving them lets a resumed run draw the dropout masks an uninterrupted run draws. They exist
    only when the model was built with Keras' TF random generator enabled (``model.load_model`` does)."""
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

    def path(self, step: int) -> Path:
        return self.output_dir / checkpoints.checkpoint_name(step)

    def save(self, step: int, state: dict[str, Any], keep: Optional[str | os.PathLike] = None) -> Path:
        """Write checkpoint-<step>; ``keep`` (the best checkpoint) survives --save_total_limit's pruning."""
        final = self.path(step)
        if not self.is_main_process:
            # Every worker takes part in writing a multi-worker checkpoint; only the chief's copy is kept.
            scratch = Path(tempfile.mkdtemp(prefix="clm-worker-ckpt-"))
            try:
                self.checkpoint.write(str(scratch / TF_CHECKPOINT))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            return final
        # A crash leaves the hidden temporary folder, never a torn checkpoint; a failed write (a full disk)
        # removes it and ends in one line, the previous checkpoints intact.
        with writing(f"saving {final.name}", final), atomic_path(final) as tmp:
            self.checkpoint.write(str(tmp / TF_CHECKPOINT))
            save_pretrained(self.model, self.tokenizer, tmp)
            write_json(tmp / checkpoints.DONE_FILE, state)  # last: marks the checkpoint complete
        checkpoints.prune(self.output_dir, self.save_total_limit, keep=final, also_keep=keep)
        return final

    def restore_model(self, path: str | os.PathLike) -> None:
        """The model's weights only, from checkpoint ``path`` (--load_best_model_at_end)."""
        tf.train.Checkpoint(model=self.model).read(str(Path(path) / TF_CHECKPOINT)).expect_partial()

    def restore_best(self, best: str | os.PathLike, last_step: int, keep_only_best: bool) -> None:
        """--load_best_model_at_end (the Trainer's ``_load_best_model``): the weights of checkpoint ``best``;
        ``keep_only_best`` (--save_total_limit 1) then removes the last checkpoint, as the Trainer does."""
        self.restore_model(best)
        last = self.path(last_step)
        if keep_only_best and self.is_main_process and last.is_dir() and last.resolve() != Path(best).resolve():
            shutil.rmtree(last, ignore_errors=True)

    def restore(self, path: str | os.PathLike) -> dict[str, Any]:
        # Optimizer slots are created at the first step and restored then (deferred restoration).
        self.checkpoint.read(str(Path(path) / TF_CHECKPOINT)).assert_existing_objects_matched()
        return checkpoints.read_state(path)
