"""The Hugging Face Trainer, set up for clm: TrainingArguments from TrainConfig, the eval loss both backends
report, TensorBoard under output_dir/runs, and the whole-run training loss after a resume."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import Trainer, TrainingArguments

if TYPE_CHECKING:
    from clm.config import TrainConfig


class ClmTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Otherwise the Trainer divides the summed loss by a token count that includes each block's first
        # token, which nothing predicts: eval loss (T-1)/T of the mean token loss, unlike the TF backend.
        self.model_accepts_loss_kwargs = False

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """clm writes its own model card (clm.reporting); keep the Trainer's push from replacing it."""


def training_arguments(config: "TrainConfig", **overrides: Any) -> TrainingArguments:
    steps = config.save_steps is not None
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        eval_strategy="steps" if steps else "epoch",
        eval_steps=config.save_steps,
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
        report_to=[],  # TensorBoard is attached with its folder fixed (see callbacks)
        seed=config.seed,
        fp16=config.fp16,
        bf16=config.bf16,
        fsdp=config.fsdp,
        deepspeed=config.deepspeed,
        push_to_hub=config.push_to_hub,
        hub_model_id=config.hub_model_id,
        remove_unused_columns=False,  # the collator derives labels; keep input_ids/attention_mask as stored
        save_only_model=False,  # checkpoints carry optimizer, scheduler and RNG state for exact resume
        dataloader_pin_memory=torch.cuda.is_available(),
        # accelerate runs several CPU processes (gloo) only when told it is on CPU
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
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


def callbacks(config: "TrainConfig", is_main_process: bool) -> list[Any]:
    """TensorBoard under output_dir/runs. Left to itself, transformers 5's callback opens its writer at the
    first log, which is the evaluation before training, and then falls back to ./runs."""
    if config.report_to != "tensorboard" or not is_main_process:
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from clm.reporting import tensorboard_dir

    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=tensorboard_dir(config.output_dir)))]


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
