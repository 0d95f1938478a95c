"""Model families beyond GPT-2: PyTorch trains any AutoModelForCausalLM (GPT-2, OPT, Mistral, Llama, Qwen2 here);
TensorFlow trains the families transformers 4.57 has TF classes for (GPT-2, OPT, Mistral here; GPT-J and XGLM
weights checked both ways), in parity with PyTorch, and writes weights transformers 5 loads; a family with no TF
class gets one line. Run with -s to see the parity figures."""

from __future__ import annotations

import json

import pytest

from conftest import eli5_rows, recipe_config, run_in_pt5, write_jsonl
from tiny_families import PT_FAMILIES, TF_FAMILIES, model_config, save_tiny, save_word_tokenizer

RECIPE = dict(num_train_epochs=1, logging_steps=4)  # recipe_config's, for one epoch


def _config(backend, model, tok, data, out):
    return recipe_config(**RECIPE, backend=backend, model_name_or_path=model, tokenizer_name=tok, train_file=data,
                         output_dir=out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return tmp, write_jsonl(tmp / "d.jsonl", eli5_rows(16)), save_word_tokenizer(tmp / "tok")


# --------------------------------------------------------------------------------------------- framework-free
@pytest.mark.parametrize("family", ["gpt2", "opt", "mistral", "llama", "qwen2", "gptj", "xglm"])
def test_block_size_is_capped_by_each_familys_positions(tmp_path, family):
    from clm.config import TrainConfig
    from clm.runner import fit_block_size

    model_config(family, **({"n_positions": 96} if family in ("gpt2", "gptj") else
                            {"max_position_embeddings": 96})).save_pretrained(tmp_path)
    assert fit_block_size(TrainConfig(model_name_or_path=str(tmp_path), block_size=512)).block_size == 96


# --------------------------------------------------------------------------------------------- PyTorch
@pytest.mark.compat
@pytest.mark.parametrize("family", PT_FAMILIES)
def test_pytorch_trains_each_family(workdir, family):
    """One epoch; the output loads with from_pretrained, keeps the tokenizer's own pad token (not EOS), and
    counts every parameter as trainable."""
    pytest.importorskip("torch")
    import clm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, data, tok = workdir
    model = save_tiny(family, tmp / f"pt-{family}")
    out = tmp / f"pt-{family}-out"
    metrics = clm.train(_config("pt", model, tok, data, out))
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.config.model_type == family
    assert metrics["trainable_parameters"] == metrics["total_parameters"] == sum(
        p.numel() for p in trained.parameters())
    assert AutoTokenizer.from_pretrained(tok).pad_token == "<pad>"
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0  # <pad>, not </s> (2)


def test_pytorch_refuses_a_model_with_no_causal_lm_head(tmp_path):
    from transformers import T5Config

    from clm.backends.pt.backend import TorchBackend
    from clm.config import TrainConfig
    from clm.errors import ConfigError

    pytest.importorskip("torch")
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'t5' model, which AutoModelForCausalLM cannot build"):
        TorchBackend().check_config(TrainConfig(model_name_or_path=str(tmp_path)))


# --------------------------------------------------------------------------------------------- TensorFlow
@pytest.mark.tf
def test_a_family_with_no_tf_class_gets_one_line(capsys, tmp_path):
    """Exit 2, one line listing the families the tf backend supports, nothing written."""
    pytest.importorskip("tensorflow")
    from clm.cli import main

    model_config("llama").save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    code = main(["--backend", "tf", "--model_name_or_path", str(tmp_path / "llama"), "--output_dir", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clm: error:")]
    assert code == 2 and len(lines) == 1, lines
    assert "'llama' model, which has no TensorFlow causal-LM class" in lines[0]
    assert all(f in lines[0] for f in ("gpt2", "gptj", "mistral", "opt", "xglm")) and "--backend pt" in lines[0]
    assert not out.exists()


@pytest.mark.tf
@pytest.mark.parametrize("family", ["gptj", "xglm"])
def test_tf_weights_round_trip_for_gptj_and_xglm(tmp_path, family):
    """PyTorch-saved weights load into the TF class (XGLM's lm_head tied to its embedding, as in PyTorch) and
    are written back with the same names, shapes and values."""
    pytest.importorskip("tensorflow")
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from clm.backends.tf.weights import load_pretrained, save_pretrained

    src = save_tiny(family, tmp_path / "pt")
    ids = np.arange(3, 43)[None]
    with torch.no_grad():
        pt = AutoModelForCausalLM.from_pretrained(src).eval()(input_ids=torch.tensor(ids), labels=torch.tensor(ids))
    model = load_pretrained(str(src))
    assert float(np.mean(model(input_ids=ids, labels=ids, training=False).loss)) == pytest.approx(
        pt.loss.item(), rel=1e-5)
    save_pretrained(model, None, tmp_path / "tf")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "tf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


@pytest.fixture(scope="module")
def tf_runs(workdir):
    """One epoch of one recipe from one PyTorch-saved checkpoint on each backend, per family."""
    pytest.importorskip("tensorflow")
    import clm

    tmp, data, tok = workdir
    runs = {}
    for family in TF_FAMILIES:
        model = save_tiny(family, tmp / f"tf-{family}")
        runs[family] = {b: clm.train(_config(b, model, tok, data, tmp / f"{family}-{b}")) for b in ("pt", "tf")}
    return runs


@pytest.mark.tf
@pytest.mark.parametrize("family", TF_FAMILIES)
def test_tf_and_pytorch_agree_on_each_family(tf_runs, family):
    """The checkpoint scores the same on both (the loss before training, 1e-3), one epoch ends within 3% (dropout
    and shuffles differ), and both count the same parameters."""
    pt, tf = tf_runs[family]["pt"], tf_runs[family]["tf"]
    print(f"\n{family}: before pt {pt['eval_loss_before']:.6f} tf {tf['eval_loss_before']:.6f}; after one epoch "
          f"pt {pt['eval_loss']:.4f} tf {tf['eval_loss']:.4f} "
          f"({abs(tf['eval_loss'] - pt['eval_loss']) / pt['eval_loss']:.2%}); parameters {tf['total_parameters']}")
    assert tf["eval_loss_before"] == pytest.approx(pt["eval_loss_before"], rel=1e-3)
    assert pt["train_steps"] == tf["train_steps"]
    assert tf["eval_loss"] < tf["eval_loss_before"] - 0.1
    assert tf["eval_loss"] == pytest.approx(pt["eval_loss"], rel=0.03)
    assert tf["total_parameters"] == pt["total_parameters"] == tf["trainable_parameters"]


# clm.evaluate with the PyTorch backend on each (config, directory) pair given as JSON
EVALUATE_IN_PT5 = """
import json, sys, transformers, clm
configs = json.loads(sys.argv[1])
losses = {name: clm.evaluate(clm.TrainConfig(**c))["eval_loss"] for name, c in configs.items()}
print(json.dumps({"version": transformers.__version__, "losses": losses}))
"""


@pytest.mark.tf
def test_tf_trained_models_score_the_same_in_pytorch_on_transformers_5(tf_runs, workdir):
    tmp, data, tok = workdir
    configs = {f: {**_config("pt", tmp / f"{f}-tf", tok, data, tmp / f"pt5-{f}").to_dict()} for f in TF_FAMILIES}
    got = run_in_pt5(EVALUATE_IN_PT5, json.dumps(configs))["losses"]
    for family in TF_FAMILIES:
        tf = tf_runs[family]["tf"]["eval_loss"]
        print(f"\n{family}: TF-trained, eval loss in TF {tf:.6f}, in PyTorch (transformers 5) {got[family]:.6f}")
        assert got[family] == pytest.approx(tf, rel=1e-3)
