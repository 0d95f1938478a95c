"""The Keras side of the Trainer's loop: ``model.compile`` with the model's own loss, an eval step that reports
the Trainer's eval loss, the progress bar, the callback that counts steps, logs, evaluates and checkpoints, and
the plan of ``fit`` calls that resumes mid-interval.

Keras epochs end at every checkpoint and every evaluation point (``interval_plan``: the gcd of the save and
eval intervals, ``save_steps``/``eval_steps`` or one pass over the data), and ``validation_freq`` names the
epochs that end at an evaluation, so Keras' validation is the Trainer's evaluation schedule and ``ClmCallback``
saves only at the Trainer's checkpoint steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from clm import preemption
from clm.backends.tf.batches import steps_per_epoch
from clm.backends.tf.distribute import xla_can_compile
from clm.backends.tf.runtime import keras, tf
from clm.collate import IGNORE_INDEX
from clm.errors import Preempted

if TYPE_CHECKING:
    from clm.backends.tf.checkpoints import Checkpointer
    from clm.config import TrainConfig

# The Trainer's TensorBoard tags
SUMMARY_TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "eval_loss": "eval/loss",
                "eval_accuracy": "eval/accuracy"}


def next_token_labels(labels: Any) -> Any:
    """The label each position predicts: the labels shifted left, ``IGNORE_INDEX`` in the last position (so the
    logits never need slicing)."""
    return tf.concat([labels[:, 1:], tf.fill([tf.shape(labels)[0], 1], tf.constant(IGNORE_INDEX, labels.dtype))],
                     axis=1)


def causal_lm_loss(labels: Any, logits: Any) -> Any:
    """Mean token loss of predicting each next token, as transformers' own loss computes it, placed so the
    (batch, length, vocab) logits are never copied: the labels are shifted left (``IGNORE_INDEX`` in the last
    position) instead of the logits being cut to ``[:, :-1]``. With a 50,257-token vocabulary that slice and
    its gradient moved two logits-sized tensors per step; the last position's loss computed here is masked
    out, which costs 1/length of one fused softmax-cross-entropy. Computed in float32 (as PyTorch upcasts)."""
    labels = next_token_labels(tf.cast(labels, tf.int32))
    mask = labels != IGNORE_INDEX
    token_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(mask, labels, 0),
                                                                tf.cast(logits, tf.float32))
    weights = tf.cast(mask, tf.float32)
    return tf.reduce_sum(token_loss * weights) / tf.reduce_sum(weights)


def _inputs_and_labels(data: Any) -> tuple[dict[str, Any], Any]:
    x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
    x = dict(x)
    labels = x.pop("labels", y)  # the model is called without labels: clm computes the loss (causal_lm_loss)
    return x, labels


def attach_train_step(model: Any) -> None:
    """transformers' Keras train step with the loss computed by ``causal_lm_loss`` instead of the model's: the
    same value (mean token loss over predicted tokens), through Keras' compiled (pass-through) loss, which
    scales it for distribution strategies and keeps the ``loss`` average Keras reports."""

    def train_step(data: Any) -> dict[str, Any]:
        x, labels = _inputs_and_labels(data)
        with tf.GradientTape() as tape:
            loss = tf.reshape(causal_lm_loss(labels, model(x, training=True).logits), (1,))
            loss = model.compiled_loss(loss, loss, None, regularization_losses=model.losses)
        model.optimizer.minimize(loss, model.trainable_variables, tape=tape)
        return {m.name: m.result() for m in model.metrics}

    model.train_step = train_step


def attach_eval_step(model: Any) -> Any:
    """Make ``model.evaluate`` report the eval loss over every scored token, as ``eval_loss`` (Keras would weight
    every batch equally; padding rows weigh nothing).
    Returns the callback that resets the average at the start of each evaluation (fit passes it on to
    validation)."""
    mean = keras.metrics.Mean(name="eval_loss")  # kept off the model, so training logs do not show it
    # Next-token accuracy as a streaming reduction: counts per batch, no logits or predictions kept.
    correct = keras.metrics.Sum(name="eval_correct_tokens")
    counted = keras.metrics.Sum(name="eval_counted_tokens")

    def test_step(data: Any) -> dict[str, Any]:
        x, labels = _inputs_and_labels(data)
        logits = model(x, training=False).logits
        # Each batch's mean weighted by its scored tokens: the loss over every scored token (rows of examples
        # score different numbers; bfd must score what none scores). A worker's share of the last batch may be
        # padding only: its loss is 0/0; it weighs nothing.
        tokens = tf.reduce_sum(tf.cast(next_token_labels(labels) != IGNORE_INDEX, tf.float32))
        loss = tf.where(tokens > 0, causal_lm_loss(labels, logits), 0.0)
        mean.update_state(loss, sample_weight=tokens)
        # run_clm.py's accuracy: argmax at t against the label at t + 1; -100 labels (padding) do not count.
        # Predictions at every position against the labels shifted left (the last position masked), as the
        # loss does: argmax over the vocabulary without slicing the logits.
        preds = tf.argmax(logits, axis=-1, output_type=tf.int64)
        labels = next_token_labels(tf.cast(labels, tf.int64))
        scored = labels != IGNORE_INDEX
        correct.update_state(tf.reduce_sum(tf.cast(scored & (preds == labels), tf.float32)))
        counted.update_state(tf.reduce_sum(tf.cast(scored, tf.float32)))
        # Not "loss": Keras would replace a "loss" log by its own (unweighted) loss tracker's value.
        return {"eval_loss": mean.result(), "eval_correct_tokens": correct.result(),
                "eval_counted_tokens": counted.result()}

    def reset(logs: Any) -> None:
        for metric in (mean, correct, counted):
            metric.reset_state()

    model.test_step = test_step
    return keras.callbacks.LambdaCallback(on_test_begin=reset)


def eval_metrics(logs: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``eval_loss`` and ``eval_accuracy`` (through clm.metrics) from the eval step's logs (``prefix`` "val_"
    for the validation that ``fit`` runs)."""
    from clm.metrics import accuracy_from_counts

    metrics = {"eval_loss": float(logs[f"{prefix}eval_loss"])}
    accuracy = accuracy_from_counts(float(logs[f"{prefix}eval_correct_tokens"]),
                                    float(logs[f"{prefix}eval_counted_tokens"]))
    if accuracy is not None:
        metrics["eval_accuracy"] = accuracy
    return metrics


def use_xla(config: "TrainConfig") -> bool:
    """--jit_compile, except where XLA cannot run the step (``distribute.xla_can_compile``)."""
    return config.jit_compile and xla_can_compile(tf.distribute.get_strategy())


def compile_model(model: Any, config: "TrainConfig", optimizer: Any = None) -> Any:
    """``model.compile`` with transformers' pass-through loss, clm's train and eval steps (``causal_lm_loss``)
    and XLA unless --no_jit_compile; call inside the strategy's scope. Returns the callback that resets the
    eval average (see ``attach_eval_step``)."""
    # Evaluation needs no optimizer; compile's own default then (optimizer=None is refused).
    model.compile(**({"optimizer": optimizer} if optimizer is not None else {}), jit_compile=use_xla(config))
    model.distribute_reduction_method = "first"  # metrics are already global means; "auto" sums them
    attach_train_step(model)
    return attach_eval_step(model)


def progress_bar() -> Any:
    """Keras' progress bar, told that eval_loss is already an average (it would average it again)."""
    stateful = [f"{prefix}eval_{name}" for prefix in ("", "val_") for name in ("loss", "correct_tokens",
                                                                               "counted_tokens")]
    return keras.callbacks.ProgbarLogger(count_mode="steps", stateful_metrics=stateful)


def fit_plan(step: int, total: int, interval: int) -> list[tuple[int, int, int, int, int]]:
    """(initial_epoch, epochs, steps_per_epoch, first step, end step) for each ``fit`` call: usually one;
    two when resuming between checkpoint intervals (the rest of that interval first)."""
    plan = []
    if step % interval and step < total:
        end = min(total, (step // interval + 1) * interval)
        plan.append((step // interval, step // interval + 1, end - step, step, end))
        step = end
    if step < total:
        plan.append((step // interval, math.ceil(total / interval), interval, step, total))
    return plan


def agreed_stop(strategy: Any) -> Optional[int]:
    """The stop signal (``clm.preemption``) of any worker: under MultiWorkerMirroredStrategy the workers sum
    their votes (one small all-reduce per step), so all stop and write the checkpoint at the same step."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return preemption.stop_signal()
    votes = tf.constant(preemption.votes(), tf.int32)
    summed = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.identity(votes)), axis=None)
    return preemption.agree(summed.numpy().tolist())


class ClmCallback(keras.callbacks.Callback):
    """Counts optimizer steps across fit calls; logs the mean training loss of every ``logging_steps`` steps
    (as the Trainer); stops at the last step; at each Keras epoch end (a checkpoint or evaluation point, see
    ``interval_plan``) records the validation metrics and saves a checkpoint when one is due (every
    ``save_every`` steps and at the last step). After a stop signal (``stop`` returns it) it saves a checkpoint
    at the step just finished and leaves ``fit`` with ``Preempted``, skipping the validation of an epoch's end.

    Early stopping and the best model follow the Trainer's rules (EarlyStoppingCallback,
    ``_determine_best_metric``): an evaluation resets the patience counter only if its eval loss beats the best
    of the earlier ones by more than ``early_stopping_threshold``; the best (lowest) eval loss and the
    checkpoint saved with it are kept in ``trainer_state.json``, so a resumed run goes on counting."""

    def __init__(self, *, step: int, total_steps: int, steps_per_epoch: int, logging_steps: int,
                 learning_rate: Callable[[int], float], log_history: list[dict[str, Any]], loss_sum: float,
                 checkpointer: Optional[Checkpointer], state: dict[str, Any],
                 stop: Callable[[], Optional[int]] = preemption.stop_signal, save_every: Optional[int] = None,
                 writer: Any = None, early_stopping_patience: Optional[int] = None,
                 early_stopping_threshold: float = 0.0, track_best: bool = False,
                 on_evaluate: Optional[Callable[[int], None]] = None, resumed: Optional[dict[str, Any]] = None):
        super().__init__()
        self.stop_signal = stop
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch
        self.logging_steps, self.learning_rate, self.log_history = logging_steps, learning_rate, log_history
        self.loss_sum, self.checkpointer, self.state = loss_sum, checkpointer, state
        self.save_every = save_every or steps_per_epoch
        self.writer = writer  # a tf.summary writer for the global-step scalars, or None
        self.patience, self.threshold = early_stopping_patience, early_stopping_threshold
        self.track_best = track_best or bool(early_stopping_patience)
        self.on_evaluate = on_evaluate
        resumed = resumed or {}
        self.best_metric: Optional[float] = resumed.get("best_metric")
        self.best_global_step: Optional[int] = resumed.get("best_global_step")
        self.best_model_checkpoint: Optional[str] = resumed.get("best_model_checkpoint")
        self.patience_counter = int(resumed.get("early_stopping_patience_counter", 0))
        self.stopped_early = False
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
            self._log_interval()
        signum = self.stop_signal()
        if signum is not None:  # the loss of the steps since the last row, a checkpoint here, then out of fit
            self._log_interval()
            if self.checkpointer is not None:
                self.checkpointer.save(self.step, self.trainer_state(), keep=self.best_model_checkpoint)
            raise Preempted(signum, saved=True)
        if self.step >= self.total_steps:
            self.model.stop_training = True

    def _log_interval(self) -> None:
        if self._interval_steps:
            self._log({"step": self.step, "loss": self._interval_sum / self._interval_steps,
                       "learning_rate": self.learning_rate(self.step), "epoch": self.epoch()})
            self._interval_sum, self._interval_steps = 0.0, 0

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if logs and "val_eval_loss" in logs:
            metrics = eval_metrics(logs, "val_")
            self._log({"step": self.step, **metrics, "epoch": self.epoch()})
            if self.on_evaluate is not None:
                self.on_evaluate(self.step)
            if self.track_best:
                self._judge(metrics["eval_loss"])
        if self.checkpointer is not None and (self.step % self.save_every == 0 or self.step >= self.total_steps):
            if self.best_global_step == self.step:  # the Trainer's best_model_checkpoint: the best eval, saved
                self.best_model_checkpoint = str(self.checkpointer.path(self.step))
            self.checkpointer.save(self.step, self.trainer_state(), keep=self.best_model_checkpoint)
        if self.patience and self.patience_counter >= self.patience:
            self.stopped_early = self.model.stop_training = True

    def _judge(self, loss: float) -> None:
        """EarlyStoppingCallback.check_metric_value, then Trainer._determine_best_metric (lower is better)."""
        if self.patience:
            if self.best_metric is None or (loss < self.best_metric and abs(loss - self.best_metric) > self.threshold):
                self.patience_counter = 0
            else:
                self.patience_counter += 1
        if self.best_metric is None or loss < self.best_metric:
            self.best_metric, self.best_global_step = loss, self.step

    def trainer_state(self) -> dict[str, Any]:
        return {**self.state, "global_step": self.step, "epoch": self.epoch(), "train_loss_sum": self.loss_sum,
                "log_history": self.log_history, "best_metric": self.best_metric,
                "best_global_step": self.best_global_step, "best_model_checkpoint": self.best_model_checkpoint,
                "early_stopping_patience_counter": self.patience_counter}


def interval_plan(total: int, save_every: int, eval_every: Optional[int], eval_at_end: bool) -> tuple[int, list[int]]:
    """Keras epochs for ``fit``: their length (steps between consecutive checkpoint or evaluation points, the
    gcd of both schedules) and the 1-based epoch numbers that end at an evaluation (``validation_freq``).
    Evaluations fall on multiples of ``eval_every`` and, with ``eval_at_end``, also at the last step (the
    Trainer's epoch strategy always, its steps strategy from transformers 5 on)."""
    interval = math.gcd(save_every, eval_every) if eval_every else save_every
    due = []
    for number in range(1, math.ceil(total / interval) + 1):
        end = min(number * interval, total)
        if eval_every and (end % eval_every == 0 or (eval_at_end and end == total)):
            due.append(number)
    return interval, due


@dataclass
class StepPlan:
    """A run's optimizer steps as ``fit`` takes them: ``per_epoch`` steps make one pass over the training blocks
    (a stream: --max_steps), ``total`` in all, a checkpoint every ``save_every``; Keras epochs of ``interval``
    steps end at each checkpoint and evaluation point, and those numbered in ``validate_at`` evaluate."""

    per_epoch: int
    total: int
    save_every: int
    interval: int
    validate_at: list[int]

    @classmethod
    def for_run(cls, config: "TrainConfig", train_blocks: Optional[int], global_batch: int) -> "StepPlan":
        """``train_blocks``: None for a stream."""
        per_epoch = config.max_steps if train_blocks is None else steps_per_epoch(train_blocks, global_batch)
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
        save_every = config.save_steps or per_epoch
        kind, steps = config.eval_schedule
        eval_every = {"steps": steps, "epoch": per_epoch}.get(kind)
        # Also at the last step, as the Trainer of transformers 5 does (and this backend always did).
        interval, validate_at = interval_plan(total, save_every, eval_every, eval_at_end=True)
        return cls(per_epoch, total, save_every, interval, validate_at)
