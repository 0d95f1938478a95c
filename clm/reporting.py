"""Framework-free reports of a run: results JSON, the loss plot, the model card and the TensorBoard folder.

Every file goes through ``clm.io`` (a temporary name, fsynced and renamed into place), so a crash leaves the
previous complete version, never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from clm.io import atomic_path, write_atomic, write_json

if TYPE_CHECKING:
    from clm.config import TrainConfig

RESULTS_FILE = "all_results.json"
EVAL_RESULTS_FILE = "eval_results.json"
PLOT_FILE = "loss_curve.png"
CARD_FILE = "README.md"


def tensorboard_dir(output_dir: str | os.PathLike) -> str:
    """output_dir/runs/<date>_<host>: the Trainer's default TensorBoard folder, for both backends."""
    import socket
    import time

    return os.path.join(output_dir, "runs", f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}")


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def plot_losses(log_history: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Train and eval loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "Training and evaluation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")  # tmp's suffix names no format
    finally:
        plt.close(fig)


def _data_description(config: "TrainConfig") -> str:
    if config.dataset_name:
        cfg = f" ({config.dataset_config_name})" if config.dataset_config_name else ""
        return f"Hub dataset `{config.dataset_name}`{cfg}, split `{config.dataset_split}`"
    if config.train_file:
        return f"local file `{os.path.basename(config.train_file)}`"
    return "clm's bundled askscience-style sample in the ELI5 layout"


def _packing_description(config: "TrainConfig", metrics: dict[str, Any]) -> str:
    kind, packing = metrics.get("data_format", "text"), metrics.get("packing", "wrapped")
    what = {"text": "texts", "prompt_completion": "prompt/completion examples",
            "messages": "conversations (chat template)"}.get(kind, kind)
    how = {"wrapped": "concatenated and cut into", "bfd": "packed whole (best-fit decreasing, no attention across "
           "examples) into", "none": "one per row, padded to"}.get(packing, packing)
    loss = metrics.get("loss_tokens", "all tokens")
    return f"{what} tokenized and {how} {config.block_size}-token rows; the loss is on {loss}."


def trained_format(model_dir: str | os.PathLike) -> Optional[str]:
    """The data format a clm model folder was trained on (its all_results.json), if it says."""
    path = Path(model_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text()).get("data_format") if path.is_file() else None
    except (OSError, ValueError):
        return None


def eval_split(config: "TrainConfig", source: bool = True) -> str:
    """The rows an evaluation scores, in words (``clm evaluate``'s log line and eval_results.json, the model
    card): a run and ``clm evaluate`` with the same data flags score the same rows."""
    of = f" of {_data_description(config)}" if source else ""
    if config.validation_file:
        rows = f"the rows of --validation_file `{os.path.basename(config.validation_file)}`"
    elif config.streaming:
        rows = f"the first {config.eval_samples} rows of the stream{of}"
    else:
        rows = (f"{config.test_size * 100:g}% of the rows{of}, held out by train_test_split (test_size "
                f"{config.test_size}, split_seed {config.split_seed})")
    if config.max_eval_samples is not None:
        rows += f", the first {config.max_eval_samples} of them"
    return rows


def model_card(config: "TrainConfig", metrics: dict[str, Any],
               samples: Optional[list[tuple[str, str]]] = None) -> str:
    base = config.model_name_or_path or "GPT-2 architecture, randomly initialised (clm's built-in tiny model)"
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    hyper = {
        "backend": metrics.get("backend"),
        "learning_rate": config.effective_learning_rate,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "global_batch_size": metrics.get("global_batch_size"),
        "num_train_epochs": config.num_train_epochs if config.max_steps <= 0 else None,
        "max_steps": config.max_steps if config.max_steps > 0 else None,
        "block_size": config.block_size,
        "join_with_eos": config.join_with_eos,
        "seed": config.seed,
        "world_size": metrics.get("world_size"),
        # LoRA: the adapter's settings, beside adapter/adapter_config.json (the merged model is output_dir)
        "lora_r": config.lora_r or None,
        "lora_alpha": config.lora_alpha if config.lora_r else None,
        "lora_dropout": config.lora_dropout if config.lora_r else None,
        "lora_target_modules": (", ".join(config.lora_target_modules or []) or "PEFT's defaults")
        if config.lora_r else None,
        "trainable_parameters": metrics.get("trainable_parameters") if config.lora_r else None,
    }
    results = {k: metrics.get(k) for k in ("eval_loss_before", "perplexity_before", "eval_accuracy_before",
                                            "eval_loss", "perplexity", "eval_accuracy", "train_loss",
                                            "train_runtime", "train_tokens_per_second")}
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- clm",
             "- causal-lm"]
    if config.model_name_or_path and not os.path.isdir(config.model_name_or_path):
        front.append(f"base_model: {config.model_name_or_path}")
    if config.dataset_name:
        front += ["datasets:", f"- {config.dataset_name}"]
    front.append("---")
    lines = front + [
        "", f"# {os.path.basename(os.path.abspath(config.output_dir))}", "",
        f"A causal language model fine-tuned with clm. Base model: {base}.", "",
        "## Training data", "", f"{_data_description(config)}; evaluated on {eval_split(config, source=False)}; "
        f"{_packing_description(config, metrics)}", "",
        "## Hyperparameters", "", "| name | value |", "| --- | --- |",
        *[f"| {k} | {fmt(v)} |" for k, v in hyper.items() if v is not None], "",
        "## Results", "", "| metric | value |", "| --- | --- |",
        *[f"| {k} | {fmt(v)} |" for k, v in results.items() if v is not None], "",
        "Perplexity is exp(eval loss) on the held-out split; eval accuracy is the fraction of next tokens "
        "predicted exactly (argmax), as run_clm.py reports it.", "",
        *_samples_section(config, samples),
        "## Usage", "", "```python", "from transformers import pipeline", "",
        f'generator = pipeline("text-generation", model="{config.hub_model_id or config.output_dir}")',
        'print(generator("Why is the sky blue?")[0]["generated_text"])', "```", "",
    ]
    return "\n".join(lines)


def _samples_section(config: "TrainConfig", samples: Optional[list[tuple[str, str]]]) -> list[str]:
    """The sample generations of the final evaluation, as the model card shows them."""
    if not samples:
        return []
    from clm.samples import as_markdown

    return ["## Sample generations", "",
            f"The trained model continuing fixed prompts at the last evaluation (sampling as in its generation "
            f"config, {config.sample_max_new_tokens} new tokens, seed {config.seed}):", "",
            *[f"> {line}" if line else ">" for line in as_markdown(samples).splitlines()], ""]


def write_outputs(config: "TrainConfig", metrics: dict[str, Any], log_history: list[dict[str, Any]],
                  samples: Optional[list[tuple[str, str]]] = None) -> None:
    """all_results.json, the loss plot and the model card (with the last sample generations), into output_dir."""
    out = Path(config.output_dir)
    write_json(out / RESULTS_FILE, metrics)
    plot_losses(log_history, out / PLOT_FILE, title=f"clm ({metrics.get('backend')}) loss")
    write_atomic(out / CARD_FILE, model_card(config, metrics, samples))
