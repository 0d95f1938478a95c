"""Sample generations at each evaluation (--sample_prompts, --sample_max_new_tokens), framework-free parts:
which prompts, and how the continuations are shown (TensorBoard text, the model card).

The prompts are fixed for the run and the sampling is seeded with --seed at every evaluation, so two
evaluations differ only by the weights. The backends generate with the model being trained and its generation
config (the run's sampling settings), on the main process only, with the training RNG left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from clm.collate import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clm.config import TrainConfig

DEFAULT_PROMPTS = 2  # how many eval documents lend their opening words
PROMPT_TOKENS = 6  # opening tokens taken from each


def default_prompts(test: Any, tokenizer: "PreTrainedTokenizerBase", n: int = DEFAULT_PROMPTS,
                    tokens: int = PROMPT_TOKENS) -> list[str]:
    """The opening words of the first ``n`` eval documents. Eval blocks are the eval documents' token stream
    cut in order, so documents start at the stream's start and after each EOS (clm puts one after every
    document); a document shorter than ``tokens`` is passed over."""
    eos = tokenizer.eos_token_id
    stream = [t for i in range(min(len(test), 8)) for t in test[i]["input_ids"]]  # a few blocks are plenty
    starts = [0] + [j + 1 for j, t in enumerate(stream) if t == eos]
    prompts: list[str] = []
    for start in starts:
        piece = stream[start:start + tokens]
        if len(piece) == tokens and eos not in piece:
            text = tokenizer.decode(piece, skip_special_tokens=True).strip()
            if text and text not in prompts:
                prompts.append(text)
        if len(prompts) == n:
            break
    return prompts


def example_prompts(test: Any, tokenizer: "PreTrainedTokenizerBase", n: int = DEFAULT_PROMPTS) -> list[str]:
    """The prompts of the first ``n`` eval examples (rows with labels): each example's tokens before its first
    trained one (the question, or the conversation up to the assistant's turn), so the samples show what the
    model answers."""
    prompts: list[str] = []
    for i in range(min(len(test), 8)):
        row = test[i]
        ids, labels = row["input_ids"], row["labels"]
        positions = row.get("position_ids") or list(range(len(ids)))
        starts = [j for j, p in enumerate(positions) if p == 0] + [len(ids)]
        for begin, end in zip(starts, starts[1:]):
            trained = [j for j in range(begin + 1, end) if labels[j] != IGNORE_INDEX]
            if not trained or trained[0] - begin < 2:  # no prompt before the answer (a piece of a long one)
                continue
            # Special tokens kept (a chat template's markers), but not a leading BOS, which generation adds back
            first = begin + 1 if ids[begin] == tokenizer.bos_token_id else begin
            text = tokenizer.decode(ids[first:trained[0]], skip_special_tokens=False)
            if text.strip() and text not in prompts:
                prompts.append(text)
            if len(prompts) == n:
                return prompts
    return prompts


def choose_prompts(config: "TrainConfig", tokenizer: "PreTrainedTokenizerBase", test: Any) -> list[str]:
    """--sample_prompts, else the default ones; none when --sample_max_new_tokens is 0."""
    if not config.sample_max_new_tokens:
        return []
    if config.sample_prompts:
        return [p for p in config.sample_prompts if p.strip()]
    if "labels" in test.column_names:
        return example_prompts(test, tokenizer)
    return default_prompts(test, tokenizer)


def as_markdown(samples: list[tuple[str, str]], step: Optional[int] = None) -> str:
    """Prompt and continuation per sample, for TensorBoard's text tab and the model card."""
    head = f"Step {step}\n\n" if step is not None else ""
    return head + "\n\n".join(f"**{prompt}**{text[len(prompt):] if text.startswith(prompt) else ' ' + text}"
                              for prompt, text in samples)
