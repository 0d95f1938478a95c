"""tf.distribute for the tf backend and the keras backend on TensorFlow: the strategy for --tf_strategy, which
process is the chief, and explicit data sharding. Model, optimizer and compile are built inside the strategy's
scope. TensorFlow is imported by the caller's runtime (tf-keras beside Keras 3 for the tf backend, Keras 3 for
keras), so this module imports it only inside its functions."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger("clm")


def is_chief() -> bool:
    """The chief of a multi-worker cluster (TF_CONFIG), else the one process."""
    spec = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = spec.get("task") or {}
    if task.get("type") in (None, "chief"):
        return True
    cluster = spec.get("cluster") or {}
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster


def shard_by_data(dataset: "tf.data.Dataset") -> "tf.data.Dataset":
    """Explicit sharding for multi-worker training: every worker builds the same seeded batches and keeps its
    share of each global batch (AutoShardPolicy.DATA), so a step sees the blocks one process would see."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def make_strategy(name: str) -> "tf.distribute.Strategy":
    """The distribution strategy for --tf_strategy; model, optimizer and compile are built in its scope."""
    import tensorflow as tf

    if name == "auto":  # what the machine and TF_CONFIG describe
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
        if sum(len(tasks) for role, tasks in cluster.items() if role in ("chief", "worker")) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "one_device":
        return tf.distribute.get_strategy()  # the default strategy: one device, no wrapping
    if name == "mirrored":  # the GPUs; without GPUs, the logical CPU devices if a process made several
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multi_worker":
        from clm import preemption

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # Its coordination service installs TF's own SIGTERM handler (a preemption notifier clm does not use),
        # which would swallow the signal: clm's handlers take it back.
        preemption.reclaim()
        return strategy
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown tf_strategy {name!r}")  # TrainConfig validates; kept for direct callers


def xla_can_compile(strategy: "tf.distribute.Strategy") -> bool:
    """Whether XLA can compile a step under ``strategy``: TensorFlow has no XLA collectives on CPU devices, so a
    multi-device strategy on CPUs (several workers, or mirrored CPUs) runs plain tf.functions."""
    import tensorflow as tf

    if strategy.num_replicas_in_sync > 1 or isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        if not tf.config.list_logical_devices("GPU") and not tf.config.list_logical_devices("TPU"):
            logger.info("XLA is off: TensorFlow cannot compile collectives for CPU devices")
            return False
    return True
