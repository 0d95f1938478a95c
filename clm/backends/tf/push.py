"""--push_to_hub for Keras: transformers' ``PushToHubCallback`` contract (push at each save per
``--hub_strategy``, ``hub_model_id``, private repos, checkpoint pushes; the end-of-training push is
``TFBackend.push``) on huggingface_hub's HTTP API through ``clm.hub_push.HubPush``: no git, no git-lfs, no
clone folder, and what is pushed is the model as clm saves it (PyTorch-layout safetensors), never
``tf_model.h5``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from clm import checkpoints
from clm.backends.tf.runtime import keras
from clm.hub_push import HubPush


class HubPushCallback(keras.callbacks.Callback):
    """Pushes each new checkpoint in the background. Put it after ``ClmCallback`` in the callbacks list: Keras
    calls them in order, so at each epoch end (= each checkpoint interval) the checkpoint is already written."""

    def __init__(self, hub: HubPush, output_dir: str | os.PathLike):
        super().__init__()
        self.hub, self.output_dir = hub, Path(output_dir)
        self._last: Optional[Path] = checkpoints.latest_checkpoint(self.output_dir)  # a resumed run's is pushed

    def on_train_begin(self, logs: Optional[dict[str, Any]] = None) -> None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # background uploads would draw over Keras' progress bar (the Trainer does too)

    def on_epoch_end(self, epoch: int, logs: Optional[dict[str, Any]] = None) -> None:
        newest = checkpoints.latest_checkpoint(self.output_dir)
        if newest is not None and newest != self._last:
            self._last = newest
            self.hub.on_save(newest)

    def on_train_end(self, logs: Optional[dict[str, Any]] = None) -> None:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
