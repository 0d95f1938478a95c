"""Presets: named recipes whose values fill the TrainConfig fields a caller leaves out.

A preset is applied in one place, ``TrainConfig.__init__`` (``preset_under_given``), under every value the
caller gave, whether from flags, a config file or Python; a data source of the caller's replaces all of the
preset's data fields.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Literal, Optional, TypeVar

from clm.errors import ConfigError

PresetName = Literal["tiny", "guide", "eli5_qa"]

PRESETS: dict[str, dict[str, Any]] = {
    # The offline default: built-in tiny GPT-2, packaged GPT-2 tokenizer, bundled ELI5-layout sample.
    "tiny": {},
    # The Hugging Face causal language modeling guide, as published (needs the Hub).
    "guide": {
        "model_name_or_path": "distilbert/distilgpt2",
        "dataset_name": "eli5_category",
        "dataset_split": "train[:5000]",
        "learning_rate": 2e-5,
        "weight_decay": 0.01,
        "num_train_epochs": 3.0,
        "block_size": 128,
        "output_dir": "my_awesome_eli5_clm-model",
    },
}
# The guide's recipe on its data as questions and answers: the title is the prompt, the answers the
# completion (loss on the answers, whole examples packed by best fit). The columns stay with a data source of
# the caller's, so an ELI5-layout file of one's own (the bundled sample) trains as Q&A too.
PRESETS["eli5_qa"] = {**PRESETS["guide"], "prompt_column": "title", "completion_column": "answers.text",
                      "output_dir": "my_awesome_eli5_qa-model"}
# Giving any of these names a new data source, which replaces all of a preset's data fields (its dataset's
# split or config would make no sense for the user's file).
DATA_SOURCE_FIELDS = ("dataset_name", "train_file")
DATA_FIELDS = (*DATA_SOURCE_FIELDS, "dataset_config_name", "dataset_split", "text_column")

T = TypeVar("T")


def preset_values(name: Optional[str], given: typing.Collection[str]) -> dict[str, Any]:
    """The values preset ``name`` contributes when the caller gave the fields in ``given``."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = PRESETS[name]
    if any(key in given for key in DATA_SOURCE_FIELDS):
        values = {k: v for k, v in values.items() if k not in DATA_FIELDS}
    return {k: v for k, v in values.items() if k not in given}


def preset_under_given(cls: type[T]) -> type[T]:
    """Wrap the dataclass ``__init__`` so a ``preset`` fills only the fields the call leaves out.

    ``dataclasses.replace`` passes every field, so a copy keeps its values and never re-applies the preset.
    """
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        given = {**dict(zip(names, args)), **kwargs}
        init(self, *args, **kwargs, **preset_values(given.get("preset"), given))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls
