"""The Backend interface: the run sequence, written once, and the small set of hooks each framework implements.

``Backend.train`` is the whole training sequence for every framework: load the model, evaluate it, fit (resuming
and checkpointing), evaluate again, save the model, and gather the metrics. A framework implements the hooks
(``load_model``, ``prepare``, ``evaluate``, ``fit``, ``save_model``, ``load_pretrained``, ``generate_ids``, and
the process-topology ones) in its own idiom: the Hugging Face Trainer for PyTorch, Keras compile/fit for
TensorFlow. Hooks keep their framework objects on the instance (one instance per run, from
``clm.backends.get_backend``). Backends never see the runner, the output-dir rules or the run record: what a
resumed run must not measure again (the metrics before training) comes in as an argument and goes back to the
runner through a callback.

The data layer hands every backend the same blocks (column ``input_ids``, plus ``attention_mask`` only when
the last block is padded); labels are made at batch time by ``clm.collate.collate_blocks``, EOS kept.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from clm import hub, preemption
from clm.errors import ConfigError, Preempted, writing
from clm.io import staged_save

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig


@dataclass
class FitResult:
    """What ``Backend.fit`` reports. ``log_history`` holds the whole run's rows (``step`` with ``loss`` or
    ``eval_loss``), restored ones included, without the evaluations before and after training."""

    global_step: int
    start_step: int  # the step this session resumed from (0 for a fresh run)
    train_loss: Optional[float]  # mean over the whole run, resumed sessions included
    epoch: float
    runtime: float  # seconds of training in this session
    log_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What ``Backend.train`` returns: ``metrics`` (the same keys from every backend) and the loss history."""

    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, text) at the last evaluation


def _length(data: Any) -> Optional[int]:
    return len(data) if hasattr(data, "__len__") else None  # a stream (--streaming) has no length


class Backend(ABC):
    """One framework's hooks under the shared run sequence. Subclasses import their framework in their own
    modules, which the registry imports only when the backend is chosen."""

    name: str = ""
    # Sample generations (clm.samples): the prompts continued at each evaluation during ``train`` (set before
    # ``prepare``; empty for ``evaluate_model``), and the latest (prompt, text) pairs.
    sample_prompts: list[str] = []
    samples: list[tuple[str, str]] = []

    # ----------------------------------------------------------------------------------- process topology
    @property
    def is_main_process(self) -> bool:
        """Only the main process writes results, the model and the plot."""
        return True

    @property
    def world_size(self) -> int:
        """Processes (PyTorch) or replicas (TensorFlow) training together."""
        return 1

    def check_config(self, config: "TrainConfig") -> None:
        """Refuse, in one line, what this framework cannot do; called before anything is read or written."""

    @contextlib.contextmanager
    def main_process_first(self, config: "TrainConfig") -> Iterator[None]:
        """Run the block on the main process first (data preparation), then on the others."""
        yield

    def finish(self) -> None:
        """End of a successful run: wait for the other processes, then release what connects them."""

    # ----------------------------------------------------------------------------------- hooks
    @abstractmethod
    def load_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase") -> Any:
        """The model to train or evaluate (pretrained, or the built-in config), with the guide's sampling
        settings in its generation config."""

    @abstractmethod
    def prepare(self, model: Any, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                train: Optional["Dataset"], test: "Dataset") -> None:
        """Build the framework's trainer around ``model`` (optimizer, schedule, batches); ``train`` is None when
        only evaluating."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Metrics on the eval split with the current weights: ``eval_loss`` is the mean token loss,
        ``eval_accuracy`` the next-token accuracy (argmax vs the next label, -100 left out; ``clm.metrics``)."""

    @abstractmethod
    def fit(self, resume_from: Optional[str]) -> FitResult:
        """Train to the end, restoring ``resume_from`` first if given, evaluating and checkpointing on the way."""

    @abstractmethod
    def save_model(self, directory: str) -> None:
        """Safetensors in the PyTorch layout, config, generation config and tokenizer, into ``directory``.
        Every process calls it (sharded models gather their weights here); only the main one writes."""

    @abstractmethod
    def load_pretrained(self, path: str) -> Any:
        """A saved model directory (either backend's output), for generation."""

    @abstractmethod
    def generate_ids(self, model: Any, tokenizer: "PreTrainedTokenizerBase", prompt: str,
                     add_special_tokens: bool = True, **generate_kwargs: Any) -> list[int]:
        """Prompt plus continuation as token ids, from the model's own ``generate``."""

    @abstractmethod
    def set_seed(self, seed: int) -> None:
        """Seed the framework's random generators."""

    @abstractmethod
    def parameter_counts(self) -> dict[str, int]:
        """``trainable_parameters`` and ``total_parameters`` of the prepared model (a tied tensor once; with LoRA
        the adapter's are trainable and counted in the total, as PEFT counts them)."""

    @contextlib.contextmanager
    def seeded_rng(self, seed: int) -> Iterator[None]:
        """Seed sampling for the block; training's own random state is left as it was where the framework
        allows it."""
        self.set_seed(seed)
        yield

    def sample_generations(self, model: Any, tokenizer: "PreTrainedTokenizerBase",
                           config: "TrainConfig") -> list[tuple[str, str]]:
        """(prompt, prompt + continuation) for each sample prompt, from the model being trained, with its
        generation config (the run's sampling settings), ``--sample_max_new_tokens`` and ``--seed``."""
        out = []
        with self.seeded_rng(config.seed):
            for prompt in self.sample_prompts:
                ids = self.generate_ids(model, tokenizer, prompt, max_new_tokens=config.sample_max_new_tokens)
                out.append((prompt, tokenizer.decode(ids, skip_special_tokens=True)))
        self.samples = out
        return out

    def push(self, config: "TrainConfig") -> None:
        """Upload output_dir to the Hub; called after results and model card are written (--push_to_hub)."""

    # ----------------------------------------------------------------------------------- the run sequence
    def train(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", dataset: "DatasetDict",
              before: Optional[dict[str, float]] = None,
              on_before: Optional[Callable[[dict[str, float]], None]] = None) -> TrainResult:
        """Evaluate, fit, evaluate again and save the model to ``config.output_dir`` (staged, so a crash leaves
        no half-written file). The metrics before training are measured once per run: a resumed run is given
        them (``before``); otherwise they are measured here and handed to ``on_before`` before training starts,
        so the runner keeps them across a crash and resume."""
        from clm.samples import choose_prompts

        model = self.load_model(config, tokenizer)
        self.sample_prompts = choose_prompts(config, tokenizer, dataset["test"]) if self.is_main_process else []
        self.prepare(model, config, tokenizer, dataset["train"], dataset["test"])
        counts = self.parameter_counts()  # before save_model, which merges a LoRA adapter into the model
        resume = config.resume_from_checkpoint
        before_metrics = before
        if before_metrics is None:
            before_metrics = self.evaluate()  # the starting weights, before any checkpoint is restored
            if on_before is not None:
                on_before(before_metrics)
        before_loss = before_metrics["eval_loss"]
        with preemption.deferred():  # a stop signal: the hooks write a checkpoint at the next step end and stop
            fit = self.fit(resume)
        if preemption.stop_signal() is not None:  # not evaluated, saved or reported: the same command resumes
            raise Preempted(preemption.stop_signal(), saved=True)
        after = self.evaluate()
        with preemption.deferred(), writing("saving the model", config.output_dir):  # staged: all or nothing
            with staged_save(config.output_dir, owner=self.is_main_process) as tmp:
                self.save_model(str(tmp))

        global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * self.world_size
        tokens = (fit.global_step - fit.start_step) * global_batch * config.block_size  # this session's
        rate = tokens / fit.runtime if fit.runtime else None
        metrics = {
            "train_loss": fit.train_loss,
            "train_runtime": fit.runtime,
            "train_steps": fit.global_step,
            "epoch": fit.epoch,
            "train_samples": _length(dataset["train"]),
            "train_tokens_per_second": rate,
            "train_tokens_per_second_per_process": rate / self.world_size if rate else None,
            **after,
            "eval_loss_before": before_loss,
            **{f"{key}_before": value for key, value in before_metrics.items() if key != "eval_loss"},
            "eval_samples": _length(dataset["test"]),
            "world_size": self.world_size,
            "global_batch_size": global_batch,
            "resumed_from": resume,
            **counts,
        }
        history = [{"step": 0, **before_metrics}, *fit.log_history,
                   {"step": fit.global_step, "epoch": fit.epoch, **after}]
        return TrainResult(metrics=metrics, log_history=history, samples=list(self.samples))

    def evaluate_model(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                       dataset: "Dataset") -> dict[str, float]:
        """``clm evaluate``: the metrics of ``config.model_name_or_path`` on ``dataset``."""
        model = self.load_model(config, tokenizer)
        self.prepare(model, config, tokenizer, None, dataset)
        return self.evaluate()

    def generate(self, model_path: str, prompts: list[str], seed: Optional[int] = None, chat: bool = False,
                 **generate_kwargs: Any) -> list[str]:
        """Prompt plus continuation for each prompt, sampled by the model's own ``generate``. With ``chat``,
        each prompt goes in as a user message through the tokenizer's chat template, and the result is the
        prompt, a newline and the reply."""
        from clm.tokenizer import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(model_path)
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"model {model_path!r} has no chat template; drop --chat")
        with hub.translate_errors(model_path, "model"):
            model = self.load_pretrained(model_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if seed is not None:
            self.set_seed(seed)
        if not chat:
            return [tokenizer.decode(self.generate_ids(model, tokenizer, prompt, **generate_kwargs),
                                     skip_special_tokens=True) for prompt in prompts]
        out = []
        for prompt in prompts:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
            start = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
            ids = self.generate_ids(model, tokenizer, rendered, add_special_tokens=False, **generate_kwargs)
            out.append(f"{prompt}\n{tokenizer.decode(ids[start:], skip_special_tokens=True).strip()}")
        return out
