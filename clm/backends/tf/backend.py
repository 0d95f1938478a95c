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
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from clm.backends.tf.runtime import enable_determinism_if_asked, keras, tf

from clm.backends.base import Backend, FitResult  # noqa: E402  (after runtime: TF_USE_LEGACY_KERAS first)
from clm.backends.tf import distribute
from clm.backends.tf.batches import eval_indices, steps_per_epoch, stream_batches, tf_batches, train_indices
from clm.backends.tf.checkpoints import Checkpointer
from clm.backends.tf.model import float32_scores, load_model, load_pretrained, precision
from clm.backends.tf.optimizer import make_optimizer
from clm.backends.tf.trainer import (ClmCallback, agreed_stop, compile_model, eval_metrics, fit_plan,
                                     interval_plan, progress_bar)
from clm.backends.tf.weights import save_pretrained
from clm.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger("clm")


# --report_to names the tf backend serves, and the module each needs (a library's own Keras callback).
KERAS_INTEGRATIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def keras_integrations(config: "TrainConfig") -> list[str]:
    """The --report_to names besides tensorboard, as the tf backend serves them: a ConfigError for a name
    with no Keras callback or whose library is missing ("all": those of the three that are installed)."""
    import importlib.util

    if "none" in config.report_to:
        return []
    installed = [name for name, module in KERAS_INTEGRATIONS.items()
                 if name != "tensorboard" and importlib.util.find_spec(module) is not None]
    if "all" in config.report_to:
        return installed
    names = [name for name in config.report_to if name != "tensorboard"]
    for name in names:
        if name not in KERAS_INTEGRATIONS:
            raise ConfigError(f"--report_to {name} has no Keras callback; the tf backend reports to "
                              f"{', '.join(KERAS_INTEGRATIONS)} (or use --backend pt)")
        if name not in installed:
            raise ConfigError(f"--report_to {name} needs the {name} package, which is not installed "
                              f"(pip install {name}), or drop it")
    return names


class TFBackend(Backend):
    name = "tf"

    def __init__(self) -> None:
        self._strategy: Any = None
        self._world = 1
        self.config: Optional["TrainConfig"] = None
        self._hub: Any = None  # clm.push.HubPush, with --push_to_hub on the chief

    @property
    def is_main_process(self) -> bool:
        return distribute.is_chief()

    @property
    def world_size(self) -> int:
        return self._world

    def check_config(self, config: "TrainConfig") -> None:
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
        from clm.families import check_config_family

        check_config_family("tf", config)
        keras_integrations(config)  # --report_to names with no Keras callback, or not installed: one line

    def load_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
        self._ensure_strategy(config)
        with self._strategy.scope(), precision(config):
            return load_model(config, tokenizer)

    def _ensure_strategy(self, config: "TrainConfig") -> None:
        if self._strategy is None:  # after data preparation: a multi-worker strategy connects the cluster
            enable_determinism_if_asked()
            self._strategy = distribute.make_strategy(config.tf_strategy)
            self._world = self._strategy.num_replicas_in_sync

    def prepare(self, model: Any, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                train: Optional["Dataset"], test: "Dataset") -> None:
        self._ensure_strategy(config)
        self.config, self.model, self.tokenizer, self.train_data = config, model, tokenizer, train
        batch = config.per_device_train_batch_size * self._world
        self.streaming = train is not None and not hasattr(train, "__len__")  # --streaming: max_steps required
        self.per_epoch = (config.max_steps if self.streaming or train is None
                          else steps_per_epoch(len(train), batch))
        self.total = (config.max_steps if config.max_steps > 0
                      else math.ceil(config.num_train_epochs * self.per_epoch))
        with self._strategy.scope(), precision(config):
            self.optimizer = make_optimizer(config, model, self.total) if train is not None else None
            self.reset_eval = compile_model(model, config, self.optimizer)
        eval_batch = config.per_device_eval_batch_size * self._world
        self.eval_batches = tf_batches(model, test, eval_indices(len(test), eval_batch), eval_batch)
        self._step = 0  # the global step the weights are at, for what evaluate() logs
        self._writer = None
        if train is not None:
            self._start_push(config)
            if config.reports("tensorboard") and self.is_main_process:
                self._log_dir = self._tensorboard_dir()  # one folder: the name holds the time
                self._writer = tf.summary.create_file_writer(self._log_dir)

    def evaluate(self) -> dict[str, float]:
        logs = self.model.evaluate(self.eval_batches, callbacks=[self.reset_eval, progress_bar()], return_dict=True)
        self._log_samples(self._step)
        return eval_metrics(logs)

    def _log_samples(self, step: int) -> None:
        """Sample generations at an evaluation, logged as TensorBoard text (main process only)."""
        if not self.sample_prompts:
            return
        from clm.samples import as_markdown

        samples = self.sample_generations(self.model, self.tokenizer, self.config)
        if self._writer is not None:
            with self._writer.as_default(step=step):
                tf.summary.text("eval/samples", as_markdown(samples))
            self._writer.flush()

    @contextlib.contextmanager
    def seeded_rng(self, seed: int) -> Iterator[None]:
        # The global TF seed only (not Python's or NumPy's): dropout draws from its own per-layer generators
        # and the data order from a seeded NumPy generator, so training's randomness is left as it was.
        tf.random.set_seed(seed)
        yield

    def fit(self, resume_from: Optional[str]) -> FitResult:
        config, model = self.config, self.model
        batch = config.per_device_train_batch_size * self._world
        with self._strategy.scope():
            checkpointer = Checkpointer(model, self.tokenizer, config.output_dir, config.save_total_limit,
                                        self.is_main_process)
        run = {"backend": self.name, "max_steps": self.total, "steps_per_epoch": self.per_epoch,
               "global_batch_size": batch, "seed": config.seed}
        state = checkpointer.restore(resume_from) if resume_from else {}
        for key in ("steps_per_epoch", "global_batch_size", "seed"):
            if key in state and state[key] != run[key]:
                logger.warning("%s was %s in %s and is %s now: the resumed run will not match an uninterrupted "
                               "one", key, state[key], resume_from, run[key])
        start = int(state.get("global_step", 0))
        # Keras epochs end at each checkpoint and each evaluation the schedules ask for (the Trainer's
        # save_steps/eval_steps, or epochs); validation_freq names the epochs that end in an evaluation.
        save_every = config.save_steps or self.per_epoch
        eval_kind, eval_steps = config.eval_schedule
        eval_every = {"steps": eval_steps, "epoch": self.per_epoch}.get(eval_kind)
        # Also at the last step, as the Trainer of transformers 5 does (and this backend always did).
        interval, validate_at = interval_plan(self.total, save_every, eval_every, eval_at_end=True)
        callback = ClmCallback(
            step=start, total_steps=self.total, steps_per_epoch=self.per_epoch,
            logging_steps=config.logging_steps, learning_rate=lambda s: float(self.optimizer.learning_rate(s)),
            log_history=list(state.get("log_history") or []), loss_sum=float(state.get("train_loss_sum", 0.0)),
            checkpointer=checkpointer, state=run, writer=self._writer, stop=lambda: agreed_stop(self._strategy),
            save_every=save_every, early_stopping_patience=config.early_stopping_patience,
            early_stopping_threshold=config.early_stopping_threshold, track_best=config.load_best_model_at_end,
            on_evaluate=self._log_samples, resumed=state)
        # The push callback after ClmCallback: it pushes the checkpoint ClmCallback has just saved.
        callbacks = ([self.reset_eval, callback, *self._push_callbacks(), progress_bar()]
                     + self._framework_callbacks())

        began = time.perf_counter()
        train = self.train_data
        for initial_epoch, epochs, steps, first, end in fit_plan(start, self.total, interval):
            if callback.stopped_early:  # early stopping ended the first fit of a resumed run
                break
            batches = (stream_batches(train, batch, config.block_size, skip_blocks=first * batch)
                       if self.streaming else
                       tf_batches(model, train, train_indices(len(train), batch, config.seed, first, end,
                                                              wrap=self._world > 1), batch))
            model.fit(batches, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                      validation_data=self.eval_batches if validate_at else None,
                      validation_freq=validate_at or 1, callbacks=callbacks, verbose=1)
        self._step = callback.step
        if config.load_best_model_at_end and callback.best_model_checkpoint:
            # The Trainer's _load_best_model: the weights of the checkpoint with the lowest eval loss.
            logger.info("Loading best model from %s (eval loss %s)", callback.best_model_checkpoint,
                        callback.best_metric)
            checkpointer.restore_model(callback.best_model_checkpoint)
            if config.save_total_limit == 1 and self.is_main_process:  # as the Trainer: only the best stays
                import shutil

                last = checkpointer.path(callback.step)
                if last.is_dir() and last.resolve() != Path(callback.best_model_checkpoint).resolve():
                    shutil.rmtree(last, ignore_errors=True)
        return FitResult(global_step=callback.step, start_step=start,
                         train_loss=callback.loss_sum / callback.step if callback.step else None,
                         epoch=callback.epoch(), runtime=time.perf_counter() - began,
                         log_history=[r for r in callback.log_history if "loss" in r or "eval_loss" in r])

    def _tensorboard_dir(self) -> str:
        from clm.reporting import tensorboard_dir

        return tensorboard_dir(self.config.output_dir)

    def _framework_callbacks(self) -> list[Any]:
        """--report_to as Keras callbacks: TensorBoard (Keras' own view beside clm's global-step scalars), and
        the wandb and mlflow libraries' Keras callbacks (main process only)."""
        config = self.config
        callbacks: list[Any] = []
        if not self.is_main_process:
            return callbacks
        if self._writer is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=self._log_dir, write_graph=False,
                                                         update_freq=config.logging_steps, profile_batch=0))
        for name in keras_integrations(config):
            if name == "wandb":
                import wandb
                from wandb.integration.keras import WandbMetricsLogger

                if wandb.run is None:
                    wandb.init(config=config.to_dict())
                callbacks.append(WandbMetricsLogger(log_freq=config.logging_steps))
            elif name == "mlflow":
                from mlflow.tensorflow import MlflowCallback

                callbacks.append(MlflowCallback(log_every_n_steps=config.logging_steps))
        return callbacks

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
            from clm.push import HubPush

            self._hub = HubPush(config.output_dir, config.hub_model_id, private=config.hub_private_repo or None,
                                strategy=config.hub_strategy)

    def _push_callbacks(self) -> list[Any]:
        if self._hub is None:
            return []
        from clm.backends.tf.push import HubPushCallback

        return [HubPushCallback(self._hub, self.config.output_dir)]

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
                     **generate_kwargs: Any) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="tf", return_token_type_ids=False)
        # Not generate's own seed=[a, b]: it reuses that one seed at every step, so sampling repeats a token;
        # the global seed (set_seed) makes each step's draw differ, and reproducible.
        ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, logits_processor=float32_scores(),
                             **generate_kwargs)
        return ids[0].numpy().tolist()
