"""PyTorch backend: AutoModelForCausalLM trained by the Hugging Face Trainer (DDP/FSDP/DeepSpeed included).
The hooks of ``clm.backends.base.Backend``; the run sequence itself is the base class's."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from transformers import PreTrainedModel, TrainingArguments, set_seed

from clm.backends.base import Backend, FitResult
from clm.backends.pt import distribute, lora
from clm.backends.pt.batches import torch_collate
from clm.backends.pt.packed import check_packed_family
from clm.backends.pt.model import load_model, load_pretrained
from clm.backends.pt.trainer import (ClmTrainer, callbacks, compute_metrics, mean_logged_loss,
                                     preprocess_logits_for_metrics, restore_if_finished, training_arguments)
from clm.checkpoints import read_state
from clm.defaults import save_generation_config
from clm.errors import ConfigError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig


class TorchBackend(Backend):
    name = "pt"

    def __init__(self) -> None:
        self._args: Optional[TrainingArguments] = None
        self._trainer: Optional[ClmTrainer] = None

    @property
    def is_main_process(self) -> bool:
        return distribute.is_main_process(self._args)

    @property
    def world_size(self) -> int:
        return distribute.world_size(self._args)

    @contextlib.contextmanager
    def main_process_first(self, config: "TrainConfig") -> Iterator[None]:
        # TrainingArguments sets up the torchrun/accelerate process group; build it once, here.
        self._args = training_arguments(config)
        with self._args.main_process_first(local=True, desc="data preparation"):
            yield

    def finish(self) -> None:
        distribute.leave_together()

    def _check_config(self, config: "TrainConfig") -> None:
        from clm.data.examples import packs_examples
        from clm.families import check_config_family, model_type

        if config.lora_r and (config.fsdp or config.deepspeed):
            raise ConfigError("--lora_r with --fsdp or --deepspeed is not supported (the adapter would be sharded "
                              "and merged across processes); LoRA runs with torchrun/accelerate DDP as is")
        check_config_family("pt", config)
        if packs_examples(config) and not config.trust_remote_code:
            check_packed_family(model_type(config))

    def load_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> PreTrainedModel:
        model = load_model(config, tokenizer)
        return lora.apply_lora(model, config) if config.lora_r else model

    def prepare(self, model: PreTrainedModel, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                train: Optional["Dataset"], test: "Dataset") -> None:
        if self._args is None:
            self._args = training_arguments(config)
        if "position_ids" in test.column_names:  # packed examples: the family must take the packed mask
            check_packed_family(model.config.model_type)
        if config.fsdp or config.deepspeed:  # sharded weights: one process alone cannot generate
            self.sample_prompts = []
        generate = None
        if self.sample_prompts:
            def generate(trained: Any) -> list[tuple[str, str]]:
                return self.sample_generations(trained, tokenizer, config)
        self._trainer = ClmTrainer(
            model=model, args=self._args, train_dataset=train, eval_dataset=test, data_collator=torch_collate,
            processing_class=tokenizer, compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            callbacks=callbacks(config, self.is_main_process, generate) if train is not None else None)

    def evaluate(self) -> dict[str, float]:
        metrics = self._trainer.evaluate()
        return {key: metrics[key] for key in ("eval_loss", "eval_accuracy") if key in metrics}

    def fit(self, resume_from: Optional[str]) -> FitResult:
        trainer = self._trainer
        if resume_from and restore_if_finished(trainer, resume_from):  # stopped after its last step
            metrics: dict[str, Any] = {"train_runtime": 0.0}
        else:
            metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
        start = read_state(resume_from)["global_step"] if resume_from else 0
        history = [r for r in trainer.state.log_history if "loss" in r or "eval_loss" in r]
        return FitResult(
            global_step=trainer.state.global_step, start_step=start,
            train_loss=mean_logged_loss(history) if resume_from else metrics.get("train_loss"),
            epoch=trainer.state.epoch, runtime=metrics.get("train_runtime") or float("nan"),
            log_history=history)

    def save_model(self, directory: str) -> None:
        # Every rank calls it (FSDP/DeepSpeed gather weights here). As an internal call it does not push: the
        # push comes after the staging folder is renamed into place and the results are written (push below).
        if lora.is_peft(self._trainer.model):  # output_dir/adapter, and the merged model as the model
            self._trainer.model = lora.save_adapter_and_merge(self._trainer.model, directory, self.is_main_process)
        self._trainer.save_model(directory, _internal_call=True)
        if self.is_main_process:
            save_generation_config(self._trainer.model.generation_config, directory)  # sampling keys on 4.x too

    def parameter_counts(self) -> dict[str, int]:
        return lora.parameter_counts(self._trainer.model)

    def push(self, config: "TrainConfig") -> None:
        if self._trainer is not None and self.is_main_process:
            self._trainer.push_to_hub()  # the Trainer's end-of-training push (ClmTrainer.push_to_hub)

    def load_pretrained(self, path: str) -> PreTrainedModel:
        return load_pretrained(path)

    def set_seed(self, seed: int) -> None:
        set_seed(seed)

    @contextlib.contextmanager
    def seeded_rng(self, seed: int) -> Iterator[None]:
        # Forked: sampling during training must not move the generators that drive dropout and data order.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def generate_ids(self, model: PreTrainedModel, tokenizer: "PreTrainedTokenizerBase", prompt: str,
                     add_special_tokens: bool = True, **generate_kwargs: Any) -> list[int]:
        training = model.training
        model.eval()
        inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False,
                           add_special_tokens=add_special_tokens).to(model.device)
        try:
            with torch.no_grad():
                ids = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        finally:
            model.train(training)
        return ids[0].tolist()

    def check_config(self, config: "TrainConfig") -> None:
        from clm.backends.pt.trainer import trainer_integrations

        self._check_config(config)
        trainer_integrations(config)  # --report_to names whose library is missing: one line now
