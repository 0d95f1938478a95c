"""The field helper every settings dataclass uses, and the options of ``clm generate`` and ``clm push``.

Each field's ``help`` becomes its ``--help`` text and a ``Literal`` field's values become its choices
(``clm.cli`` builds every command's parser from its dataclass). ``TrainConfig`` lives in ``clm.config``.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from clm.errors import ConfigError

HubStrategy = Literal["end", "every_save", "checkpoint", "all_checkpoints"]  # TrainingArguments' hub_strategy


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text HfArgumentParser shows in --help (``dataclasses.MISSING``: required)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@functools.lru_cache(maxsize=None)
def field_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field name -> allowed values, for each ``Literal`` (or ``Optional[Literal]``) field of ``cls``."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals:
            out[name] = typing.get_args(literals[0])
    return out


def check_choices(obj: Any) -> None:
    """One-line ConfigError for a Literal field holding another value (``None`` only where the default is)."""
    for f in dataclasses.fields(obj):
        allowed = field_choices(type(obj)).get(f.name)
        value = getattr(obj, f.name)
        if allowed is None or (value is None and f.default is None) or value in allowed:
            continue
        raise ConfigError(f"--{f.name} must be one of: {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class GenerateConfig:
    """Options of ``clm generate``; its defaults are also ``clm.generate``'s and the trained model's
    generation_config (``GENERATION_DEFAULTS``): the guide's sampling settings."""

    model_name_or_path: str = _f(dataclasses.MISSING, "Trained model directory (or Hub id).")
    prompt: list[str] = _f(dataclasses.MISSING, "Text to continue: several after one --prompt, or --prompt "
                           "repeated.", action="extend")
    max_new_tokens: int = _f(100, "Tokens to add to each prompt.")
    do_sample: bool = _f(True, "Sample from the top_k/top_p tokens; --no_do_sample decodes greedily.")
    top_k: int = _f(50, "Sample from the k most likely tokens (0: no limit).")
    top_p: float = _f(0.95, "Sample from the smallest set of tokens whose probabilities sum to top_p.")
    seed: Optional[int] = _f(None, "Seed for reproducible sampling.")
    chat: Optional[bool] = _f(
        None, "Give each prompt as a user message through the model's chat template and print the reply after "
        "it. Default: on for a model trained on conversations (its all_results.json says data_format messages).")
    backend: Optional[str] = _f(None, "'pt', 'tf' or 'keras'. Default: $CLM_BACKEND, else the first installed.")

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if self.max_new_tokens <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--max_new_tokens must be positive, --top_k >= 0 and --top_p in (0, 1]")
        if not self.prompt or not all(p.strip() for p in self.prompt):
            raise ConfigError("--prompt is empty; give some text to continue")

    def sampling(self) -> dict[str, Any]:
        """The options ``Backend.generate`` takes besides the model and prompts."""
        return {name: getattr(self, name) for name in GENERATION_DEFAULTS}


@dataclass
class PushConfig:
    """Options of ``clm push`` (``clm.push``): upload a finished run's output dir to the Hub."""

    output_dir: str = _f(dataclasses.MISSING, "Output dir of a finished training run.")
    hub_model_id: Optional[str] = _f(None, "Hub repository, e.g. 'user/my-model'. Default: the output dir's name, "
                                           "under your account.")
    hub_private_repo: bool = _f(False, "Create the repository as private (no effect on an existing one).")
    hub_strategy: HubStrategy = _f("end", "'end': the model, card and results; 'checkpoint' adds the newest "
                                          "checkpoint as last-checkpoint/, 'all_checkpoints' every checkpoint.")

    def __post_init__(self) -> None:
        check_choices(self)


# The sampling defaults, written once (GenerateConfig's fields): clm.generate's and the saved generation_config's.
GENERATION_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GenerateConfig)
                                       if f.name in ("max_new_tokens", "do_sample", "top_k", "top_p")}
