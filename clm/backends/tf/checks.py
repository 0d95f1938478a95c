"""What the tf backend refuses, in one line, before anything is read or written (``TFBackend.check_config``):
PyTorch-only training options, a model family with no TF class, --report_to names with no Keras callback."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from clm.backends.tf.integrations import keras_integrations
from clm.errors import ConfigError

if TYPE_CHECKING:
    from clm.config import TrainConfig

logger = logging.getLogger("clm")


def check_config(config: "TrainConfig") -> None:
    """A ConfigError for what Keras fit or transformers' TF models cannot do; a warning for the PyTorch options
    this backend ignores."""
    if config.gradient_accumulation_steps > 1:
        raise ConfigError("--gradient_accumulation_steps > 1 is not supported by the tf backend (Keras fit has "
                          "no accumulation); raise --per_device_train_batch_size for the same update, or use "
                          "--backend pt")
    if config.fsdp or config.deepspeed:
        logger.warning("--fsdp and --deepspeed are PyTorch options; the tf backend ignores them")
    if config.torch_compile:
        raise ConfigError("--torch_compile is a PyTorch option; the tf backend compiles its steps with XLA "
                          "(on by default, --no_jit_compile turns it off): drop the flag, or use --backend pt")
    if config.dataloader_num_workers:
        logger.warning("--dataloader_num_workers is a PyTorch option; the tf backend ignores it (tf.data "
                       "prefetches batches in the background)")
    if config.gradient_checkpointing:
        raise ConfigError("--gradient_checkpointing is not supported by the tf backend (transformers' TF models "
                          "do not implement it); use --backend pt, or lower --per_device_train_batch_size")
    from clm.data.examples import packs_examples
    from clm.families import check_config_family, model_type

    check_config_family("tf", config)
    if packs_examples(config) and not config.trust_remote_code:
        from clm.backends.tf.packed import check_packed_family

        check_packed_family(model_type(config))
    keras_integrations(config)  # --report_to names with no Keras callback, or not installed: one line
