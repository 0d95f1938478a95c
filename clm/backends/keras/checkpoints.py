"""Checkpoints a keras run resumes from exactly, on TensorFlow and JAX alike: ``output_dir/checkpoint-<step>/``
holds ``keras_state.npz`` (every model weight, every optimizer variable with its step counter and Adam moments,
and the state of every random-seed generator, so dropout draws what an uninterrupted run draws), the model in
Hugging Face format (a checkpoint is itself a model folder any backend evaluates) and ``trainer_state.json``
(step, log history, running loss sum), written last. The batches of a step are a function of the seed and the
step (``trainer.train_batches``), so data position needs no state. Written into a hidden folder and renamed into
place; names, completeness and pruning are the framework-free ``clm.checkpoints``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from clm import checkpoints
from clm.backends.keras.model import save_pretrained
from clm.errors import writing
from clm.io import atomic_path, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def seed_generators(keras: Any, model: Any) -> list[Any]:
    """Every ``keras.random.SeedGenerator`` the model's layers hold (dropout's), in a fixed order."""
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for value in vars(layer).values():
            if isinstance(value, keras.random.SeedGenerator) and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def _state_variables(keras: Any, model: Any) -> dict[str, list[Any]]:
    model.optimizer.build(model.trainable_variables)  # its variables exist before the first step restores them
    return {"model": list(model.weights), "optimizer": list(model.optimizer.variables),
            "rng": [g.state for g in seed_generators(keras, model)]}


class Checkpointer:
    def __init__(self, keras: Any, model: Any, tokenizer: "PreTrainedTokenizerBase", output_dir: str,
                 save_total_limit: Optional[int], export: Any = None) -> None:
        """``model``: what trains (its weights, optimizer and generators are saved); ``export``: the KerasHub
        CausalLM written in Hugging Face format beside them (``model`` itself by default)."""
        self.keras, self.model, self.tokenizer = keras, model, tokenizer
        self.export = export if export is not None else model
        self.output_dir, self.save_total_limit = Path(output_dir), save_total_limit

    def save(self, step: int, state: dict[str, Any], keep: Optional[str] = None) -> Path:
        """Write checkpoint-<step>; ``keep`` (the best checkpoint) survives --save_total_limit's pruning."""
        final = self.output_dir / checkpoints.checkpoint_name(step)
        arrays = {f"{group}/{i}": np.asarray(self.keras.ops.convert_to_numpy(v))
                  for group, variables in _state_variables(self.keras, self.model).items()
                  for i, v in enumerate(variables)}
        with writing(f"saving {final.name}", final), atomic_path(final) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            np.savez(tmp / checkpoints.KERAS_STATE_FILE, **arrays)
            save_pretrained(self.export, self.tokenizer, str(tmp))
            write_json(tmp / checkpoints.DONE_FILE, state)  # last: marks the checkpoint complete
        checkpoints.prune(self.output_dir, self.save_total_limit, keep=final, also_keep=keep)
        return final

    def restore_best(self, best: str, last_step: int, keep_only_best: bool) -> None:
        """--load_best_model_at_end: the weights of checkpoint ``best``; with --save_total_limit 1 the last
        checkpoint then goes, as the Trainer's ``_load_best_model`` leaves it."""
        saved = np.load(Path(best) / checkpoints.KERAS_STATE_FILE)
        for i, variable in enumerate(self.model.weights):
            variable.assign(saved[f"model/{i}"])
        last = self.output_dir / checkpoints.checkpoint_name(last_step)
        if keep_only_best and last.is_dir() and last.resolve() != Path(best).resolve():
            import shutil

            shutil.rmtree(last, ignore_errors=True)

    def restore(self, path: str) -> dict[str, Any]:
        saved = np.load(Path(path) / checkpoints.KERAS_STATE_FILE)
        for group, variables in _state_variables(self.keras, self.model).items():
            for i, variable in enumerate(variables):
                variable.assign(saved[f"{group}/{i}"])
        return checkpoints.read_state(path)
