"""Packed examples on the backends: with --packing bfd no token attends to another example (one checkpoint scores
the same with bfd as with none, on each family that packs), PyTorch and TensorFlow agree for each format and
packing, and a run on conversations trains the replies and answers through the chat template."""

from __future__ import annotations

import json

import pytest

import clm
from clm.config import TrainConfig
from clm.data import prepare_dataset
from clm.defaults import load_tokenizer
from conftest import eli5_rows, recipe_config, write_jsonl
from test_examples import TEMPLATE, chat_rows, qa_rows
from tiny_families import save_tiny, save_word_tokenizer

PT_PACKED = ["gpt2", "opt", "mistral", "llama", "qwen2", "gptj", "xglm"]  # clm.backends.pt.packed.CHECKED_FAMILIES
TF_PACKED = ["gpt2", "opt", "mistral", "gptj", "xglm"]  # clm.backends.tf.packed.FAMILIES
# Weights far from uniform (std 0.5, not 0.02), so attention across examples would move the scores.
WIDE_INIT = {"initializer_range": 0.5, "init_std": 0.5}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    rows = [{"prompt": " ".join(r["answers"]["text"][0].split()[:3 + i % 4]),
             "completion": " " + " ".join(r["answers"]["text"][1].split()[: 4 + (7 * i) % 19])}
            for i, r in enumerate(eli5_rows(60))]
    return {"root": root, "qa": write_jsonl(root / "qa.jsonl", rows), "tok": save_word_tokenizer(root / "tok")}


def _scores(backend: str, model, data, tokenizer, **kw) -> dict[str, float]:
    """Eval loss of ``model`` on the eval split of ``data`` for each --packing, with ``backend``."""
    out = {}
    for packing in ("bfd", "none"):
        config = recipe_config(model_name_or_path=model, tokenizer_name=tokenizer, train_file=data, block_size=48,
                               packing=packing, backend=backend, **kw)
        tok = load_tokenizer(config)
        test = prepare_dataset(config, tok)["test"]
        out[packing] = clm.get_backend(backend).evaluate_model(config, tok, test)["eval_loss"]
        out[f"{packing}_rows"] = len(test)
    return out


def _family_model(workdir, family):
    path = workdir["root"] / f"model-{family}"
    if not path.exists():
        overrides = {k: v for k, v in WIDE_INIT.items() if k in _init_keys(family)}
        save_tiny(family, path, **overrides)
    return path


def _init_keys(family: str) -> set[str]:
    from tiny_families import model_config

    config = model_config(family)
    return {k for k in WIDE_INIT if hasattr(config, k)}


@pytest.mark.compat  # transformers 4.57 builds some families' masks differently (XGLM): both lines are checked
@pytest.mark.parametrize("family", PT_PACKED)
def test_bfd_scores_what_none_scores_on_pytorch(workdir, family):
    pytest.importorskip("torch")
    got = _scores("pt", _family_model(workdir, family), workdir["qa"], workdir["tok"])
    assert got["bfd_rows"] < got["none_rows"] * 0.7  # several examples share a row
    assert got["bfd"] == pytest.approx(got["none"], rel=1e-4), got


@pytest.mark.tf
@pytest.mark.parametrize("family", TF_PACKED)
def test_bfd_scores_what_none_scores_on_tensorflow_and_pytorch_agrees(workdir, family):
    pytest.importorskip("tensorflow")
    model = _family_model(workdir, family)
    tf = _scores("tf", model, workdir["qa"], workdir["tok"])
    assert tf["bfd"] == pytest.approx(tf["none"], rel=1e-4), tf
    pt = _scores("pt", model, workdir["qa"], workdir["tok"])
    assert tf["bfd"] == pytest.approx(pt["bfd"], rel=1e-3), (tf, pt)


@pytest.mark.tf
def test_pytorch_and_tensorflow_agree_on_each_format_and_packing(workdir, small_model_dir):
    pytest.importorskip("tensorflow")
    root = workdir["root"]
    (root / "t.jinja").write_text(TEMPLATE)
    data = {"text": write_jsonl(root / "text.jsonl", eli5_rows(30)),
            "prompt_completion": write_jsonl(root / "pc.jsonl", qa_rows(40)),
            "messages": write_jsonl(root / "chat.jsonl", chat_rows(30))}
    for kind, path in data.items():
        for packing in ("wrapped", "bfd", "none"):
            config = recipe_config(model_name_or_path=small_model_dir, train_file=path, block_size=64,
                                   packing=packing, chat_template=str(root / "t.jinja") if kind == "messages" else None)
            tok = load_tokenizer(config)
            test = prepare_dataset(config, tok)["test"]
            pt = clm.get_backend("pt").evaluate_model(config.replace(backend="pt"), tok, test)["eval_loss"]
            tf = clm.get_backend("tf").evaluate_model(config.replace(backend="tf"), tok, test)["eval_loss"]
            assert tf == pytest.approx(pt, rel=1e-3), (kind, packing, pt, tf)


@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_a_conversation_run_trains_replies_and_answers_through_its_template(tmp_path, small_model_dir, backend):
    pytest.importorskip("torch" if backend == "pt" else "tensorflow")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    out = tmp_path / "out"
    # tf streams (its streamed batches carry the position ids too); pt prepares
    extra = {"streaming": True, "eval_samples": 8} if backend == "tf" else {}
    metrics = clm.train(recipe_config(
        backend=backend, model_name_or_path=small_model_dir, train_file=data, chat_template=tmp_path / "t.jinja",
        block_size=128, output_dir=out, max_steps=6, learning_rate=3e-3, sample_max_new_tokens=2, **extra))
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert (metrics["data_format"], metrics["packing"], metrics["loss_tokens"]) == ("messages", "bfd",
                                                                                    "assistant tokens")
    results = json.loads((out / "all_results.json").read_text())
    assert results["data_format"] == "messages"
    card = (out / "README.md").read_text()
    assert "<user>: Question" in card and "the loss is on assistant tokens" in card  # samples: eval prompts
    saved = TrainConfig(model_name_or_path=str(out))
    assert load_tokenizer(saved).chat_template == TEMPLATE  # saved with the model
    reply = clm.generate(str(out), "Why is the sky blue?", backend=backend, max_new_tokens=3, seed=0)[0]
    assert reply.startswith("Why is the sky blue?\n")  # the prompt went in as a user message
    plain = clm.generate(str(out), "Why is the sky blue?", backend=backend, max_new_tokens=3, seed=0, chat=False)[0]
    assert not plain.startswith("Why is the sky blue?\n")


def test_a_family_that_cannot_pack_gets_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    from clm.backends.pt.packed import check_packed_family
    from clm.cli import main
    from clm.errors import ConfigError

    check_packed_family("phi3")  # not checked by name, but its mask is built by masking_utils
    with pytest.raises(ConfigError, match="'oldfamily'.*use --packing wrapped"):
        check_packed_family("oldfamily")
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 64}))  # no attention
    code = main(["--backend", "pt", "--model_name_or_path", str(model), "--packing", "bfd",
                 "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'mamba' models" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.tf
def test_a_tf_family_that_cannot_pack_gets_one_line():
    pytest.importorskip("tensorflow")
    from clm.backends.tf.packed import check_packed_family
    from clm.errors import ConfigError

    with pytest.raises(ConfigError, match="not 'ctrl'; use --packing wrapped or --backend pt"):
        check_packed_family("ctrl")
