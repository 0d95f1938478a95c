"""Tiny random models of several families, saved by PyTorch as safetensors with a small word-level tokenizer that
has its own pad token (unlike GPT-2's), built offline. Shared by test_families.py and test_lora.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import eli5_rows

VOCAB = 64  # the word tokenizer's 25 tokens, and room to spare
SPECIALS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family -> (transformers config class, its arguments): 2 layers, hidden 32, 128 positions
CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    "opt": ("OPTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                              max_position_embeddings=128, word_embed_proj_dim=32)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)),
    "gptj": ("GPTJConfig", dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128)),
    "xglm": ("XGLMConfig", dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64,
                                max_position_embeddings=128)),
}
PT_FAMILIES = ["gpt2", "opt", "mistral", "llama", "qwen2"]
TF_FAMILIES = ["gpt2", "opt", "mistral"]  # trained on both backends; gptj and xglm: weights checked both ways


def word_tokenizer():
    """A word-level fast tokenizer over the test data's words, with <pad> (0), <s> (1) and </s> (2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for row in eli5_rows(20) for text in row["answers"]["text"]
                    for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=128)


def model_config(family: str, **overrides):
    import transformers

    cls, kwargs = CONFIGS[family]
    return getattr(transformers, cls)(vocab_size=VOCAB, **SPECIALS, **{**kwargs, **overrides})


def save_tiny(family: str, out: Path, **overrides) -> Path:
    """A tiny ``family`` model (random weights from seed 0) with the word tokenizer, saved by PyTorch. Runs name
    ``save_word_tokenizer``'s folder as --tokenizer_name: transformers 5 loads a qwen2 directory's tokenizer as a
    Qwen2Tokenizer, which re-splits a word-level vocabulary."""
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config(family, **overrides)).save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return out


def save_word_tokenizer(out: Path) -> Path:
    """The word tokenizer alone (no config.json beside it, so every transformers version loads it as is)."""
    word_tokenizer().save_pretrained(out)
    return out
