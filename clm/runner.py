"""train / evaluate / generate: the functions behind both the CLI and ``import clm``.

Framework-free orchestration: output-dir checks, resume detection, tokenizer and data, then the chosen
backend, then results. Only the main process writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from clm import checkpoints, hub, lock, preemption, reporting
from clm.backends import get_backend, resolve_backend_name
from clm.checkpoints import RunRecord
from clm.config import GenerateConfig, TrainConfig
from clm.defaults import TINY_GPT2, load_tokenizer
from clm.errors import ClmError, ConfigError, Preempted, WriteError, writing
from clm.io import atomic_path, write_json

logger = logging.getLogger("clm")


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
            if name == lock.LOCK_FILE:  # this run's lock: removing it would let a second run take a new one
                continue
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
    config = resolve(config)
    backend = get_backend(config.backend)  # fail on a missing framework before any work
    backend.check_config(config)  # ...and on what it cannot do, before the output dir is touched
    _check_writable(Path(config.output_dir))
    # One run per output_dir, locked before anything in it changes; the main process holds it for the others.
    with lock.hold(config.output_dir, enabled=backend.is_main_process):
        return _train(config, backend)


@contextlib.contextmanager
def _stop_signals(out: Path, backend: Any) -> Iterator[None]:
    """SIGTERM/SIGINT/SIGUSR1 during the block stop the run at a checkpoint (``clm.preemption``); a stop or a
    failed write names the checkpoint the same command resumes from."""
    with preemption.handling():
        try:
            yield
        except preemption.Interrupted as exc:  # outside training: nothing new to save
            raise _resume_point(Preempted(exc.signum), out, backend) from None
        except (Preempted, WriteError) as exc:
            raise _resume_point(exc, out, backend)
        if preemption.stop_signal() is not None and backend.is_main_process:
            logger.warning("The stop signal came while the final model and results were saved; the run is finished")


def _resume_point(exc: Any, out: Path, backend: Any) -> Any:
    latest = checkpoints.latest_checkpoint(out)
    if isinstance(exc, WriteError):
        exc.resume_from = str(latest) if latest else None
        return exc
    exc.checkpoint, exc.report = (str(latest) if latest else None), backend.is_main_process
    if exc.saved:  # every process stopped at the same step: they can leave together
        backend.finish()
    return exc


def _train(config: TrainConfig, backend: Any) -> dict[str, Any]:
    from clm.data import prepare_dataset

    with _stop_signals(Path(config.output_dir), backend):
        config = fit_block_size(prepare_output_dir(config))
        tokenizer = load_tokenizer(config)
        with backend.main_process_first(config):  # prepare once; the other processes load the cached copy
            dataset = prepare_dataset(config, tokenizer)
        record = RunRecord(config.output_dir)
        if backend.is_main_process:
            with writing("writing the run record", record.path):
                record.update(backend=config.backend, started=record.get("started") or time.strftime("%FT%T"))

        def keep_before(before: dict[str, Any]) -> None:  # a resumed run must not measure them again
            if backend.is_main_process:
                record.update(eval_loss_before=before["eval_loss"], eval_before=before)

        result = backend.train(config, tokenizer, dataset, _before_training(record, config), keep_before)
        metrics = dict(result.metrics)
        metrics.update(backend=config.backend, perplexity=reporting.perplexity(metrics.get("eval_loss")),
                       perplexity_before=reporting.perplexity(metrics.get("eval_loss_before")),
                       block_size=config.block_size, **data_description(dataset, config))
        if backend.is_main_process:  # the model is in place: finish the small files rather than stop between
            with preemption.deferred(), writing("writing the results", config.output_dir):
                reporting.write_outputs(config, metrics, result.log_history, result.samples)
                record.update(finished=time.strftime("%FT%T"))
    push_error = _push_after_training(backend, config)
    if backend.is_main_process:
        logger.info("eval loss %.4f (perplexity %.2f, accuracy %s), before training %.4f (perplexity %.2f, "
                    "accuracy %s); results in %s", metrics["eval_loss"], metrics["perplexity"],
                    _fmt(metrics.get("eval_accuracy")), metrics["eval_loss_before"], metrics["perplexity_before"],
                    _fmt(metrics.get("eval_accuracy_before")), Path(config.output_dir) / reporting.RESULTS_FILE)
    backend.finish()  # every process leaves together, a failed push or not
    if push_error is not None:
        raise push_error
    return metrics


def _before_training(record: RunRecord, config: TrainConfig) -> Optional[dict[str, Any]]:
    """The metrics before training that a resumed run's first session measured, from the run record."""
    if not config.resume_from_checkpoint:
        return None
    before = record.get("eval_before")
    if before is None and record.get("eval_loss_before") is not None:  # a record from before eval_before
        before = {"eval_loss": record.get("eval_loss_before")}
    return before


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _push_after_training(backend: Any, config: TrainConfig) -> Optional[ClmError]:
    """--push_to_hub, once the model, results and card are in place. A failed upload loses nothing: the error
    says how to upload the same directory again."""
    from clm.hub_push import HubPushError

    if not config.push_to_hub:
        return None
    try:
        backend.push(config)
    except HubPushError as exc:
        retry = f"clm push --output_dir {shlex.quote(config.output_dir)}" + (
            f" --hub_model_id {config.hub_model_id}" if config.hub_model_id else "")
        failed = HubPushError(f"{exc}. The trained model and results are complete in {config.output_dir}; "
                              f"upload them with: {retry}")
        failed.__cause__ = exc
        return failed
    return None


def data_description(dataset: Any, config: TrainConfig) -> dict[str, str]:
    """The data format, the packing and which tokens the loss and accuracy count, for the results."""
    from clm.data.examples import MESSAGES, PROMPT_COMPLETION, TEXT, trains_everything

    kind = getattr(dataset, "data_format", TEXT)
    scored = "all tokens" if kind == TEXT or trains_everything(kind, config) else {
        PROMPT_COMPLETION: "completion tokens", MESSAGES: "assistant tokens"}[kind]
    return {"data_format": kind, "packing": getattr(dataset, "packing", "wrapped"), "loss_tokens": scored}


def evaluate(config: TrainConfig) -> dict[str, Any]:
    """Eval loss and perplexity of ``config.model_name_or_path`` on the eval split; writes eval_results.json."""
    from clm.data import prepare_dataset

    config = resolve(config)
    backend = get_backend(config.backend)
    backend.check_config(config)
    config = fit_block_size(config)
    tokenizer = load_tokenizer(config)
    prepared = prepare_dataset(config, tokenizer)
    dataset = prepared["test"]
    split = reporting.eval_split(config)
    if backend.is_main_process:
        logger.info("Evaluating %s on %s: %d blocks of %d tokens", config.model_name_or_path, split, len(dataset),
                    config.block_size)
    metrics = dict(backend.evaluate_model(config, tokenizer, dataset))
    metrics.update(perplexity=reporting.perplexity(metrics["eval_loss"]), eval_blocks=len(dataset),
                   block_size=config.block_size, backend=config.backend,
                   model_name_or_path=config.model_name_or_path, eval_split=split,
                   **data_description(prepared, config))
    if backend.is_main_process:
        _check_writable(Path(config.output_dir))
        write_json(Path(config.output_dir) / reporting.EVAL_RESULTS_FILE, metrics)
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
    with atomic_path(out) as tmp:
        dataset.save_to_disk(str(tmp))
    return out


def push(output_dir: str, hub_model_id: Optional[str] = None, hub_private_repo: bool = False,
         hub_strategy: str = "end") -> str:
    """``clm push``: upload a finished run's output dir to the Hub (after a failed push, or later): its public
    files, plus checkpoints as ``hub_strategy`` says. Returns the repo URL."""
    from clm.hub_push import HubPush

    out = Path(output_dir)
    if not (out / reporting.RESULTS_FILE).is_file() or not RunRecord(out).exists():
        raise ConfigError(f"--output_dir {output_dir!r} holds no finished clm run (no {reporting.RESULTS_FILE}); "
                          "give the output dir of a training run that finished")
    return HubPush(out, hub_model_id, private=hub_private_repo or None, strategy=hub_strategy).finish()


def generate(model_name_or_path: str, prompt: str | list[str], backend: Optional[str] = None,
             max_new_tokens: int = GenerateConfig.max_new_tokens, do_sample: bool = GenerateConfig.do_sample,
             top_k: int = GenerateConfig.top_k, top_p: float = GenerateConfig.top_p,
             seed: Optional[int] = None, chat: Optional[bool] = None) -> list[str]:
    """Prompt plus continuation for each prompt (the guide's sampling settings by default). ``chat``: each
    prompt as a user message through the chat template, the reply after it (default: on for a model trained
    on conversations)."""
    options = GenerateConfig(model_name_or_path, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             top_k=top_k, top_p=top_p, seed=seed, backend=backend, chat=chat)
    hub.check_local(model_name_or_path, "model")
    if chat is None:
        chat = reporting.trained_format(model_name_or_path) == "messages"
    return get_backend(backend).generate(model_name_or_path, options.prompt, seed=seed, chat=chat,
                                         **options.sampling())
