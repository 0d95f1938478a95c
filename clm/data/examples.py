"""Examples: prompt/completion and conversational rows to token ids with a loss mask (``labels``, -100 where no
loss), the stage between rows and packing for the two example formats. Plain text goes through ``tokens``.

- prompt/completion: the prompt's ids (with the tokenizer's own special tokens, a BOS for Llama-like ones), then
  the completion's, then EOS. The completion and its EOS are trained; the prompt too with
  ``--no_completion_only_loss``. Prompt and completion are tokenized apart, so the boundary is exact and a
  prompt at generation time gets the ids it had in training.
- messages: rendered with the chat template. Any template works, with or without ``{% generation %}``
  markers: the conversation is rendered up to each assistant turn (with the generation prompt) and through it,
  and the text between is that turn. Each piece is tokenized apart, so the mask is exact. The template's own
  end of turn is trained with the turn; a turn that ends in no special token gets EOS.

An example with nothing to train on (an empty completion, no assistant turn) is dropped and counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from clm.collate import IGNORE_INDEX
from clm.data.rows import arrow_texts, as_text, flatten_row
from clm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

logger = logging.getLogger(__name__)

TEXT, PROMPT_COMPLETION, MESSAGES = "text", "prompt_completion", "messages"
MESSAGES_COLUMN = "messages"


def data_format(columns: Iterable[str], config: "TrainConfig") -> str:
    """'text', 'prompt_completion' or 'messages', from the (flattened) columns and the flags; the flags that
    belong to another format are refused in one line."""
    columns = list(columns)
    top = {c.split(".")[0] for c in columns}
    if config.prompt_column:
        for name in (config.prompt_column, config.completion_column):
            if name not in columns:
                raise DataError(f"column {name!r} not found; columns: {', '.join(columns)}")
        kind = PROMPT_COMPLETION
    elif config.text_column:
        kind = TEXT
    elif MESSAGES_COLUMN in top:
        kind = MESSAGES
    elif {"prompt", "completion"} <= set(columns):
        kind = PROMPT_COMPLETION
    else:
        kind = TEXT
    wrong = {PROMPT_COMPLETION: ("assistant_only_loss", "chat_template"),
             MESSAGES: ("completion_only_loss",),
             TEXT: ("completion_only_loss", "assistant_only_loss", "chat_template")}[kind]
    for name in wrong:
        if getattr(config, name) is not None:
            raise ConfigError(f"--{name} does not apply: the data is {describe(kind)}; drop it")
    return kind


def describe(kind: str) -> str:
    return {TEXT: "plain text", PROMPT_COMPLETION: "prompt/completion", MESSAGES: "conversational (messages)"}[kind]


def prompt_completion_columns(config: "TrainConfig") -> tuple[str, str]:
    return config.prompt_column or "prompt", config.completion_column or "completion"


def packing_for(kind: str, config: "TrainConfig") -> str:
    """--packing, else the format's default: wrapped for plain text, bfd for examples."""
    return config.packing or ("wrapped" if kind == TEXT else "bfd")


def packs_examples(config: "TrainConfig") -> bool:
    """Whether the flags alone say the rows will be packed examples (bfd/none), so a backend can refuse a family
    before any data is read; conversational data found by its column is checked once it is prepared."""
    return config.packing in ("bfd", "none") or (
        config.packing is None and bool(config.prompt_column or config.chat_template))


def trains_everything(kind: str, config: "TrainConfig") -> bool:
    """Whether every token of an example is trained (the loss-mask switches, on by default, turned off)."""
    if kind == PROMPT_COMPLETION:
        return config.completion_only_loss is False
    return config.assistant_only_loss is False


# ------------------------------------------------------------------------------------ prompt/completion
def _prompt_completion_fn(tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig") -> Callable[..., Any]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("prompt/completion data needs a tokenizer with an EOS token (it ends each completion); "
                        "use a tokenizer that has one")
    prompt_loss = trains_everything(PROMPT_COMPLETION, config)

    def tokenize_batch(prompts: Any, completions: Any) -> Any:
        prompts, completions = arrow_texts(prompts), arrow_texts(completions)
        keep = [i for i, c in enumerate(completions) if c.strip()]  # nothing to learn from an empty answer
        prompts = [prompts[i] for i in keep]
        completions = [completions[i] for i in keep]
        p_ids = tokenizer(prompts, return_attention_mask=False)["input_ids"] if keep else []
        c_ids = tokenizer(completions, add_special_tokens=False, return_attention_mask=False)["input_ids"] \
            if keep else []
        ids, labels = [], []
        for p, c in zip(p_ids, c_ids):
            c.append(eos)
            ids.append(p + c)
            labels.append((p if prompt_loss else [IGNORE_INDEX] * len(p)) + c)
        return _table(ids, labels)

    return tokenize_batch


def _table(ids: list[list[int]], labels: list[list[int]]) -> Any:
    import pyarrow as pa

    return pa.table({"input_ids": pa.array(ids, type=pa.list_(pa.int32())),
                     "labels": pa.array(labels, type=pa.list_(pa.int32()))})


# ------------------------------------------------------------------------------------------------ messages
def chat_template(tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig") -> str:
    """--chat_template's file (``clm.load_tokenizer`` also gives it to the tokenizer, which saves it with the
    model), else the tokenizer's own template; neither is one line."""
    if config.chat_template:
        return read_chat_template(config.chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data is conversational (a 'messages' column) but the tokenizer has no chat template; "
                        "pass --chat_template FILE (a Jinja template)")
    return tokenizer.chat_template


def read_chat_template(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"--chat_template {path!r} is not a file; give a Jinja template file")
    return Path(path).read_text()


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # a CSV cell, or JSON kept as text
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise DataError("each 'messages' cell must be a list of {\"role\", \"content\"} objects; fix the data")
    return [{"role": str(m["role"]), "content": as_text(m["content"])} for m in value]


def render(tokenizer: "PreTrainedTokenizerBase", template: str, messages: list[dict[str, str]],
           add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError and friends, raised from the template itself
        raise DataError(f"the chat template failed on a conversation: {str(exc).splitlines()[0]}; fix the "
                        "template (--chat_template) or the data") from exc


def conversation_pieces(tokenizer: "PreTrainedTokenizerBase", template: str,
                        messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is an assistant turn) pieces, in order; joined, they are the whole
    rendering. Found by rendering up to each assistant turn and through it: any template, no markers needed."""
    full = render(tokenizer, template, messages)
    pieces: list[tuple[str, bool]] = []
    at = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, template, messages[:i + 1])
        if not (full.startswith(before) and full.startswith(through) and at <= len(before) <= len(through)):
            raise DataError("the chat template does not render a conversation turn by turn (an earlier turn "
                            "changes when a later one is added), so the assistant tokens cannot be found; pass "
                            "--no_assistant_only_loss or a --chat_template that does")
        pieces += [(full[at:len(before)], False), (full[len(before):len(through)], True)]
        at = len(through)
    pieces.append((full[at:], False))
    return [(text, trained) for text, trained in pieces if text]


def _messages_fn(tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig") -> Callable[..., Any]:
    template = chat_template(tokenizer, config)
    everything = trains_everything(MESSAGES, config)
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})

    def tokenize_batch(cells: Any) -> Any:
        ids, labels = [], []
        for cell in cells.to_pylist():
            messages = _messages(cell)
            if not any(m["role"] == "assistant" for m in messages):
                continue  # nothing to train on
            pieces = ([(render(tokenizer, template, messages), True)] if everything
                      else conversation_pieces(tokenizer, template, messages))
            piece_ids = tokenizer([t for t, _ in pieces], add_special_tokens=False,
                                  return_attention_mask=False)["input_ids"]
            row, row_labels = [], []
            for (_, trained), p in zip(pieces, piece_ids):
                if trained and eos is not None and not special.intersection(p):
                    p = p + [eos]  # a template with no end of turn: EOS teaches the model to stop
                row += p
                row_labels += p if trained else [IGNORE_INDEX] * len(p)
            ids.append(row)
            labels.append(row_labels)
        return _table(ids, labels)

    return tokenize_batch


# ---------------------------------------------------------------------------------------------- both
def example_fn(kind: str, tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig") -> tuple[Callable, list[str]]:
    """The batch function (Arrow columns in, an Arrow table of input_ids and labels out) and its columns."""
    if kind == PROMPT_COMPLETION:
        return _prompt_completion_fn(tokenizer, config), list(prompt_completion_columns(config))
    return _messages_fn(tokenizer, config), [MESSAGES_COLUMN]


def tokenize_examples(ds: "Dataset", kind: str, tokenizer: "PreTrainedTokenizerBase", config: "TrainConfig",
                      load_from_cache_file: Optional[bool] = None, name: str = "") -> "Dataset":
    """A split of rows to ``input_ids`` and ``labels`` (int32 lists), in order; rows with nothing to train on
    are dropped and counted in the log."""
    from datasets import Features, Sequence, Value

    from clm.data.tokens import worker_count

    if kind == PROMPT_COMPLETION:
        ds = ds.flatten()
    fn, columns = example_fn(kind, tokenizer, config)
    out = ds.with_format("arrow").map(
        fn, batched=True, batch_size=256, input_columns=columns,
        remove_columns=ds.column_names,
        features=Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}),
        num_proc=worker_count(config, len(ds)), load_from_cache_file=load_from_cache_file,
        desc="Tokenizing examples").with_format(None)
    dropped = len(ds) - len(out)
    if dropped:
        logger.warning("Dropped %d of %d %s examples with nothing to train on (%s)", dropped, len(ds), name or "",
                       "an empty completion" if kind == PROMPT_COMPLETION else "no assistant turn")
    return out


def stream_examples(rows: Iterable[dict[str, Any]], kind: str, tokenizer: "PreTrainedTokenizerBase",
                    config: "TrainConfig", batch: int = 256) -> Iterable[tuple[list[int], list[int]]]:
    """Streamed (nested) rows to (input_ids, labels), the ids ``tokenize_examples`` gives the same rows."""
    import pyarrow as pa

    fn, columns = example_fn(kind, tokenizer, config)
    held: list[dict[str, Any]] = []

    def flush() -> Iterable[tuple[list[int], list[int]]]:
        if kind == PROMPT_COMPLETION:
            flat = [flatten_row(r) for r in held]
            cols = [pa.array([as_text(r.get(c)) for r in flat], type=pa.string()) for c in columns]
        else:
            cols = [pa.array([json.dumps(r.get(MESSAGES_COLUMN)) for r in held], type=pa.string())]
        table = fn(*cols)
        yield from zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist())

    for row in rows:
        held.append(row)
        if len(held) == batch:
            yield from flush()
            held = []
    if held:
        yield from flush()
