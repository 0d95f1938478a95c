"""The Hugging Face Trainer, set up for clm: TrainingArguments from TrainConfig, the eval loss both backends
report, TensorBoard under output_dir/runs, and the whole-run training loss after a resume."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from clm import checkpoints, preemption
from clm.backends.pt.packed import packed_attention
from clm.collate import IGNORE_INDEX
from clm.errors import ConfigError, writing
from clm.tokenizer import make_portable

if TYPE_CHECKING:
    from clm.config import TrainConfig
    from clm.hub_push import HubPush


def _restore_indexed_cpu(storage: Any, location: str) -> Any:
    """torch restores storages tagged "cpu" only. transformers 4.57 loads a resumed optimizer onto
    ``args.device``, which accelerate names "cpu:0" in CPU DDP (transformers 5 maps plain "cpu" there), so
    resuming a torchrun CPU job failed; an indexed CPU is the CPU."""
    return storage if location.startswith("cpu:") else None


torch.serialization.register_package(30, lambda obj: None, _restore_indexed_cpu)  # once, at import


class ClmTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        # transformers 5 sets config.use_cache to TrainingArguments.use_cache (False) for training; the saved
        # config keeps the model's own value, which generation on either framework reads (4.57's TF generate
        # warns when config and generation_config disagree).
        self._saved_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(*args, **kwargs)
        # Otherwise the Trainer divides the summed loss by a token count that includes each block's first
        # token, which nothing predicts: eval loss (T-1)/T of the mean token loss, unlike the TF backend.
        self.model_accepts_loss_kwargs = False

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(inputs)
        if "position_ids" in inputs:  # packed rows (bfd/none): attention kept inside each example
            inputs.update(packed_attention(self.model, inputs["position_ids"]))
        return inputs

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        # The eval loss over every scored token (clm.metrics.token_loss, from compute_metrics), not the mean of
        # batch means: rows of examples score different numbers of tokens, and bfd must score what none scores.
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        token_loss = output.metrics.pop(f"{prefix}_token_loss", None)
        if token_loss is not None:
            output.metrics[f"{prefix}_loss"] = token_loss
        return output

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._forget_evaluation_prepare()
        return super().train(*args, **kwargs)

    def _forget_evaluation_prepare(self) -> None:
        """clm evaluates before training. On a Trainer that has not trained, ``evaluate`` prepares the model with
        accelerate's ``prepare_model(evaluation_mode=True)``, which marks it prepared (the guard against wrapping twice
        that accelerate 1.16 has), so the preparation for training then returned it bare: no DDP wrapper, each process
        trained its own replica without averaging gradients, and only process zero's was saved (a resumed session,
        which skips that evaluation, trained in DDP, so it ended elsewhere). Before the first ``train``, forget that
        evaluation-only preparation so training prepares (wraps) the model as on a fresh Trainer. DeepSpeed and FSDP
        prepare fully at evaluation and are left as they are."""
        if getattr(self, "_clm_prepared_for_training", False):
            return
        self._clm_prepared_for_training = True
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        accelerator = self.accelerator
        evaluated = [m for m in accelerator._models
                     if accelerator.unwrap_model(m, keep_torch_compile=False) is self.model]
        if not evaluated:
            return
        model = self.model
        model.__dict__.pop("_is_accelerate_prepared", None)  # set there (a compiled module forwards it)
        if "_original_forward" in model.__dict__:  # --bf16/--fp16: the autocast wrapper, which training puts back
            model.forward = model.__dict__.pop("_original_forward")
        accelerator._models = [m for m in accelerator._models if all(m is not e for e in evaluated)]
        self.model_wrapped = self.model  # an evaluation's compiled module, if any: training compiles its own

    def _save(self, output_dir: Optional[str] = None, state_dict: Any = None) -> None:
        """The Trainer's save (model and tokenizer), with the model's own ``use_cache`` and a tokenizer config
        transformers 4.57 reads too."""
        config = getattr(self.model, "config", None)
        training_value = getattr(config, "use_cache", None)
        if config is not None and self._saved_use_cache is not None:
            config.use_cache = self._saved_use_cache
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            if config is not None and training_value is not None:
                config.use_cache = training_value
        if self.args.should_save:
            make_portable(output_dir or self.args.output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """clm writes its own model card (clm.reporting); keep the Trainer's push from replacing it."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer writes a checkpoint in place, ``trainer_state.json`` last. A folder being written again
        loses that file first, so it never reads as complete with a mix of old and new files; a failed write (a
        full disk) removes the half-written folder and ends in a one-line ``WriteError``."""
        name = checkpoints.checkpoint_name(self.state.global_step)
        folder = Path(self._get_output_dir(trial=trial)) / name
        if self.args.should_save:
            (folder / checkpoints.DONE_FILE).unlink(missing_ok=True)
        try:
            with writing(f"saving {name}", folder):  # inside: a full disk is seen before the cleanup frees it
                super()._save_checkpoint(model, trial)
        except Exception:
            if self.args.should_save and not checkpoints.is_complete(folder):
                shutil.rmtree(folder, ignore_errors=True)
            raise

    # --- the Trainer's push (--push_to_hub): its hooks decide when, clm.hub_push what. The Trainer's own
    # uploads carry all of output_dir but `_*` and checkpoint-* (run record, staging and temporary files
    # included), and its save-time push copies the checkpoint's weights into output_dir first.
    hub_push: Optional["HubPush"] = None

    def init_hf_repo(self, token: Optional[str] = None, private: Optional[bool] = None) -> None:
        """Called by ``Trainer.__init__``: create the repo now, so a bad token fails before training."""
        if not self.is_world_process_zero():
            return
        from clm.hub_push import HubPush

        private = self.args.hub_private_repo if private is None else private
        self.hub_push = HubPush(self.args.output_dir, self.args.hub_model_id, private=private,
                                strategy=getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        self.hub_model_id = self.hub_push.repo_id
        self.push_in_progress = None  # the Trainer's own tracker, unused: HubPush keeps the jobs

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Called by the Trainer after each checkpoint save (process zero)."""
        if self.hub_push is not None:
            self.hub_push.on_save(checkpoint_folder)

    def _finish_current_push(self) -> None:
        """Called by the Trainer at the end of ``train``."""
        if self.hub_push is not None:
            self.hub_push.wait()

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    **kwargs: Any) -> Optional[str]:
        """The end of training: the output dir's public files. The model is already in output_dir (staged
        there by ``Backend.train``); the Trainer's version would save it again, unstaged."""
        if not self.is_world_process_zero():
            return None
        if self.hub_push is None:
            self.init_hf_repo(private=kwargs.get("private"))
        return self.hub_push.finish(commit_message or "End of training")


def preprocess_logits_for_metrics(logits: Any, labels: Any) -> Any:
    """run_clm.py's reduction, batch by batch: the argmax token ids, and each row's summed next-token loss,
    never the full-vocabulary logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted,
                                                   ignore_index=IGNORE_INDEX, reduction="none")
    return logits.argmax(dim=-1), token_loss.sum(dim=-1)


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Next-token accuracy (clm.metrics, through ``evaluate``) and the loss over every scored token, from what
    ``preprocess_logits_for_metrics`` kept of each batch."""
    from clm.metrics import next_token_accuracy, token_loss

    (preds, row_loss), labels = eval_pred.predictions, eval_pred.label_ids
    metrics = {}
    accuracy = next_token_accuracy(preds, labels)
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    loss = token_loss(row_loss, labels)
    if loss is not None:
        metrics["token_loss"] = loss
    return metrics


def training_arguments(config: "TrainConfig", **overrides: Any) -> TrainingArguments:
    steps = config.save_steps is not None
    eval_kind, eval_every = config.eval_schedule
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        eval_strategy=eval_kind,
        eval_steps=eval_every,
        load_best_model_at_end=config.load_best_model_at_end,
        # The best model and early stopping both judge by the eval loss, lower is better, as on tf.
        metric_for_best_model="eval_loss" if (config.load_best_model_at_end or config.early_stopping_patience)
        else None,
        greater_is_better=False,
        # Early stopping's patience counter is kept in checkpoints, so a resumed run stops where an
        # uninterrupted one would (the tf backend keeps it in its trainer_state.json).
        restore_callback_states_from_checkpoint=True,
        save_strategy="steps" if steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        learning_rate=config.effective_learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type=config.lr_scheduler_type,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=config.logging_steps,
        # TensorBoard is attached with its folder fixed (see callbacks); the others as the Trainer attaches them
        report_to=trainer_integrations(config),
        seed=config.seed,
        fp16=config.fp16,
        bf16=config.bf16,
        fsdp=config.fsdp,
        deepspeed=config.deepspeed,
        push_to_hub=config.push_to_hub,  # the token is never passed (hub_token): huggingface_hub reads it
        hub_model_id=config.hub_model_id,
        hub_strategy=config.hub_strategy,
        hub_private_repo=config.hub_private_repo or None,  # None: the account's default visibility
        remove_unused_columns=False,  # the collator derives labels; keep input_ids/attention_mask as stored
        save_only_model=False,  # checkpoints carry optimizer, scheduler and RNG state for exact resume
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=config.dataloader_num_workers,
        torch_compile=config.torch_compile,
        # accelerate runs several CPU processes (gloo) only when told it is on CPU
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
    # --gradient_checkpointing: transformers 5 renamed it activation_checkpointing (the old name warns), 4.x
    # has only the old name. Non-reentrant: works when the inputs need no gradient (LoRA freezes the embeddings).
    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    kwargs[name] = config.gradient_checkpointing
    kwargs[f"{name}_kwargs"] = {"use_reentrant": False} if config.gradient_checkpointing else None
    # transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a ratio).
    if config.warmup_steps:
        kwargs["warmup_steps"] = config.warmup_steps
    elif config.warmup_ratio:
        if "warmup_ratio" in TrainingArguments.__dataclass_fields__:
            kwargs["warmup_ratio"] = config.warmup_ratio
        else:
            kwargs["warmup_steps"] = config.warmup_ratio
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class StopOnSignal(TrainerCallback):
    """``clm.preemption`` at each optimizer step's end: once a stop signal reached any process, every process
    stops at this step and the Trainer writes a complete checkpoint here (with a loss row for the steps since
    the last one; an evaluation due at this step is skipped, to stop sooner)."""

    stopping = False

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        if agreed_stop(args) is not None:
            self.stopping = True
            control.should_save = control.should_training_stop = control.should_log = True
            control.should_evaluate = False
        return control

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stopping:  # already saved at the step: no second save or evaluation at the epoch's end
            control.should_save = control.should_evaluate = False
        return control


def agreed_stop(args: TrainingArguments) -> Optional[int]:
    """The stop signal of any process (torchrun forwards a signal to every process, not at the same instant):
    one small all-reduce per optimizer step when several processes train, so all stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return preemption.stop_signal()
    votes = torch.tensor(preemption.votes(), dtype=torch.int32, device=args.device)
    dist.all_reduce(votes)
    return preemption.agree(votes.tolist())


def trainer_integrations(config: "TrainConfig") -> list[str]:
    """--report_to for TrainingArguments: every name but tensorboard (attached by ``callbacks``), each checked
    to be installed first, so a missing library is one line rather than the Trainer's traceback."""
    from transformers.integrations import get_available_reporting_integrations

    if "none" in config.report_to:
        return []
    available = get_available_reporting_integrations()
    if "all" in config.report_to:
        return [name for name in available if name != "tensorboard"]
    names = [name for name in config.report_to if name != "tensorboard"]
    for name in names:
        if name not in available:
            raise ConfigError(f"--report_to {name} needs its library, which is not installed (pip install "
                              f"{name.replace('_', '-')}), or drop it")
    return names


class SampleGenerations(TrainerCallback):
    """At each evaluation (before, during and after training): continue the sample prompts with the model,
    seeded, and log them to TensorBoard as text (``generate`` is the backend's ``sample_generations``)."""

    def __init__(self, generate: Callable[[Any], list[tuple[str, str]]], writer: Any = None):
        self.generate, self.writer = generate, writer

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        from clm.samples import as_markdown

        samples = self.generate(model)
        if samples and self.writer is not None:
            self.writer.add_text("eval/samples", as_markdown(samples), state.global_step)
            self.writer.flush()


def callbacks(config: "TrainConfig", is_main_process: bool,
              generate: Optional[Callable[[Any], list[tuple[str, str]]]] = None) -> list[Any]:
    """The stop-signal check (every process), early stopping, and TensorBoard under output_dir/runs. Left to
    itself, transformers 5's callback opens its writer at the first log, which is the evaluation before
    training, and then falls back to ./runs."""
    from transformers import EarlyStoppingCallback

    found: list[Any] = [StopOnSignal()]
    if config.early_stopping_patience:
        found.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience,
                                           early_stopping_threshold=config.early_stopping_threshold))
    writer = None
    if config.reports("tensorboard") and is_main_process:
        _tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        from clm.reporting import tensorboard_dir

        writer = SummaryWriter(log_dir=tensorboard_dir(config.output_dir))
        found.append(TensorBoardCallback(tb_writer=writer))
    if generate is not None:
        found.append(SampleGenerations(generate, writer))
    return found


def _tensorboard_without_tensorflow() -> None:
    """torch's SummaryWriter imports TensorBoard's TF API, which is TensorFlow itself where it is installed
    (seconds and hundreds of MB a PyTorch run never uses). TensorBoard's own switch, an importable
    ``tensorboard.compat.notf``, gives it the stub it uses without TensorFlow. Not when TensorFlow is loaded."""
    import types

    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def restore_if_finished(trainer: Trainer, checkpoint: str) -> bool:
    """Restore a checkpoint of the run's last step (the run stopped after it, before the model was saved) without
    training: resumed there, the Trainer would take one step beyond the end. False for any other checkpoint,
    and under DeepSpeed/FSDP, whose loading only ``train`` does."""
    args = trainer.args
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    if args.max_steps > 0:
        total = args.max_steps
    else:
        per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)
        total = math.ceil(args.num_train_epochs * per_epoch)
    if checkpoints.read_state(checkpoint)["global_step"] < total:
        return False
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / checkpoints.DONE_FILE))
    return True


def mean_logged_loss(history: list[dict[str, Any]]) -> Optional[float]:
    """Whole-run mean training loss from the logged interval means, each weighted by its steps (after a
    resume the Trainer's own train_loss counts only the resumed session)."""
    total = steps = previous = 0
    for row in history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else None
