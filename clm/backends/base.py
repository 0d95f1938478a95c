"""The Backend interface: what a framework must provide to train, evaluate and generate.

The data layer hands every backend the same ``DatasetDict`` of fixed-length blocks (column ``input_ids``,
plus ``attention_mask`` only when the last block is padded). Labels are derived at batch time by
``clm.collate.collate_blocks``, which keeps EOS tokens. A backend owns the model, optimizer, loop and
checkpoints in its framework's own tools; the runner (``clm.runner``) owns everything framework-free:
output-dir checks, data, results, the loss plot and the model card.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig
    from clm.reporting import RunRecord


@dataclass
class TrainResult:
    """What ``Backend.train`` returns. ``log_history`` rows hold ``step`` and ``loss`` or ``eval_loss``."""

    metrics: dict[str, Any]
    log_history: list[dict[str, Any]] = field(default_factory=list)


def train_metrics(*, train_loss: Optional[float], eval_loss: float, eval_loss_before: float, runtime: float,
                  steps: int, session_steps: int, epoch: float, train_data: Any, eval_data: Any,
                  world_size: int, global_batch_size: int, block_size: int,
                  resumed_from: Optional[str]) -> dict[str, Any]:
    """``TrainResult.metrics``, the same keys from every backend. Throughput counts the steps of this session
    (``session_steps``: a resumed run did the others before), in total and per process; a stream
    (--streaming) has no length, so its sample count is None."""
    tokens = session_steps * global_batch_size * block_size
    return {
        "train_loss": train_loss,
        "train_runtime": runtime,
        "train_steps": steps,
        "epoch": epoch,
        "train_samples": len(train_data) if hasattr(train_data, "__len__") else None,
        "train_tokens_per_second": tokens / runtime if runtime else None,
        "train_tokens_per_second_per_process": tokens / runtime / world_size if runtime else None,
        "eval_loss": eval_loss,
        "eval_loss_before": eval_loss_before,
        "eval_samples": len(eval_data) if hasattr(eval_data, "__len__") else None,
        "world_size": world_size,
        "global_batch_size": global_batch_size,
        "resumed_from": resumed_from,
    }


class Backend(ABC):
    """One framework's implementation. Subclasses import their framework inside methods or their module,
    which the registry imports only when the backend is chosen."""

    name: str = ""

    @property
    def is_main_process(self) -> bool:
        """Only the main process writes results, the model and the plot."""
        return True

    @property
    def world_size(self) -> int:
        """Processes (PyTorch) or replicas (TensorFlow) training together."""
        return 1

    @contextlib.contextmanager
    def main_process_first(self, config: "TrainConfig") -> Iterator[None]:
        """Run the block on the main process first (data preparation), then on the others."""
        yield

    @abstractmethod
    def train(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
              dataset: "DatasetDict", record: "RunRecord") -> TrainResult:
        """Evaluate, train, evaluate again; save the model (safetensors), its tokenizer and generation config
        to ``config.output_dir``, resuming from ``config.resume_from_checkpoint`` when set. Metrics include
        train_loss, eval_loss, eval_loss_before, train_runtime, train_tokens_per_second, global_batch_size
        and world_size. ``record`` keeps eval_loss_before across a crash and resume: read it from there
        when resuming, store it there when first measured."""

    def push(self, config: "TrainConfig") -> None:
        """Upload output_dir to the Hub; called after results and model card are written (--push_to_hub)."""

    def finish(self) -> None:
        """End of a successful run: wait for the other processes, then release what connects them."""

    @abstractmethod
    def evaluate(self, config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase",
                 dataset: "Dataset") -> dict[str, float]:
        """Mean token loss of ``config.model_name_or_path`` on ``dataset``: ``{"eval_loss": ...}``."""

    @abstractmethod
    def generate(self, model_path: str, prompts: list[str], **generate_kwargs: Any) -> list[str]:
        """Prompt plus continuation for each prompt, using the model's own ``generate``."""
