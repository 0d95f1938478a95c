"""The callback that runs a keras fit the Trainer's way: per-step losses from Keras' running mean, a log row every
--logging_steps, evaluations on --eval_strategy's schedule (and at the last step), early stopping and the best
checkpoint judged as the Trainer's EarlyStoppingCallback and ``_determine_best_metric`` judge them (lower eval
loss is better), checkpoints every --save_steps (else each epoch), and, after a stop signal, a checkpoint at the
step's end and a stop (``clm.preemption``). What a resumed run needs is in ``state()``, saved with each
checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

from clm import preemption

if TYPE_CHECKING:
    from clm.config import TrainConfig


class RunLog:
    def __init__(self, config: "TrainConfig", per_epoch: int, total: int, start: dict[str, Any],
                 evaluate: Callable[[], dict[str, float]], save: Callable[[int, dict[str, Any], Optional[str]], Any]
                 ) -> None:
        self.config, self.per_epoch, self.total = config, per_epoch, total
        self.evaluate, self.save = evaluate, save
        self.step = start.get("global_step", 0)
        self.history: list[dict[str, Any]] = list(start.get("log_history", []))
        self.loss_sum = start.get("train_loss_sum", 0.0)
        self.best_metric: Optional[float] = start.get("best_metric")
        self.best_global_step: Optional[int] = start.get("best_global_step")
        self.best_model_checkpoint: Optional[str] = start.get("best_model_checkpoint")
        self.patience_counter: int = start.get("early_stopping_patience_counter", 0)
        self.stopped_early = False
        self._interval = self._running = 0.0
        self._interval_steps = 0
        self.saved_at: Optional[int] = None

    def state(self) -> dict[str, Any]:
        return {"global_step": self.step, "epoch": self.step / self.per_epoch, "log_history": self.history,
                "train_loss_sum": self.loss_sum, "best_metric": self.best_metric,
                "best_global_step": self.best_global_step, "best_model_checkpoint": self.best_model_checkpoint,
                "early_stopping_patience_counter": self.patience_counter}

    def _judge(self, loss: float) -> None:
        """EarlyStoppingCallback.check_metric_value, then Trainer._determine_best_metric (lower is better)."""
        patience, threshold = self.config.early_stopping_patience, self.config.early_stopping_threshold
        if patience:
            if self.best_metric is None or (loss < self.best_metric and abs(loss - self.best_metric) > threshold):
                self.patience_counter = 0
            else:
                self.patience_counter += 1
        if self.best_metric is None or loss < self.best_metric:
            self.best_metric, self.best_global_step = loss, self.step

    def keras_callback(self, keras: Any) -> Any:
        log = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
                # The property self.model brings the weights up to date on JAX (a copy of every weight): only
                # at the steps that read them (evaluate, save, the learning rate); self._model otherwise.
                log.batch_end(batch, logs or {}, self._model, lambda: self.model)

        return Callback()

    def batch_end(self, batch: int, logs: dict[str, Any], model: Any, synced: Callable[[], Any]) -> None:
        running = float(logs["loss"]) * (batch + 1)  # Keras reports the mean since this fit began
        loss, self._running = running - self._running, running
        self.step += 1
        self.loss_sum += loss
        self._interval += loss
        self._interval_steps += 1
        step, config = self.step, self.config
        if step % config.logging_steps == 0 or step == self.total:
            lr = synced().optimizer.learning_rate
            self.history.append({"step": step, "epoch": step / self.per_epoch,
                                 "loss": self._interval / self._interval_steps,
                                 "learning_rate": float(getattr(lr, "numpy", lambda: lr)())})
            self._interval, self._interval_steps = 0.0, 0
        kind, every = config.eval_schedule
        if kind != "no" and (step == self.total or (kind == "steps" and step % every == 0) or
                             (kind == "epoch" and step % self.per_epoch == 0)):
            synced()
            metrics = self.evaluate()
            self.history.append({"step": step, "epoch": step / self.per_epoch, **metrics})
            self._judge(metrics["eval_loss"])
        save_every = config.save_steps or self.per_epoch
        stopping = preemption.stop_signal() is not None
        early = bool(config.early_stopping_patience) and self.patience_counter >= config.early_stopping_patience
        if step % save_every == 0 or step == self.total or early or (stopping and self.saved_at != step):
            synced()
            if self.best_global_step == step:  # the Trainer's best_model_checkpoint: the best eval, saved
                self.best_model_checkpoint = str(self.save_path(step))
            self.save(step, self.state(), self.best_model_checkpoint)
            self.saved_at = step
        if stopping or early:
            self.stopped_early = early
            model.stop_training = True

    def save_path(self, step: int) -> Any:
        from pathlib import Path

        from clm.checkpoints import checkpoint_name

        return Path(self.config.output_dir) / checkpoint_name(step)

    def mean_loss(self) -> Optional[float]:
        return self.loss_sum / self.step if self.step else None
