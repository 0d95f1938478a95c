"""train / evaluate / generate: the functions behind both the CLI and ``import clm``.

Framework-free orchestration: output-dir checks, resume detection, tokenizer and data, then the chosen
backend, then results. Only the main process writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from clm import checkpoints, hub, reporting
from clm.backends import get_backend, resolve_backend_name
from clm.checkpoints import RunRecord
from clm.config import TrainConfig
from clm.defaults import TINY_GPT2, load_tokenizer
from clm.errors import ClmError, ConfigError

logger = logging.getLogger("clm")

# Files a finished or interrupted clm run leaves; anything else in output_dir is the user's.
OWN_ENTRIES = {reporting.RESULTS_FILE, reporting.EVAL_RESULTS_FILE, checkpoints.RUN_RECORD_FILE,
               reporting.PLOT_FILE, reporting.CARD_FILE, "runs", "logs"}


# --------------------------------------------------------------------------------------------- output dir
def _check_writable(out: Path) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output_dir {str(out)!r} is inside a file ({probe}); give a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {str(out)!r} is not writable ({probe}); choose a directory you can "
                          "write to")


def prepare_output_dir(config: TrainConfig) -> TrainConfig:
    """Refuse a directory holding someone else's files; start fresh, resume, or begin a new run. A checkpoint
    to resume must be complete and written by ``config.backend``."""
    out = Path(config.output_dir)
    _check_writable(out)
    record = RunRecord(out)
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if entries and not record.exists():
        raise ConfigError(f"--output_dir {str(out)!r} is not empty and was not written by clm; choose a new or "
                          "empty directory")
    if config.overwrite_output_dir and entries:
        logger.info("Starting fresh in %s (--overwrite_output_dir): removing the earlier run", out)
        for name in os.listdir(out):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        entries = []
    if config.resume_from_checkpoint:
        checkpoints.check_resumable(config.resume_from_checkpoint, config.backend)
        logger.info("Resuming from %s", config.resume_from_checkpoint)
        return config
    if entries:
        if (out / reporting.RESULTS_FILE).exists():
            raise ConfigError(f"--output_dir {str(out)!r} holds a finished run; pass --overwrite_output_dir to "
                              "train again or choose another directory")
        last = checkpoints.latest_checkpoint(out)
        if last is not None:
            checkpoints.check_resumable(last, config.backend)
            logger.info("Resuming from %s, the newest complete checkpoint in %s", last, out)
            return config.replace(resume_from_checkpoint=str(last))
    return config


# --------------------------------------------------------------------------------------------- model limits
def model_max_positions(config: TrainConfig) -> Optional[int]:
    if config.uses_builtin_model:
        return TINY_GPT2["n_positions"]
    from transformers import AutoConfig

    with hub.translate_errors(config.model_name_or_path, "model"):
        model_config = AutoConfig.from_pretrained(config.model_name_or_path, revision=config.model_revision,
                                                  trust_remote_code=config.trust_remote_code)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_block_size(config: TrainConfig) -> TrainConfig:
    """Clamp block_size to the model's positions with a warning, as run_clm.py does."""
    limit = model_max_positions(config)
    if limit is not None and config.block_size > limit:
        logger.warning("--block_size %d is larger than the model's %d positions; using %d",
                       config.block_size, limit, limit)
        return config.replace(block_size=limit)
    return config


def resolve(config: TrainConfig) -> TrainConfig:
    return config.replace(backend=resolve_backend_name(config.backend))


# --------------------------------------------------------------------------------------------- entry points
def train(config: TrainConfig) -> dict[str, Any]:
    """Prepare data, train with the chosen backend, and write the model and results to output_dir."""
    from clm.data import prepare_dataset

    config = resolve(config)
    backend = get_backend(config.backend)  # fail on a missing framework before any work
    backend.check_config(config)  # ...and on what it cannot do, before the output dir is touched
    config = fit_block_size(prepare_output_dir(config))
    tokenizer = load_tokenizer(config)
    with backend.main_process_first(config):  # prepare once; the other processes load the cached copy
        dataset = prepare_dataset(config, tokenizer)
    record = RunRecord(config.output_dir)
    if backend.is_main_process:
        record.update(backend=config.backend, started=record.get("started") or time.strftime("%FT%T"))

    result = backend.train(config, tokenizer, dataset, record)
    metrics = dict(result.metrics)
    metrics.update(backend=config.backend, perplexity=reporting.perplexity(metrics.get("eval_loss")),
                   perplexity_before=reporting.perplexity(metrics.get("eval_loss_before")),
                   block_size=config.block_size)
    if backend.is_main_process:
        reporting.write_outputs(config, metrics, result.log_history)
        record.update(finished=time.strftime("%FT%T"))
    if config.push_to_hub:
        backend.push(config)
    if backend.is_main_process:
        logger.info("eval loss %.4f (perplexity %.2f), before training %.4f (perplexity %.2f); results in %s",
                    metrics["eval_loss"], metrics["perplexity"], metrics["eval_loss_before"],
                    metrics["perplexity_before"], Path(config.output_dir) / reporting.RESULTS_FILE)
    backend.finish()
    return metrics


def evaluate(config: TrainConfig) -> dict[str, Any]:
    """Eval loss and perplexity of ``config.model_name_or_path`` on the eval split; writes eval_results.json."""
    from clm.data import prepare_dataset

    config = resolve(config)
    backend = get_backend(config.backend)
    backend.check_config(config)
    config = fit_block_size(config)
    tokenizer = load_tokenizer(config)
    dataset = prepare_dataset(config, tokenizer)["test"]
    metrics = dict(backend.evaluate_model(config, tokenizer, dataset))
    metrics.update(perplexity=reporting.perplexity(metrics["eval_loss"]), eval_blocks=len(dataset),
                   block_size=config.block_size, backend=config.backend,
                   model_name_or_path=config.model_name_or_path)
    if backend.is_main_process:
        _check_writable(Path(config.output_dir))
        reporting.write_json(Path(config.output_dir) / reporting.EVAL_RESULTS_FILE, metrics)
    backend.finish()
    return metrics


def prepare_to_disk(config: TrainConfig) -> Path:
    """``clm prepare``: the prepared DatasetDict, saved with save_to_disk to output_dir (must be new or empty)."""
    from clm.data import prepare_dataset

    if config.streaming:
        raise ConfigError("clm prepare saves a finite data set; drop --streaming")
    out = Path(config.output_dir)
    _check_writable(out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--output_dir {str(out)!r} is not empty; choose a new or empty directory")
    config = fit_block_size(config)
    dataset = prepare_dataset(config, load_tokenizer(config))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
    return out


def generate(model_name_or_path: str, prompt: str | list[str], backend: Optional[str] = None,
             max_new_tokens: int = 100, do_sample: bool = True, top_k: int = 50, top_p: float = 0.95,
             seed: Optional[int] = None) -> list[str]:
    """Prompt plus continuation for each prompt (the guide's sampling settings by default)."""
    if max_new_tokens <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError("--max_new_tokens must be positive, --top_k >= 0 and --top_p in (0, 1]")
    hub.check_local(model_name_or_path, "model")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(p.strip() for p in prompts):
        raise ClmError("--prompt is empty; give some text to continue")
    engine = get_backend(backend)
    return engine.generate(model_name_or_path, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           top_k=top_k, top_p=top_p, seed=seed)
