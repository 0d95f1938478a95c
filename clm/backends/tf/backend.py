"""TensorFlow backend: TFAutoModelForCausalLM trained by Keras compile/fit, with the guide's TensorFlow tools.
The hooks of ``clm.backends.base.Backend``; the run sequence itself is the base class's.

The recipe is the PyTorch Trainer's (``optimizer``): AdamW with decoupled weight decay (none on biases and
LayerNorm), global-norm clipping, linear/cosine/constant schedules with warmup, ``steps_per_epoch =
ceil(train_blocks / global_batch)``, ``max_steps`` overriding epochs. Batches come from
``model.prepare_tf_dataset`` with the shared NumPy collator (``batches``); the loss is transformers' causal-LM
loss, computed by ``trainer.causal_lm_loss`` without copying the logits; the steps are XLA-compiled (--jit_compile).
Reproducibility: seeds, data order and dropout RNG are fixed by ``--seed``; set ``TF_DETERMINISTIC_OPS=1``
(TensorFlow's switch, honoured via ``tf.config.experimental.enable_op_determinism``) for bit-identical
kernels, e.g. for comparing a resumed run with an uninterrupted one.

This module holds the hooks; each concern lives beside it: ``checks`` (what the backend refuses),
``distribute`` (the strategy), ``trainer`` (the step plan, the Keras steps and the callback that logs, evaluates
and checkpoints), ``checkpoints`` (resume and the best model), ``integrations`` (--report_to), ``push``
(--push_to_hub).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

from clm.backends.tf.runtime import enable_determinism_if_asked, keras, tf

from clm.backends.base import Backend, FitResult  # noqa: E402  (after runtime: TF_USE_LEGACY_KERAS first)
from clm.backends.tf import checks, distribute
from clm.backends.tf.batches import eval_indices, stream_batches, tf_batches, train_indices
from clm.backends.tf.checkpoints import Checkpointer
from clm.backends.tf.integrations import Reports
from clm.backends.tf.model import float32_scores, load_model, load_pretrained, precision
from clm.backends.tf.optimizer import make_optimizer
from clm.backends.tf.packed import enable_packed_attention
from clm.backends.tf.trainer import (ClmCallback, StepPlan, agreed_stop, compile_model, eval_metrics, fit_plan,
                                     progress_bar)
from clm.backends.tf.weights import save_pretrained

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig
    from clm.hub_push import HubPush

logger = logging.getLogger("clm")


class TFBackend(Backend):
    name = "tf"

    def __init__(self) -> None:
        self._strategy: Any = None  # tf.distribute strategy, made once the data is prepared (_ensure_strategy)
        self._world = 1
        # set by prepare()
        self.config: Optional["TrainConfig"] = None
        self.model: Any = None
        self.tokenizer: Optional["PreTrainedTokenizerBase"] = None
        self.train_data: Optional["Dataset"] = None  # None when only evaluating; an IterableDataset with --streaming
        self.plan: Optional[StepPlan] = None  # None when only evaluating
        self.optimizer: Any = None
        self.reset_eval: Any = None  # the Keras callback that resets the eval averages (trainer.attach_eval_step)
        self.eval_batches: Any = None
        self.reports: Optional[Reports] = None  # --report_to, while training
        self._step = 0  # the global step the weights are at, for what evaluate() logs
        self._hub: Optional["HubPush"] = None  # --push_to_hub, on the chief

    @property
    def is_main_process(self) -> bool:
        return distribute.is_chief()

    @property
    def world_size(self) -> int:
        return self._world

    def check_config(self, config: "TrainConfig") -> None:
        checks.check_config(config)

    def _ensure_strategy(self, config: "TrainConfig") -> None:
        if self._strategy is None:  # after data preparation: a multi-worker strategy connects the cluster
            enable_determinism_if_asked()
            self._strategy = distribute.make_strategy(config.tf_strategy)
            self._world = self._strategy.num_replicas_in_sync

    def load_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
        self._ensure_strategy(config)
        with self._strategy.scope(), precision(config):
            return load_model(config, tokenizer)

    def prepare(self, model: Any, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                train: Optional["Dataset"], test: "Dataset") -> None:
        self._ensure_strategy(config)
        if "position_ids" in test.column_names:  # packed examples: attention kept inside each one
            enable_packed_attention(model)
        self.config, self.model, self.tokenizer, self.train_data = config, model, tokenizer, train
        if train is not None:  # a stream (--streaming) has no length
            self.plan = StepPlan.for_run(config, len(train) if hasattr(train, "__len__") else None,
                                         config.per_device_train_batch_size * self._world)
        with self._strategy.scope(), precision(config):
            self.optimizer = make_optimizer(config, model, self.plan.total) if train is not None else None
            self.reset_eval = compile_model(model, config, self.optimizer)
        eval_batch = config.per_device_eval_batch_size * self._world
        self.eval_batches = tf_batches(model, test, eval_indices(len(test), eval_batch), eval_batch)
        self._step = 0
        self.reports = None
        if train is not None:
            self._start_push(config)
            self.reports = Reports(config, self.is_main_process)

    def evaluate(self) -> dict[str, float]:
        logs = self.model.evaluate(self.eval_batches, callbacks=[self.reset_eval, progress_bar()], return_dict=True)
        self._log_samples(self._step)
        return eval_metrics(logs)

    def _log_samples(self, step: int) -> None:
        """Sample generations at an evaluation (main process only), logged as TensorBoard text."""
        if not self.sample_prompts:
            return
        samples = self.sample_generations(self.model, self.tokenizer, self.config)
        if self.reports is not None:
            self.reports.log_samples(samples, step)

    @contextlib.contextmanager
    def seeded_rng(self, seed: int) -> Iterator[None]:
        # The global TF seed only (not Python's or NumPy's): dropout draws from its own per-layer generators
        # and the data order from a seeded NumPy generator, so training's randomness is left as it was.
        tf.random.set_seed(seed)
        yield

    def fit(self, resume_from: Optional[str]) -> FitResult:
        config, model, plan = self.config, self.model, self.plan
        batch = config.per_device_train_batch_size * self._world
        with self._strategy.scope():
            checkpointer = Checkpointer(model, self.tokenizer, config.output_dir, config.save_total_limit,
                                        self.is_main_process)
        run = {"backend": self.name, "max_steps": plan.total, "steps_per_epoch": plan.per_epoch,
               "global_batch_size": batch, "seed": config.seed}
        state = checkpointer.restore(resume_from) if resume_from else {}
        for key in ("steps_per_epoch", "global_batch_size", "seed"):
            if key in state and state[key] != run[key]:
                logger.warning("%s was %s in %s and is %s now: the resumed run will not match an uninterrupted "
                               "one", key, state[key], resume_from, run[key])
        start = int(state.get("global_step", 0))
        callback = ClmCallback(
            step=start, total_steps=plan.total, steps_per_epoch=plan.per_epoch,
            logging_steps=config.logging_steps, learning_rate=lambda s: float(self.optimizer.learning_rate(s)),
            log_history=list(state.get("log_history") or []), loss_sum=float(state.get("train_loss_sum", 0.0)),
            checkpointer=checkpointer, state=run, writer=self.reports.writer,
            stop=lambda: agreed_stop(self._strategy), save_every=plan.save_every,
            early_stopping_patience=config.early_stopping_patience,
            early_stopping_threshold=config.early_stopping_threshold, track_best=config.load_best_model_at_end,
            on_evaluate=self._log_samples, resumed=state)
        # The push callback after ClmCallback: it pushes the checkpoint ClmCallback has just saved.
        pushes = []
        if self._hub is not None:
            from clm.backends.tf.push import HubPushCallback

            pushes.append(HubPushCallback(self._hub, config.output_dir))
        callbacks = [self.reset_eval, callback, *pushes, progress_bar(), *self.reports.callbacks()]

        began = time.perf_counter()
        train = self.train_data
        streaming = not hasattr(train, "__len__")
        for initial_epoch, epochs, steps, first, end in fit_plan(start, plan.total, plan.interval):
            if callback.stopped_early:  # early stopping ended the first fit of a resumed run
                break
            batches = (stream_batches(train, batch, config.block_size, skip_blocks=first * batch)
                       if streaming else
                       tf_batches(model, train, train_indices(len(train), batch, config.seed, first, end,
                                                              wrap=self._world > 1), batch))
            model.fit(batches, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      validation_data=self.eval_batches if plan.validate_at else None,
                      validation_freq=plan.validate_at or 1, callbacks=callbacks, verbose=1)
        self._step = callback.step
        if config.load_best_model_at_end and callback.best_model_checkpoint:
            logger.info("Loading best model from %s (eval loss %s)", callback.best_model_checkpoint,
                        callback.best_metric)
            checkpointer.restore_best(callback.best_model_checkpoint, callback.step,
                                      keep_only_best=config.save_total_limit == 1)
        return FitResult(global_step=callback.step, start_step=start,
                         train_loss=callback.loss_sum / callback.step if callback.step else None,
                         epoch=callback.epoch(), runtime=time.perf_counter() - began,
                         log_history=[r for r in callback.log_history if "loss" in r or "eval_loss" in r])

    def save_model(self, directory: str) -> None:
        if self.is_main_process:
            save_pretrained(self.model, self.tokenizer, directory)  # LoRA merged in
            if self.config.lora_r:
                from clm.backends.tf.lora import save_adapter
                from clm.lora import ADAPTER_DIR

                save_adapter(self.model, f"{directory}/{ADAPTER_DIR}", self.config)

    def parameter_counts(self) -> dict[str, int]:
        def size(variables: Any) -> int:
            return sum(int(v.shape.num_elements()) for v in {v.ref(): v for v in variables}.values())

        return {"trainable_parameters": size(self.model.trainable_variables),
                "total_parameters": size(self.model.weights)}

    # --------------------------------------------------------------------------------------- --push_to_hub
    def _start_push(self, config: "TrainConfig") -> None:
        """Create the Hub repo before training (a bad token fails now, not after it), as the Trainer does."""
        if config.push_to_hub and self.is_main_process and self._hub is None:
            from clm.hub_push import HubPush

            self._hub = HubPush(config.output_dir, config.hub_model_id, private=config.hub_private_repo or None,
                                strategy=config.hub_strategy)

    def push(self, config: "TrainConfig") -> None:
        if not self.is_main_process:
            return
        self._start_push(config)
        self._hub.finish()

    def load_pretrained(self, path: str) -> Any:
        return load_pretrained(path)

    def set_seed(self, seed: int) -> None:
        keras.utils.set_random_seed(seed)

    def generate_ids(self, model: Any, tokenizer: "PreTrainedTokenizerBase", prompt: str,
                     add_special_tokens: bool = True, **generate_kwargs: Any) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="tf", return_token_type_ids=False,
                           add_special_tokens=add_special_tokens)
        # Not generate's own seed=[a, b]: it reuses that one seed at every step, so sampling repeats a token;
        # the global seed (set_seed) makes each step's draw differ, and reproducible.
        ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, logits_processor=float32_scores(),
                             **generate_kwargs)
        return ids[0].numpy().tolist()
