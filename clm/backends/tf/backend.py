"""TensorFlow backend: TFAutoModelForCausalLM trained by Keras compile/fit, with the guide's TensorFlow tools.

The recipe is the PyTorch Trainer's (see ``schedule``): AdamW with decoupled weight decay (none on biases and
LayerNorm), global-norm clipping, linear/cosine/constant schedules with warmup, ``steps_per_epoch =
ceil(train_blocks / global_batch)``, ``max_steps`` overriding epochs. Batches come from
``model.prepare_tf_dataset`` with the shared NumPy collator (``batches``); the loss is the model's own.

Keras epochs are checkpoint intervals: ``save_steps`` steps, or one pass over the data when it is unset, so
Keras' validation at each epoch end is the Trainer's evaluation at each save. Resuming restores the
``tf.train.Checkpoint`` of ``checkpoint-<step>`` (``checkpoints``) and rebuilds the data order from the seed.
Reproducibility: seeds, data order and dropout RNG are fixed by ``--seed``; set ``TF_DETERMINISTIC_OPS=1``
(TensorFlow's switch, honoured via ``tf.config.experimental.enable_op_determinism``) for bit-identical
kernels, e.g. for comparing a resumed run with an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from clm.backends.tf.runtime import enable_determinism_if_asked, keras, make_strategy, tf

from clm import hub, reporting  # noqa: E402  (after runtime: TF_USE_LEGACY_KERAS must be set first)
from clm.backends.base import Backend, TrainResult, train_metrics
from clm.backends.tf.batches import eval_indices, steps_per_epoch, stream_batches, tf_batches, train_indices
from clm.backends.tf.checkpoints import Checkpointer, ClmCallback, dropout_generators
from clm.backends.tf.schedule import make_optimizer
from clm.backends.tf.weights import load_pretrained, save_pretrained
from clm.collate import IGNORE_INDEX
from clm.defaults import GENERATION_DEFAULTS, tiny_gpt2_config
from clm.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig
    from clm.reporting import RunRecord

logger = logging.getLogger("clm")


def check_config(config: "TrainConfig") -> None:
    """What the tf backend cannot train with; run before data preparation (main_process_first)."""
    if config.gradient_accumulation_steps > 1:
        raise ConfigError("--gradient_accumulation_steps > 1 is not supported by the tf backend (Keras fit has no "
                          "accumulation); raise --per_device_train_batch_size for the same update, or use "
                          "--backend pt")
    if config.fsdp or config.deepspeed:
        logger.warning("--fsdp and --deepspeed are PyTorch options; the tf backend ignores them")


@contextlib.contextmanager
def precision(config: "TrainConfig") -> Iterator[None]:
    """Keras mixed precision for --fp16/--bf16 while the model is built and compiled (float16 also wraps the
    optimizer in a LossScaleOptimizer at compile); variables stay float32, so saved weights are float32."""
    name = "mixed_float16" if config.fp16 else "mixed_bfloat16" if config.bf16 else None
    previous = keras.mixed_precision.global_policy()
    if name:
        keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def load_model(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
    from transformers import TFAutoModelForCausalLM

    keras.utils.set_random_seed(config.seed)  # the built-in model's init and the dropout generators' seeds
    was_enabled = keras.backend.experimental.is_tf_random_generator_enabled()
    keras.backend.experimental.enable_tf_random_generator()  # dropout from generators a checkpoint can hold
    try:
        if config.uses_builtin_model:
            model = TFAutoModelForCausalLM.from_config(tiny_gpt2_config())
            model.build_in_name_scope()
        else:
            with hub.translate_errors(config.model_name_or_path, "model"):
                model = load_pretrained(config.model_name_or_path, config.model_revision,
                                        config.trust_remote_code)
        dropout_generators(model)  # seed them now, independent of anything drawn later
    finally:
        if not was_enabled:
            keras.backend.experimental.disable_tf_random_generator()
    # Saved with the model, so generate() and pipeline("text-generation") sample as the guide does.
    model.generation_config.update(**GENERATION_DEFAULTS, pad_token_id=tokenizer.pad_token_id)
    return model


def attach_eval_step(model: Any) -> Any:
    """Make ``model.evaluate`` report the Trainer's eval loss, as ``eval_loss``: each batch's mean token loss
    weighted by its number of blocks (Keras would weight every batch equally; padding rows weigh nothing).
    Returns the callback that resets the average at the start of each evaluation (fit passes it on to
    validation)."""
    mean = keras.metrics.Mean(name="eval_loss")  # kept off the model, so training logs do not show it

    def test_step(data: Any) -> dict[str, Any]:
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        x = dict(x)
        if y is not None:
            x["labels"] = y
        out = model(x, training=False)
        blocks = tf.reduce_sum(tf.cast(tf.reduce_any(x["labels"] != IGNORE_INDEX, axis=-1), tf.float32))
        # A worker's share of the last batch may be padding only: its loss is 0/0; it weighs nothing.
        loss = tf.where(blocks > 0, tf.cast(tf.reduce_mean(out.loss), tf.float32), 0.0)
        mean.update_state(loss, sample_weight=blocks)
        # Not "loss": Keras would replace a "loss" log by its own (unweighted) loss tracker's value.
        return {"eval_loss": mean.result()}

    model.test_step = test_step
    return keras.callbacks.LambdaCallback(on_test_begin=lambda logs: mean.reset_state())


def compile_model(model: Any, config: "TrainConfig", optimizer: Any = None) -> Any:
    """``model.compile`` with no loss (the model's own) and clm's eval step; call inside the strategy's scope.
    Returns the callback that resets the eval average (see ``attach_eval_step``)."""
    # Evaluation needs no optimizer; compile's own default then (optimizer=None is refused).
    model.compile(**({"optimizer": optimizer} if optimizer is not None else {}), jit_compile=config.jit_compile)
    model.distribute_reduction_method = "first"  # metrics are already global means; "auto" sums them
    return attach_eval_step(model)


def progress_bar() -> Any:
    """Keras' progress bar, told that eval_loss is already an average (it would average it again)."""
    return keras.callbacks.ProgbarLogger(count_mode="steps", stateful_metrics=["eval_loss", "val_eval_loss"])


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


class TFBackend(Backend):
    name = "tf"

    def __init__(self) -> None:
        self._world = 1

    @property
    def is_main_process(self) -> bool:
        """The chief of a multi-worker cluster (TF_CONFIG), else the one process."""
        task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
        if task.get("type") in (None, "chief"):
            return True
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster") or {}
        return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cluster

    @property
    def world_size(self) -> int:
        return self._world

    @contextlib.contextmanager
    def main_process_first(self, config: "TrainConfig") -> Iterator[None]:
        check_config(config)  # before data preparation: fail early on what this backend cannot do
        yield

    def _setup(self, config: "TrainConfig") -> Any:
        enable_determinism_if_asked()
        strategy = make_strategy(config.tf_strategy)
        self._world = strategy.num_replicas_in_sync
        return strategy

    def _evaluator(self, model: Any, dataset: "Dataset", config: "TrainConfig", reset: Any) -> Any:
        batch = config.per_device_eval_batch_size * self._world
        batches = tf_batches(model, dataset, eval_indices(len(dataset), batch), batch)
        return batches, lambda: float(model.evaluate(batches, callbacks=[reset, progress_bar()],
                                                     return_dict=True)["eval_loss"])

    def train(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", dataset: "DatasetDict",
              record: "RunRecord") -> TrainResult:
        strategy = self._setup(config)
        train, test = dataset["train"], dataset["test"]
        batch = config.per_device_train_batch_size * self._world
        streaming = not hasattr(train, "__len__")  # --streaming: no length, max_steps is required
        per_epoch = config.max_steps if streaming else steps_per_epoch(len(train), batch)
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
        with strategy.scope(), precision(config):
            model = load_model(config, tokenizer)
            optimizer = make_optimizer(config, model, total)
            reset_eval = compile_model(model, config, optimizer)
            checkpointer = Checkpointer(model, tokenizer, config.output_dir, config.save_total_limit,
                                        self.is_main_process)
        eval_batches, evaluate = self._evaluator(model, test, config, reset_eval)

        resume = config.resume_from_checkpoint
        before = record.get("eval_loss_before") if resume else None
        if before is None:
            before = evaluate()  # the starting weights, before any checkpoint is restored
            if self.is_main_process:
                record.update(eval_loss_before=before)
        run = {"backend": self.name, "max_steps": total, "steps_per_epoch": per_epoch, "global_batch_size": batch,
               "seed": config.seed}
        state = checkpointer.restore(resume) if resume else {}
        for key in ("steps_per_epoch", "global_batch_size", "seed"):
            if key in state and state[key] != run[key]:
                logger.warning("%s was %s in %s and is %s now: the resumed run will not match an uninterrupted "
                               "one", key, state[key], resume, run[key])
        start = int(state.get("global_step", 0))
        log_dir = self._log_dir(config)
        callback = ClmCallback(
            step=start, total_steps=total, steps_per_epoch=per_epoch, logging_steps=config.logging_steps,
            learning_rate=lambda s: float(optimizer.learning_rate(s)),
            log_history=state.get("log_history") or [{"step": 0, "eval_loss": before}],
            loss_sum=float(state.get("train_loss_sum", 0.0)), checkpointer=checkpointer, state=run,
            summary_dir=log_dir)
        callbacks = [reset_eval, callback, progress_bar()] + self._framework_callbacks(config, tokenizer, log_dir)

        began = time.perf_counter()
        for initial_epoch, epochs, steps, first, end in fit_plan(start, total, config.save_steps or per_epoch):
            batches = (stream_batches(train, batch, config.block_size, skip_blocks=first * batch) if streaming else
                       tf_batches(model, train, train_indices(len(train), batch, config.seed, first, end,
                                                              wrap=self._world > 1), batch))
            model.fit(batches, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      validation_data=eval_batches, callbacks=callbacks, verbose=1)
        runtime = time.perf_counter() - began
        after = evaluate()
        callback.log_history.append({"step": callback.step, "eval_loss": after, "epoch": callback.epoch()})
        if self.is_main_process:
            with reporting.staged_save(config.output_dir) as tmp:
                save_pretrained(model, tokenizer, tmp)

        metrics = train_metrics(
            train_loss=callback.loss_sum / callback.step if callback.step else None, eval_loss=after,
            eval_loss_before=before, runtime=runtime, steps=callback.step, session_steps=callback.step - start,
            epoch=callback.epoch(), train_data=train, eval_data=test, world_size=self._world,
            global_batch_size=batch, block_size=config.block_size, resumed_from=resume)
        history = [r for r in callback.log_history if "loss" in r or "eval_loss" in r]
        return TrainResult(metrics=metrics, log_history=history)

    @staticmethod
    def _log_dir(config: "TrainConfig") -> Optional[str]:
        from clm.reporting import tensorboard_dir

        return None if config.report_to == "none" else tensorboard_dir(config.output_dir)

    def _framework_callbacks(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                             log_dir: Optional[str]) -> list[Any]:
        callbacks: list[Any] = []
        if log_dir is not None:  # Keras' own TensorBoard view beside clm's global-step scalars
            callbacks.append(keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False,
                                                         update_freq=config.logging_steps, profile_batch=0))
        if config.push_to_hub and self.is_main_process:
            from transformers import PushToHubCallback

            # It clones the Hub repo into a folder of its own (output_dir holds other files), pushing at
            # each checkpoint interval; push() uploads the final output_dir once results are written.
            callbacks.append(PushToHubCallback(output_dir=str(Path(config.output_dir) / ".hub-clone"),
                                               tokenizer=tokenizer, hub_model_id=self._repo_id(config)))
        return callbacks

    @staticmethod
    def _repo_id(config: "TrainConfig") -> str:
        return config.hub_model_id or Path(config.output_dir).absolute().name

    def push(self, config: "TrainConfig") -> None:
        if not self.is_main_process:
            return
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(self._repo_id(config), exist_ok=True).repo_id
        upload_folder(repo_id=repo_id, folder_path=config.output_dir, commit_message="clm: end of training",
                      ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*", ".*/**"])

    def evaluate(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                 dataset: "Dataset") -> dict[str, float]:
        strategy = self._setup(config)
        with strategy.scope(), precision(config):
            model = load_model(config, tokenizer)
            reset = compile_model(model, config)
        return {"eval_loss": self._evaluator(model, dataset, config, reset)[1]()}

    def generate(self, model_path: str, prompts: list[str], seed: Optional[int] = None,
                 **generate_kwargs: Any) -> list[str]:
        from transformers import AutoTokenizer

        with hub.translate_errors(model_path, "model"):
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = load_pretrained(model_path)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        outputs = []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="tf")
            # Not generate's own seed=[a, b]: it reuses that one seed at every step, so sampling repeats a
            # token; the global seed set above makes each step's draw differ, and reproducible.
            ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            outputs.append(tokenizer.decode(ids[0].numpy(), skip_special_tokens=True))
        return outputs
