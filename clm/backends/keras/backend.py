"""Keras 3 backend: KerasHub causal LMs trained by Keras ``compile``/``fit`` on TensorFlow or JAX
(--keras_backend), from and to Hugging Face checkpoints. The hooks of ``clm.backends.base.Backend``.

Checkpoints (``checkpoints``) carry weights, optimizer and random-generator state, so a resumed run continues
as an uninterrupted one; ``callback`` logs, evaluates and checkpoints on the Trainer's schedules and stops at a
checkpoint on a stop signal. Several devices: Keras' DataParallel on JAX, --tf_strategy mirrored on TensorFlow.
--push_to_hub: ``clm.hub_push`` (checkpoints as --hub_strategy says, the final folder at the end). --lora_r:
``lora`` (PEFT's adapters, written in PEFT's format). Packed examples (bfd/none): ``model.packed_model`` runs the backbone's layers with a same-example mask.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Optional

from clm import reporting
from clm.backends.base import Backend, FitResult
from clm.backends.keras import lora, trainer
from clm.backends.keras.callback import RunLog
from clm.backends.keras.checkpoints import Checkpointer
from clm.backends.keras.model import check_family, load_model, load_pretrained, packed_model, save_pretrained
from clm.backends.keras.runtime import load_keras
from clm.errors import ConfigError
from clm.lora import ADAPTER_DIR

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger("clm")


class KerasBackend(Backend):
    name = "keras"

    def __init__(self) -> None:
        self.keras: Any = None
        self.keras_hub: Any = None
        self.config: Optional["TrainConfig"] = None
        self.model: Any = None
        self.causal_lm: Any = None
        self.tokenizer: Any = None
        self.train_data: Any = None
        self.test_data: Any = None
        self.total_steps = 0
        self._world = 1
        self._strategy: Any = None  # on TensorFlow: the tf.distribute strategy (--tf_strategy)
        self._hub: Any = None  # --push_to_hub: clm.hub_push.HubPush

    @property
    def world_size(self) -> int:
        return self._world

    def _load(self, name: str = "tensorflow") -> None:
        if self.keras is None:
            self.keras, self.keras_hub = load_keras(name)

    # ------------------------------------------------------------------------------------------ checks
    def check_config(self, config: "TrainConfig") -> None:
        from clm.families import model_config

        unsupported = {
            "--gradient_accumulation_steps > 1": config.gradient_accumulation_steps > 1,
            "--fp16": config.fp16, "--gradient_checkpointing": config.gradient_checkpointing,
        }
        refused = [flag for flag, value in unsupported.items() if value]
        if refused:
            raise ConfigError(f"{refused[0]} is not supported by the keras backend yet; drop it or use --backend pt "
                              "or tf")
        if config.keras_backend == "tensorflow" and (config.tf_strategy in ("multi_worker", "tpu")
                                                     or os.environ.get("TF_CONFIG")):
            raise ConfigError(f"--tf_strategy {config.tf_strategy} (or TF_CONFIG) is not supported by the keras "
                              "backend yet (one machine: mirrored); use --backend tf")
        others = [name for name in config.report_to if name not in ("tensorboard", "none")]
        if others:
            raise ConfigError(f"--report_to {others[0]} is not supported by the keras backend (tensorboard is); "
                              "drop it")
        if not config.uses_builtin_model and not config.trust_remote_code:
            check_family(config.model_name_or_path, model_config(config))
        self._load(config.keras_backend)

    # ------------------------------------------------------------------------------------------ hooks
    def load_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
        self._load(config.keras_backend)
        self._distribute(config)
        self.keras.utils.set_random_seed(config.seed)
        if config.bf16:
            self.keras.config.set_dtype_policy("mixed_bfloat16")
        with self._scope():
            model = load_model(self.keras_hub, config, tokenizer)
            if config.lora_r:  # before compile: the optimizer sees only A and B
                lora.apply_from_config(self.keras, model, config)
        return model

    def _distribute(self, config: "TrainConfig") -> None:
        """Several devices, set before the model is built. JAX: Keras' DataParallel over every device (weights
        replicated, each batch split across devices). TensorFlow: the tf.distribute strategy of --tf_strategy, as
        the tf backend makes it (mirrored: the GPUs, else the logical CPUs a process made)."""
        keras = self.keras
        if keras.backend.backend() == "tensorflow":
            if self._strategy is None:
                from clm.backends.tf.distribute import make_strategy

                self._strategy = make_strategy(config.tf_strategy)
                self._world = self._strategy.num_replicas_in_sync
                if self._world > 1:
                    logger.info("Training on %d devices (tf.distribute %s)", self._world,
                                type(self._strategy).__name__)
            return
        if keras.distribution.distribution() is not None:
            return
        devices = keras.distribution.list_devices()
        if len(devices) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
            self._world = len(devices)
            logger.info("Training data-parallel on %d devices (Keras DataParallel on JAX)", self._world)

    def _scope(self) -> Any:
        """The tf.distribute strategy's scope (model, optimizer and compile are made in it); else nothing."""
        return self._strategy.scope() if self._strategy is not None else contextlib.nullcontext()

    def _tf_replicas(self) -> bool:
        """Training under a tf.distribute strategy with several replicas."""
        return self._strategy is not None and self._world > 1

    def _jit(self, config: "TrainConfig") -> bool:
        """XLA on JAX always; on TensorFlow --jit_compile where XLA can compile the strategy's step."""
        if self._strategy is None:
            return True
        from clm.backends.tf.distribute import xla_can_compile

        return config.jit_compile and xla_can_compile(self._strategy)

    def prepare(self, model: Any, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                train: Optional["Dataset"], test: "Dataset") -> None:
        self.causal_lm = model  # what is saved and generates; self.model is what trains
        if "position_ids" in test.column_names:  # packed examples: attention kept inside each one
            with self._scope():
                model = packed_model(self.keras, self.keras_hub, model)
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_data, self.test_data = train, test
        self.batch_size = config.per_device_train_batch_size * self._world  # the global batch
        if train is not None:
            per_epoch = self._steps_per_epoch(train)
            self.total_steps = config.max_steps if config.max_steps > 0 else math.ceil(
                config.num_train_epochs * per_epoch)
        if train is not None and config.push_to_hub:  # the repo is created now: a bad token fails before training
            self._start_push(config)
        with self._scope():
            model.compile(optimizer=trainer.make_optimizer(self.keras, config, max(1, self.total_steps)),
                          loss=trainer.make_loss(self.keras, distributed=self._tf_replicas()), weighted_metrics=[],
                          jit_compile=self._jit(config))

    def _steps_per_epoch(self, train: Any) -> int:
        if not hasattr(train, "__len__"):  # a stream (--streaming needs --max_steps): the run is one epoch
            return max(1, self.config.max_steps)
        return max(1, math.ceil(len(train) / self.batch_size))

    def evaluate(self) -> dict[str, float]:
        loss, accuracy = trainer.evaluate(self.model, self.test_data,
                                          self.config.per_device_eval_batch_size * self._world,
                                          distributed=self._tf_replicas())
        if self.sample_prompts:
            self.sample_generations(self.causal_lm, self.tokenizer, self.config)
        return {"eval_loss": loss, **({"eval_accuracy": accuracy} if accuracy is not None else {})}

    def fit(self, resume_from: Optional[str]) -> FitResult:
        config, keras = self.config, self.keras
        per_epoch = self._steps_per_epoch(self.train_data)
        saver = Checkpointer(keras, self.model, self.tokenizer, config.output_dir, config.save_total_limit,
                             export=self.causal_lm)
        start = saver.restore(resume_from) if resume_from else {}
        def save(step: int, state: dict[str, Any], best: Optional[str]) -> None:
            path = saver.save(step, state, keep=best)
            if self._hub is not None:  # --hub_strategy's checkpoint pushes, in the background
                self._hub.on_save(path)

        log = RunLog(config, per_epoch, self.total_steps, start, self.evaluate, save)
        first = log.step
        callbacks = [log.keras_callback(keras)]
        if config.reports("tensorboard"):
            callbacks.append(keras.callbacks.TensorBoard(log_dir=reporting.tensorboard_dir(config.output_dir),
                                                         update_freq=config.logging_steps))
        began = time.perf_counter()
        if first < self.total_steps:
            batches = trainer.train_batches(self.train_data, self.batch_size, config.seed, first, self.total_steps)
            self.model.fit(batches, epochs=1, callbacks=callbacks, shuffle=False, verbose=2)
        if log.stopped_early:
            logger.info("Early stopping at step %d: no eval-loss improvement in %d evaluations", log.step,
                        config.early_stopping_patience)
        if config.load_best_model_at_end and log.best_model_checkpoint:
            logger.info("Loading best model from %s (eval loss %s)", log.best_model_checkpoint, log.best_metric)
            saver.restore_best(log.best_model_checkpoint, log.step, keep_only_best=config.save_total_limit == 1)
        return FitResult(global_step=log.step, start_step=first, train_loss=log.mean_loss(),
                         epoch=log.step / per_epoch, runtime=time.perf_counter() - began, log_history=log.history)

    def _start_push(self, config: "TrainConfig") -> None:
        if self._hub is None:
            from clm.hub_push import HubPush

            self._hub = HubPush(config.output_dir, config.hub_model_id, private=config.hub_private_repo or None,
                                strategy=config.hub_strategy)

    def push(self, config: "TrainConfig") -> None:
        self._start_push(config)
        self._hub.finish()

    def save_model(self, directory: str) -> None:
        save_pretrained(self.causal_lm, self.tokenizer, directory)  # LoRA: the merged model
        if self.config is not None and self.config.lora_r:
            lora.save_adapter(self.causal_lm, f"{directory}/{ADAPTER_DIR}", self.config)

    def parameter_counts(self) -> dict[str, int]:
        count = lambda weights: int(sum(math.prod(w.shape) for w in weights))  # noqa: E731
        return {"trainable_parameters": count(self.model.trainable_weights),
                "total_parameters": count(self.model.weights)}

    def load_pretrained(self, path: str) -> Any:
        self._load()
        return load_pretrained(self.keras_hub, path)

    def set_seed(self, seed: int) -> None:
        self._load()
        self.keras.utils.set_random_seed(seed)

    def generate_ids(self, model: Any, tokenizer: "PreTrainedTokenizerBase", prompt: str,
                     add_special_tokens: bool = True, max_new_tokens: int = 100, do_sample: bool = True,
                     top_k: int = 50, top_p: float = 1.0, **_: Any) -> list[int]:
        import numpy as np

        samplers = self.keras_hub.samplers
        model.sampler = (samplers.TopPSampler(p=top_p, k=top_k or None) if do_sample and top_p < 1
                         else samplers.TopKSampler(k=top_k) if do_sample and top_k else
                         samplers.RandomSampler() if do_sample else samplers.GreedySampler())
        model.generate_function = None  # built again for this sampler
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        length = len(ids) + max_new_tokens
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(ids)] = ids
        mask = np.zeros((1, length), bool)
        mask[0, :len(ids)] = True
        stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        out = model.generate({"token_ids": tokens, "padding_mask": mask}, max_length=length, stop_token_ids=stop)
        kept = np.asarray(out["token_ids"])[0][np.asarray(out["padding_mask"])[0].astype(bool)]
        return kept.tolist()
