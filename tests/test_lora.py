"""LoRA on both backends, in PEFT's format: the adapter each writes is one PeftModel loads, base + adapter scores
what the merged output_dir scores, both count the same parameters, one recipe ends as close on both as full
fine-tuning does, and resume restores the adapter. Also --gradient_checkpointing. Run with -s for the figures."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import eli5_rows, recipe_config, run_in_pt5, write_jsonl
from tiny_families import VOCAB, save_tiny, save_word_tokenizer

# A rate at which LoRA moves a tiny random model within 8 steps; scale alpha / r = 4
RECIPE = dict(learning_rate=1e-2, max_steps=8, save_steps=4, lora_r=4, lora_alpha=16.0)  # over recipe_config's
IDS = np.arange(3, 43)[None] % (VOCAB - 3) + 3


def _config(backend, model, tok, data, out, **kw):
    return recipe_config(**{**RECIPE, **kw}, backend=backend, model_name_or_path=model, tokenizer_name=tok,
                         train_file=data, output_dir=out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    return tmp, write_jsonl(tmp / "d.jsonl", eli5_rows(16)), save_word_tokenizer(tmp / "tok")


def _resume_from_step_4(run_dir, out):
    """A second output_dir holding only checkpoint-4 and the run record, as after a crash at step 5."""
    shutil.copytree(run_dir / "checkpoint-4", out / "checkpoint-4")
    shutil.copy(run_dir / "clm_run.json", out)
    return out


# --------------------------------------------------------------------------------------------- framework-free
@pytest.mark.compat
def test_default_targets_are_pefts():
    """The TF backend's copy of PEFT's defaults (read without importing peft) is PEFT's, for every family with a
    TF class that PEFT knows."""
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    from clm.families import tf_families
    from clm.lora import PEFT_DEFAULT_TARGETS

    assert PEFT_DEFAULT_TARGETS == {k: peft_defaults[k] for k in PEFT_DEFAULT_TARGETS}
    assert {k for k in tf_families() if k in peft_defaults} <= set(PEFT_DEFAULT_TARGETS)


def test_lora_settings_are_checked():
    from clm.config import LORA_LEARNING_RATE, TrainConfig
    from clm.errors import ConfigError

    with pytest.raises(ConfigError, match="--lora_r must be >= 0"):
        TrainConfig(lora_r=-1)
    with pytest.raises(ConfigError, match="--lora_target_modules given without --lora_r"):
        TrainConfig(lora_target_modules=["q_proj"])
    assert TrainConfig(model_name_or_path="m", lora_r=8).effective_learning_rate == LORA_LEARNING_RATE


# --------------------------------------------------------------------------------------------- PyTorch
@pytest.fixture(scope="module")
def pt_lora(workdir):
    """GPT-2 (Conv1D layers: PEFT's fan_in_fan_out) with LoRA on c_attn, 8 steps, checkpoints at 4 and 8."""
    pytest.importorskip("peft")
    import clm

    tmp, data, tok = workdir
    model = save_tiny("gpt2", tmp / "gpt2")
    return model, clm.train(_config("pt", model, tok, data, tmp / "pt"))


@pytest.mark.compat
def test_pytorch_writes_an_adapter_peft_loads(pt_lora, workdir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, metrics = pt_lora
    out = workdir[0] / "pt"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
        "LORA", 4, 16.0, ["c_attn"])
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    assert metrics["trainable_parameters"] == 2 * 4 * (32 + 96)  # 2 layers x r x (in + out) of c_attn
    assert metrics["total_parameters"] == base_params + metrics["trainable_parameters"]
    ids = torch.tensor(IDS)
    with torch.no_grad():
        losses = [m.eval()(input_ids=ids, labels=ids).loss.item() for m in (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / "adapter"),
            AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(model))]
    print(f"\npt LoRA: base + adapter {losses[0]:.6f}, merged {losses[1]:.6f}, base {losses[2]:.6f}; "
          f"trainable {metrics['trainable_parameters']} of {metrics['total_parameters']}")
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and abs(losses[0] - losses[2]) > 1e-3
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.03


@pytest.mark.compat
def test_pytorch_lora_resumes_exactly(pt_lora, workdir):
    import clm

    model, ref = pt_lora
    tmp, data, tok = workdir
    got = clm.train(_config("pt", model, tok, data, _resume_from_step_4(tmp / "pt", tmp / "pt-resumed")))
    assert got["resumed_from"].endswith("checkpoint-4")
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)


@pytest.mark.compat
def test_pytorch_gradient_checkpointing_trains_the_same(pt_lora, workdir):
    """The same run with activations recomputed (non-reentrant, so LoRA's frozen inputs are fine)."""
    import clm

    model, ref = pt_lora
    tmp, data, tok = workdir
    got = clm.train(_config("pt", model, tok, data, tmp / "pt-gc", gradient_checkpointing=True))
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)


def test_lora_with_fsdp_or_deepspeed_is_one_line():
    pytest.importorskip("torch")
    from clm.backends.pt.backend import TorchBackend
    from clm.config import TrainConfig
    from clm.errors import ConfigError

    with pytest.raises(ConfigError, match="--lora_r with --fsdp or --deepspeed is not supported"):
        TorchBackend().check_config(TrainConfig(lora_r=8, fsdp="full_shard auto_wrap"))


# --------------------------------------------------------------------------------------------- TensorFlow
@pytest.mark.tf
def test_tf_gradient_checkpointing_and_torch_compile_are_one_line():
    pytest.importorskip("tensorflow")
    from clm.backends.tf.backend import TFBackend
    from clm.config import TrainConfig
    from clm.errors import ConfigError

    with pytest.raises(ConfigError, match="--gradient_checkpointing is not supported by the tf backend"):
        TFBackend().check_config(TrainConfig(gradient_checkpointing=True))
    with pytest.raises(ConfigError, match="--torch_compile is a PyTorch option"):
        TFBackend().check_config(TrainConfig(torch_compile=True))


@pytest.mark.tf
def test_tf_lora_layers_init_targets_and_freezing(pt_lora):
    """PEFT's initialisation (A uniform within 1/sqrt(in), B zero: the model's output is unchanged), all-linear
    (every linear layer but the output), only A and B trainable, and one line for a target that matches nothing."""
    pytest.importorskip("tensorflow")
    from clm.backends.tf.lora import apply_lora
    from clm.backends.tf.weights import load_pretrained
    from clm.errors import ConfigError

    model_dir = pt_lora[0]
    model = load_pretrained(str(model_dir))
    before = float(np.mean(model(input_ids=IDS, labels=IDS, training=False).loss))
    wrappers = apply_lora(model, 4, 16.0, 0.0, ["all-linear"])
    assert sorted({w.module_path.rsplit(".", 1)[-1] for w in wrappers}) == ["c_attn", "c_fc", "c_proj"]
    assert len(wrappers) == 8 and not any("lm_head" in w.module_path for w in wrappers)
    a = wrappers[0].lora_A.numpy()
    assert np.abs(a).max() <= 1 / np.sqrt(32) and a.std() == pytest.approx(1 / np.sqrt(32) / np.sqrt(3), rel=0.2)
    assert not wrappers[0].lora_B.numpy().any()
    assert float(np.mean(model(input_ids=IDS, labels=IDS, training=False).loss)) == pytest.approx(before, rel=1e-6)
    assert {v.ref() for v in model.trainable_variables} == {v.ref() for w in wrappers for v in (w.lora_A, w.lora_B)}
    with pytest.raises(ConfigError, match="matches no linear layer.*c_attn"):
        apply_lora(load_pretrained(str(model_dir)), 4, 16.0, 0.0, ["q_proj"])


@pytest.fixture(scope="module")
def tf_lora(pt_lora, workdir):
    """The PyTorch run's recipe on the TF backend, from the same checkpoint."""
    pytest.importorskip("tensorflow")
    import clm

    tmp, data, tok = workdir
    return clm.train(_config("tf", pt_lora[0], tok, data, tmp / "tf"))


@pytest.mark.tf
def test_tf_lora_ends_as_close_to_pytorch_as_full_fine_tuning(pt_lora, tf_lora):
    pt, tf = pt_lora[1], tf_lora
    print(f"\nLoRA r=4 on c_attn, 8 steps: eval loss before pt {pt['eval_loss_before']:.6f} tf "
          f"{tf['eval_loss_before']:.6f}; after pt {pt['eval_loss']:.4f} tf {tf['eval_loss']:.4f} "
          f"({abs(tf['eval_loss'] - pt['eval_loss']) / pt['eval_loss']:.2%}); trainable {tf['trainable_parameters']} "
          f"of {tf['total_parameters']} (pt {pt['trainable_parameters']} of {pt['total_parameters']})")
    assert (tf["trainable_parameters"], tf["total_parameters"]) == (pt["trainable_parameters"],
                                                                    pt["total_parameters"])
    assert tf["eval_loss_before"] == pytest.approx(pt["eval_loss_before"], rel=1e-3)
    assert tf["eval_loss"] < tf["eval_loss_before"] - 0.03
    assert tf["eval_loss"] == pytest.approx(pt["eval_loss"], rel=0.03)  # full fine-tuning's bound (test_parity)


@pytest.mark.tf
def test_tf_lora_resumes_exactly(pt_lora, tf_lora, workdir):
    """The tf.train.Checkpoint holds A and B (and the LoRA dropout's generator): resuming at step 4 ends where
    the uninterrupted run ends."""
    import clm

    tmp, data, tok = workdir
    got = clm.train(_config("tf", pt_lora[0], tok, data, _resume_from_step_4(tmp / "tf", tmp / "tf-resumed")))
    assert got["resumed_from"].endswith("checkpoint-4")
    assert got["eval_loss"] == pytest.approx(tf_lora["eval_loss"], rel=1e-6)


# base directory, adapter directory, merged directory -> losses on IDS of base + adapter (PEFT) and merged
PEFT_IN_PT5 = """
import json, sys, torch, transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM
cases, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
def loss(m):
    with torch.no_grad():
        return m.eval()(input_ids=ids, labels=ids).loss.item()
out = {name: [loss(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)),
              loss(AutoModelForCausalLM.from_pretrained(merged))] for name, (base, adapter, merged) in cases.items()}
print(json.dumps({"version": transformers.__version__, "losses": out}))
"""


@pytest.mark.tf
def test_tf_adapters_load_in_peft_on_transformers_5(pt_lora, tf_lora, workdir, tmp_path):
    """The TF-trained GPT-2 adapter (Conv1D) and a Mistral one (Dense, with a trained-looking B): PEFT on
    transformers 5 loads each onto its base, and base + adapter, the merged directory and TF score the same."""
    from clm.backends.tf.lora import apply_lora, save_adapter
    from clm.backends.tf.weights import load_pretrained, save_pretrained
    from clm.config import TrainConfig

    tmp = workdir[0]
    mistral = save_tiny("mistral", tmp_path / "mistral")
    model = load_pretrained(str(mistral))
    for w in apply_lora(model, 4, 16.0, 0.0, ["q_proj", "v_proj"]):
        w.lora_B.assign(np.random.default_rng(0).normal(0, 0.3, w.lora_B.shape).astype("float32"))
    save_pretrained(model, None, tmp_path / "mistral-out")
    save_adapter(model, tmp_path / "mistral-out" / "adapter", TrainConfig(model_name_or_path=str(mistral), lora_r=4))
    expected = {"gpt2": float(np.mean(load_pretrained(str(tmp / "tf"))(input_ids=IDS, labels=IDS).loss)),
                "mistral": float(np.mean(model(input_ids=IDS, labels=IDS, training=False).loss))}
    cases = {"gpt2": [str(pt_lora[0]), str(tmp / "tf" / "adapter"), str(tmp / "tf")],
             "mistral": [str(mistral), str(tmp_path / "mistral-out" / "adapter"), str(tmp_path / "mistral-out")]}
    got = run_in_pt5(PEFT_IN_PT5, json.dumps(cases), json.dumps(IDS.tolist()))["losses"]
    for name, (with_adapter, merged) in got.items():
        print(f"\n{name}: TF {expected[name]:.6f}, PEFT base + TF adapter {with_adapter:.6f}, merged {merged:.6f}")
        assert with_adapter == pytest.approx(expected[name], rel=1e-5)
        assert merged == pytest.approx(expected[name], rel=1e-5)
