"""The Trainer's recipe in Keras 3 terms: the loss (mean next-token cross-entropy over labels that are not -100,
in float32), AdamW with the Trainer's schedules, decay groups and global-norm clipping, fixed-shape batches in a
seeded order, the eval loss over every scored token with next-token accuracy, and the callback that logs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from clm.collate import IGNORE_INDEX, collate_blocks

if TYPE_CHECKING:
    from datasets import Dataset

    from clm.config import TrainConfig

NO_DECAY = ["bias", "gamma", "beta", "scale"]  # biases and LayerNorm/RMSNorm weights, as the Trainer's groups


def next_token_labels(labels: np.ndarray) -> np.ndarray:
    """The label each position predicts: labels shifted left, -100 in the last position."""
    out = np.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def batch_arrays(rows: list[dict[str, Any]], padding: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Rows (plus ``padding`` rows that score nothing, for a fixed shape) as the model's inputs and the next-token
    labels. A padding row attends to its own dummy tokens: a fully masked row would give NaN logits."""
    batch = collate_blocks(rows)
    ids, labels = batch["input_ids"].astype(np.int32), batch["labels"]
    # int32, KerasHub's own padding-mask dtype (a bool one also breaks Keras' first-batch reduce under tf.distribute)
    mask = batch.get("attention_mask", np.ones_like(ids)).astype(np.int32)
    x = {"token_ids": ids, "padding_mask": mask}
    if "position_ids" in batch:  # packed examples (bfd/none)
        x["position_ids"] = batch["position_ids"].astype(np.int32)
    if padding:
        for name, fill in (("token_ids", 0), ("padding_mask", 1), ("position_ids", 0)):
            if name in x:
                x[name] = np.concatenate([x[name], np.full((padding, ids.shape[1]), fill, x[name].dtype)])
        labels = np.concatenate([labels, np.full((padding, ids.shape[1]), IGNORE_INDEX)])
    return x, next_token_labels(labels).astype(np.int32)


def make_loss(keras: Any, distributed: bool = False) -> Any:
    """``distributed``: under a tf.distribute strategy with several replicas (in a replica context)."""
    ops = keras.ops

    def causal_lm_loss(y_true: Any, y_pred: Any) -> Any:
        """Mean token loss over the labels that are not -100 (y_true: the next-token labels), in float32."""
        y_true = ops.cast(y_true, "int32")
        valid = ops.not_equal(y_true, IGNORE_INDEX)
        logits = ops.cast(y_pred, "float32")
        if keras.backend.backend() == "jax":  # Keras' JAX loss builds a one-hot (batch, length, vocab) tensor
            picked = ops.take_along_axis(logits, ops.expand_dims(ops.where(valid, y_true, 0), -1), axis=-1)[..., 0]
            loss = ops.logsumexp(logits, axis=-1) - picked
        else:  # TensorFlow's fused sparse softmax cross-entropy
            loss = keras.losses.sparse_categorical_crossentropy(ops.where(valid, y_true, 0), logits, from_logits=True)
        weights = ops.cast(valid, "float32")
        count = ops.sum(weights)
        if distributed:  # each replica divides by every replica's tokens: the summed gradients are one device's
            import tensorflow as tf

            replica = tf.distribute.get_replica_context()  # None while Keras builds the model, cross-replica
            if replica is not None:
                count = replica.all_reduce(tf.distribute.ReduceOp.SUM, count)
        return ops.sum(loss * weights) / ops.maximum(count, 1.0)

    return causal_lm_loss


def make_schedule(keras: Any, config: "TrainConfig", total_steps: int) -> Any:
    """The Trainer's schedule as a function of the optimizer step (0 at the first update)."""
    ops = keras.ops
    peak = config.effective_learning_rate
    warmup = 0 if config.lr_scheduler_type == "constant" else (
        config.warmup_steps or math.ceil(config.warmup_ratio * total_steps))
    kind = config.lr_scheduler_type

    class TrainerSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            step = ops.cast(step, "float32")
            if kind == "constant":
                return ops.convert_to_tensor(peak, "float32")
            rise = step / max(1, warmup)
            progress = (step - warmup) / max(1, total_steps - warmup)
            if kind == "cosine":
                fall = 0.5 * (1.0 + ops.cos(math.pi * ops.clip(progress, 0.0, 1.0)))
            else:
                fall = ops.maximum(0.0, 1.0 - progress)
            return peak * ops.where(step < warmup, rise, fall)

        def get_config(self) -> dict[str, Any]:
            return {}

    return TrainerSchedule()


def make_optimizer(keras: Any, config: "TrainConfig", total_steps: int) -> Any:
    """AdamW as the Trainer sets it up. On TensorFlow, embedding gradients (IndexedSlices) are made dense first:
    Keras' Adam squares each slice, so a token repeated in a batch got a wrong second moment."""

    class AdamW(keras.optimizers.AdamW):
        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> Any:
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                if isinstance(gradient, tf.IndexedSlices):
                    gradient = tf.convert_to_tensor(gradient)
            return super().update_step(gradient, variable, learning_rate)

        def _clip_gradients(self, grads: list[Any]) -> list[Any]:
            """On TensorFlow the global norm is that of the dense gradients (an IndexedSlices norm counts a
            repeated token's rows apart). Under tf.distribute, Keras clips each replica's gradients before it sums
            them; the Trainer (and one device) clips the sum. So: sum here, clip, and hand each replica 1/n of it
            for Keras' own sum."""
            if self.global_clipnorm is None or keras.backend.backend() != "tensorflow":
                return super()._clip_gradients(grads)
            import tensorflow as tf

            dense = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            replica = tf.distribute.get_replica_context()
            n = replica.num_replicas_in_sync if replica is not None else 1
            if n == 1:
                return super()._clip_gradients(dense)
            summed = replica.all_reduce(tf.distribute.ReduceOp.SUM, [g for g in dense if g is not None])
            it = iter(super()._clip_gradients(summed))
            return [None if g is None else next(it) / n for g in dense]

    optimizer = AdamW(learning_rate=make_schedule(keras, config, total_steps), weight_decay=config.weight_decay,
                      beta_1=config.adam_beta1, beta_2=config.adam_beta2, epsilon=config.adam_epsilon,
                      global_clipnorm=config.max_grad_norm or None)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer


def train_batches(ds: Any, batch_size: int, seed: int, first: int, total_steps: int) -> Any:
    """The batches of steps [first, total_steps), fixed shape (a tf.data pipeline, which KerasHub's ``fit`` takes
    on TensorFlow and JAX alike): each epoch in a seeded order, its last batch filled with padding rows that score
    nothing. A step's batch depends on the seed and the step alone, so a resumed run reads what it would have."""
    import tensorflow as tf

    if not hasattr(ds, "__len__"):  # --streaming
        return _stream_batches(ds, batch_size, first, total_steps)
    n, length = len(ds), len(ds[0]["input_ids"])
    per_epoch = max(1, math.ceil(n / batch_size))

    def batches() -> Any:
        for step in range(first, total_steps):
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng([seed, epoch]).permutation(n)[k * batch_size:(k + 1) * batch_size]
            yield batch_arrays([ds[int(i)] for i in order], padding=batch_size - len(order))

    return _dataset(batches, batch_size, length, total_steps - first, "position_ids" in ds.column_names)


def _stream_batches(stream: Any, batch_size: int, first: int, total_steps: int) -> Any:
    """Batches of a packed stream (--streaming), the stream read again from the start if it runs out; the rows of
    the first ``first`` steps are passed over, so a resumed run continues where the checkpoint left the stream
    (its shuffle is seeded, so its order repeats)."""
    length = stream.features["input_ids"].length

    def rows() -> Any:
        epoch = 0
        while True:
            stream.set_epoch(epoch)
            empty = True
            for row in stream:
                empty = False
                yield row
            if empty:
                return
            epoch += 1

    def batches() -> Any:
        held, skip = [], first * batch_size
        for row in rows():
            if skip:
                skip -= 1
                continue
            held.append(row)
            if len(held) == batch_size:
                yield batch_arrays(held)
                held = []

    return _dataset(batches, batch_size, length, total_steps - first, "position_ids" in stream.features)


def _dataset(batches: Any, batch_size: int, length: int, steps: int, packed: bool) -> Any:
    import tensorflow as tf

    shape = (batch_size, length)
    inputs = {"token_ids": tf.TensorSpec(shape, tf.int32), "padding_mask": tf.TensorSpec(shape, tf.int32)}
    if packed:
        inputs["position_ids"] = tf.TensorSpec(shape, tf.int32)
    spec = (inputs, tf.TensorSpec(shape, tf.int32))
    batched = tf.data.Dataset.from_generator(batches, output_signature=spec)
    return batched.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def evaluate(model: Any, ds: "Dataset", batch_size: int, distributed: bool = False) -> tuple[float, Optional[float]]:
    """(eval loss over every scored token, next-token accuracy): logits batch by batch, reduced in NumPy.
    ``distributed`` (a tf.distribute strategy): each batch through ``predict``, which splits it across the
    replicas; ``predict_on_batch`` would give every replica the whole batch."""
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(ds), batch_size):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        x, y = batch_arrays(rows, padding=batch_size - len(rows))
        if distributed:
            import tensorflow as tf

            logits = model.predict(tf.data.Dataset.from_tensors(x), verbose=0)
        else:
            logits = model.predict_on_batch(x)
        logits = np.asarray(logits, dtype=np.float32)
        scored = y != IGNORE_INDEX
        top = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, np.where(scored, y, 0)[..., None], axis=-1)[..., 0]
        total += float(((log_norm - picked) * scored).sum())
        count += int(scored.sum())
        correct += int(((logits.argmax(-1) == y) & scored).sum())
    if count == 0:
        return float("nan"), None
    from clm.metrics import accuracy_from_counts

    return total / count, accuracy_from_counts(correct, count)
