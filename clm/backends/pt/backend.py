"""PyTorch backend: AutoModelForCausalLM trained by the Hugging Face Trainer (DDP/FSDP/DeepSpeed included)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments,
                          set_seed)

from clm import hub, reporting
from clm.backends.base import Backend, TrainResult, train_metrics
from clm.collate import collate_blocks
from clm.defaults import GENERATION_DEFAULTS, save_generation_config, tiny_gpt2_config

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig
    from clm.reporting import RunRecord

logger = logging.getLogger("clm")


def torch_collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in collate_blocks(features).items()}


def _mean_logged_loss(history: list[dict[str, Any]]) -> Optional[float]:
    """Whole-run mean training loss from the logged interval means, each weighted by its steps."""
    total = steps = previous = 0
    for row in history:
        if "loss" in row and "step" in row:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else None


class ClmTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Otherwise the Trainer divides the summed loss by a token count that includes each block's first
        # token, which nothing predicts: eval loss (T-1)/T of the mean token loss, unlike the TF backend.
        self.model_accepts_loss_kwargs = False

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """clm writes its own model card (clm.reporting); keep the Trainer's push from replacing it."""


def load_model(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> PreTrainedModel:
    set_seed(config.seed)  # the built-in model's random init depends on it
    if config.uses_builtin_model:
        model = AutoModelForCausalLM.from_config(tiny_gpt2_config())
    else:
        with hub.translate_errors(config.model_name_or_path, "model"):
            model = AutoModelForCausalLM.from_pretrained(
                config.model_name_or_path, revision=config.model_revision,
                trust_remote_code=config.trust_remote_code)
    # Saved with the model, so pipeline("text-generation") samples as the guide does.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.update(**GENERATION_DEFAULTS, pad_token_id=tokenizer.pad_token_id)
    return model


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
        report_to=[],  # TensorBoard is attached by TorchBackend with its folder fixed (see _callbacks)
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


class TorchBackend(Backend):
    name = "pt"

    def __init__(self) -> None:
        self._trainer: Optional[Trainer] = None
        self._args: Optional[TrainingArguments] = None

    @property
    def is_main_process(self) -> bool:
        return self._args.process_index == 0 if self._args else int(os.environ.get("RANK", "0")) == 0

    @property
    def world_size(self) -> int:
        return self._args.world_size if self._args else int(os.environ.get("WORLD_SIZE", "1"))

    @contextlib.contextmanager
    def main_process_first(self, config: "TrainConfig") -> Iterator[None]:
        # TrainingArguments sets up the torchrun/accelerate process group; build it once, here.
        self._args = training_arguments(config)
        with self._args.main_process_first(local=True, desc="data preparation"):
            yield

    def _trainer_for(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", model: PreTrainedModel,
                     train: Optional["Dataset"], test: "Dataset") -> Trainer:
        if self._args is None:
            self._args = training_arguments(config)
        return ClmTrainer(model=model, args=self._args, train_dataset=train, eval_dataset=test,
                          data_collator=torch_collate, processing_class=tokenizer,
                          callbacks=self._callbacks(config) if train is not None else None)

    def _callbacks(self, config: "TrainConfig") -> list[Any]:
        """TensorBoard under output_dir/runs. Left to itself, transformers 5's callback opens its writer at the
        first log, which is our evaluation before training, and then falls back to ./runs."""
        if config.report_to != "tensorboard" or not self.is_main_process:
            return []
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        from clm.reporting import tensorboard_dir

        return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=tensorboard_dir(config.output_dir)))]

    def train(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", dataset: "DatasetDict",
              record: "RunRecord") -> TrainResult:
        model = load_model(config, tokenizer)
        trainer = self._trainer_for(config, tokenizer, model, dataset["train"], dataset["test"])
        resume = config.resume_from_checkpoint
        before = record.get("eval_loss_before") if resume else None
        if before is None:
            before = trainer.evaluate()["eval_loss"]
            if trainer.is_world_process_zero():
                record.update(eval_loss_before=before)
        result = trainer.train(resume_from_checkpoint=resume)
        after = trainer.evaluate()
        self._save_final(trainer, config.output_dir)

        world = trainer.args.world_size
        global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * world
        runtime = result.metrics.get("train_runtime") or float("nan")
        start = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
        # After a resume the Trainer's train_loss counts only this session's losses: use the logged history.
        train_loss = _mean_logged_loss(trainer.state.log_history) if resume else result.metrics.get("train_loss")
        metrics = train_metrics(
            train_loss=train_loss, eval_loss=after["eval_loss"], eval_loss_before=before, runtime=runtime,
            steps=trainer.state.global_step, session_steps=trainer.state.global_step - start,
            epoch=trainer.state.epoch, train_data=dataset["train"], eval_data=dataset["test"], world_size=world,
            global_batch_size=global_batch, block_size=config.block_size, resumed_from=resume)
        history = [{"step": 0, "eval_loss": before}] + [
            r for r in trainer.state.log_history if "loss" in r or "eval_loss" in r]
        if config.push_to_hub and trainer.is_world_process_zero():
            self._trainer = trainer  # pushed by push() once the runner has written results and card
        return TrainResult(metrics=metrics, log_history=history)

    def push(self, config: "TrainConfig") -> None:
        if self._trainer is not None:
            self._trainer.push_to_hub(commit_message="clm: end of training")

    def finish(self) -> None:
        # A process that exits while its gloo/NCCL group is alive can abort in the group's destructor
        # ("terminate called without an active exception"), failing a finished torchrun job: leave together.
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @staticmethod
    def _save_final(trainer: Trainer, output_dir: str) -> None:
        main = trainer.is_world_process_zero()
        with reporting.staged_save(output_dir, owner=main) as tmp:
            trainer.save_model(str(tmp))  # every rank calls it: FSDP/DeepSpeed gather weights here
            if main:
                save_generation_config(trainer.model.generation_config, tmp)  # sampling keys kept on 4.x too

    def evaluate(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                 dataset: "Dataset") -> dict[str, float]:
        model = load_model(config, tokenizer)
        trainer = self._trainer_for(config, tokenizer, model, None, dataset)
        return {"eval_loss": trainer.evaluate()["eval_loss"]}

    def generate(self, model_path: str, prompts: list[str], seed: Optional[int] = None,
                 **generate_kwargs: Any) -> list[str]:
        with hub.translate_errors(model_path, "model"):
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path)
        if seed is not None:
            set_seed(seed)
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        outputs = []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
            outputs.append(tokenizer.decode(ids[0], skip_special_tokens=True))
        return outputs
