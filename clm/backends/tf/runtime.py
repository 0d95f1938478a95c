"""TensorFlow for the tf backend, imported with the environment transformers 4.57's TF classes need.

transformers' TF models are Keras 2 models: with TensorFlow >= 2.16 they need ``tf-keras`` beside Keras 3, and
``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` that same Keras 2. Every module of this backend imports TensorFlow
from here, so the variable is set before the first import.
"""

from __future__ import annotations

import json
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras", "make_strategy", "enable_determinism_if_asked", "shard_by_data"]


def shard_by_data(dataset: "tf.data.Dataset") -> "tf.data.Dataset":
    """Explicit sharding for multi-worker training: every worker builds the same seeded batches and keeps its
    share of each global batch (AutoShardPolicy.DATA), so a step sees the blocks one process would see."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def make_strategy(name: str) -> "tf.distribute.Strategy":
    """The distribution strategy for --tf_strategy; model, optimizer and compile are built in its scope."""
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
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown tf_strategy {name!r}")  # TrainConfig validates; kept for direct callers


def enable_determinism_if_asked() -> bool:
    """TensorFlow's own switch, TF_DETERMINISTIC_OPS=1, turns on op determinism (reproducible kernels and
    tf.data order, at some speed cost); clm's seeds, data order and checkpointed dropout RNG do the rest."""
    if os.environ.get("TF_DETERMINISTIC_OPS", "").lower() in ("1", "true"):
        tf.config.experimental.enable_op_determinism()
        return True
    return False
