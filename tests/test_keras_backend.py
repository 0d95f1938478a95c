"""The keras backend (Keras 3 + KerasHub, .venv-keras, no torch): a Hugging Face checkpoint scores on keras, with
TensorFlow and with JAX, what it scores on PyTorch; a run trains, and writes a Hugging Face folder that
transformers 5 loads and scores the same; what it cannot do yet is one line. The PyTorch side runs in the
transformers-5 environment (``run_in_pt5``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.keras
pytest.importorskip("keras_hub")

import clm  # noqa: E402
from conftest import ROOT, eli5_rows, recipe_config, run_clm, run_in_pt5, write_jsonl  # noqa: E402

# In the transformers-5 environment: tiny GPT-2 (small BPE vocabulary), Llama (one with an rms_norm_eps
# KerasHub's converter leaves out), Qwen2 and Gemma checkpoints, their eval loss on PyTorch, and PEFT's LoRA
# parameter counts.
BUILD = """
import json, sys
sys.path.insert(0, "tests")
import transformers, clm
from conftest import recipe_config, save_tiny_gpt2
from tiny_families import save_tiny, save_word_tokenizer
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
root, data = sys.argv[1], sys.argv[2]
models = {"gpt2": str(save_tiny_gpt2(Path(root) / "gpt2", small_vocab=True)),
          "llama": str(save_tiny("llama", Path(root) / "llama", initializer_range=0.2)),
          "llama-eps": str(save_tiny("llama", Path(root) / "llama-eps", initializer_range=0.2, rms_norm_eps=0.1))}
losses = {f"{name}-{packing}": clm.evaluate(recipe_config(
              backend="pt", model_name_or_path=path, train_file=data, packing=packing,
              output_dir=f"{root}/eval-{name}-{packing}"))["eval_loss"]
          for name, path in models.items() for packing in ("wrapped", "bfd") if packing == "wrapped" or "-" not in name}
# Qwen2, Gemma and Mistral with the word tokenizer (named apart: transformers 5 would load a Qwen2 or Gemma
# folder's as its own class)
words = str(save_word_tokenizer(Path(root) / "words"))
for name in ("qwen2", "gemma", "mistral"):
    models[name] = str(save_tiny(name, Path(root) / name, initializer_range=0.2))
    for packing in ("wrapped", "bfd") if name == "qwen2" else ("wrapped",):
        losses[f"{name}-{packing}"] = clm.evaluate(recipe_config(
            backend="pt", model_name_or_path=models[name], tokenizer_name=words, train_file=data, packing=packing,
            output_dir=f"{root}/eval-{name}-{packing}"))["eval_loss"]
models["words"] = words
# PEFT's trainable parameters for LoRA r=4 on its default targets and on all-linear
peft = {f"{name}-{targets}": get_peft_model(AutoModelForCausalLM.from_pretrained(models[name]), LoraConfig(
            r=4, target_modules=None if targets == "default" else targets, task_type="CAUSAL_LM"))
        .get_nb_trainable_parameters()[0] for name in ("gpt2", "llama") for targets in ("default", "all-linear")}
epoch = clm.train(recipe_config(backend="pt", model_name_or_path=models["gpt2"], train_file=data, num_train_epochs=1,
                                logging_steps=4, output_dir=f"{root}/pt-epoch"))
print(json.dumps({"version": transformers.__version__, "models": models, "losses": losses, "epoch": epoch,
                  "peft": peft}))
"""
SCORE = """
import json, sys
import transformers, clm
sys.path.insert(0, "tests")
from conftest import recipe_config
path, data, out = sys.argv[1:4]
loss = clm.evaluate(recipe_config(backend="pt", model_name_or_path=path, train_file=data, output_dir=out))
print(json.dumps({"version": transformers.__version__, "eval_loss": loss["eval_loss"]}))
"""


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("keras")
    data = write_jsonl(root / "d.jsonl", eli5_rows(40))
    got = run_in_pt5(BUILD, str(root), str(data))
    return {"root": root, "data": data, **got}


JAX_EVAL = """
import json, sys
sys.path.insert(0, "tests")
import clm
from conftest import recipe_config
models, data, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
print(json.dumps({f"{name}-{packing}": clm.evaluate(recipe_config(
    backend="keras", keras_backend="jax", model_name_or_path=path, train_file=data, packing=packing,
    output_dir=f"{out}-{name}-{packing}"))["eval_loss"] for name, path in models.items()
    for packing in ("wrapped", "bfd")}))
"""


@pytest.fixture(scope="module")
def on_jax(hf) -> dict[str, float]:
    """clm.evaluate on keras with JAX for both checkpoints, in one process of its own (Keras runs on one framework
    per process)."""
    models = {name: hf["models"][name] for name in ("gpt2", "llama")}
    proc = subprocess.run([sys.executable, "-c", JAX_EVAL, json.dumps(models), str(hf["data"]),
                           str(hf["root"] / "kj")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_checkpoint_scores_the_same_on_pytorch_and_on_keras_with_tensorflow_and_jax(hf, on_jax, family):
    """Blocks (wrapped) and packed documents (bfd: no attention across documents, so bfd scores what none
    scores): keras on TensorFlow in this process, on JAX in a process of its own, PyTorch in .venv."""
    path, pt = hf["models"][family], {p: hf["losses"][f"{family}-{p}"] for p in ("wrapped", "bfd")}
    on_tf = {packing: clm.evaluate(recipe_config(backend="keras", model_name_or_path=path, train_file=hf["data"],
                                                 packing=packing, output_dir=hf["root"] / f"k-{family}-{packing}"))
             ["eval_loss"] for packing in ("wrapped", "bfd", "none")}
    jax = {packing: on_jax[f"{family}-{packing}"] for packing in ("wrapped", "bfd")}
    for packing in ("wrapped", "bfd"):
        assert on_tf[packing] == pytest.approx(pt[packing], rel=1e-3), (packing, pt, on_tf)
        assert jax[packing] == pytest.approx(pt[packing], rel=1e-3), (packing, pt, jax)
    assert on_tf["bfd"] == pytest.approx(on_tf["none"], rel=1e-4) and on_tf["bfd"] != pytest.approx(on_tf["wrapped"])


def test_qwen2_gemma_and_mistral_checkpoints_score_what_pytorch_scores(hf):
    """Keras on TensorFlow; Qwen2 also as packed documents (Gemma's packed rows are refused in one line)."""
    for name, packings in (("qwen2", ("wrapped", "bfd")), ("gemma", ("wrapped",)), ("mistral", ("wrapped",))):
        for packing in packings:
            got = clm.evaluate(recipe_config(backend="keras", model_name_or_path=hf["models"][name],
                                             tokenizer_name=hf["models"]["words"], train_file=hf["data"],
                                             packing=packing, output_dir=hf["root"] / f"k-{name}-{packing}"))
            assert got["eval_loss"] == pytest.approx(hf["losses"][f"{name}-{packing}"], rel=1e-4), (name, packing)


def test_one_epoch_of_the_same_recipe_ends_close_to_pytorch(hf):
    """As tests/test_parity.py holds pt and tf: the same schedule, batches and steps, other dropout draws and
    shuffles: the same start to 1e-4 and the end within 3%."""
    pt = hf["epoch"]
    keras = clm.train(recipe_config(backend="keras", model_name_or_path=hf["models"]["gpt2"], train_file=hf["data"],
                                    num_train_epochs=1, logging_steps=4, output_dir=hf["root"] / "k-epoch"))
    assert keras["train_steps"] == pt["train_steps"] and keras["global_batch_size"] == pt["global_batch_size"]
    assert keras["eval_loss_before"] == pytest.approx(pt["eval_loss_before"], rel=1e-4)
    assert keras["eval_loss"] < keras["eval_loss_before"] - 0.1
    assert keras["eval_loss"] == pytest.approx(pt["eval_loss"], rel=0.03), (pt["eval_loss"], keras["eval_loss"])


def test_a_run_trains_and_writes_a_folder_transformers_scores_the_same(hf):
    out = hf["root"] / "trained"
    metrics = clm.train(recipe_config(backend="keras", model_name_or_path=hf["models"]["gpt2"],
                                      train_file=hf["data"], output_dir=out, max_steps=8, learning_rate=3e-3,
                                      sample_max_new_tokens=2))
    assert metrics["eval_loss"] < metrics["eval_loss_before"] and metrics["train_steps"] == 8
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    scored = run_in_pt5(SCORE, str(out), str(hf["data"]), str(hf["root"] / "pt-score"))["eval_loss"]
    assert scored == pytest.approx(metrics["eval_loss"], rel=1e-3)
    assert clm.generate(str(out), "light energy", backend="keras", max_new_tokens=3, seed=0)[0].startswith("light")


def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_ends(hf):
    """Dropout on (GPT-2's 0.1): the random generators' state is in the checkpoint too."""
    common = dict(backend="keras", model_name_or_path=hf["models"]["gpt2"], train_file=hf["data"], max_steps=8,
                  save_steps=4, learning_rate=3e-3, sample_max_new_tokens=0)
    whole = clm.train(recipe_config(output_dir=hf["root"] / "whole", **common))
    assert (hf["root"] / "whole" / "checkpoint-4" / "keras_state.npz").is_file()
    resumed = clm.train(recipe_config(output_dir=hf["root"] / "resumed", **common,
                                      resume_from_checkpoint=str(hf["root"] / "whole" / "checkpoint-4")))
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-3)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)
    assert resumed["eval_loss"] != pytest.approx(resumed["eval_loss_before"], rel=1e-3)  # it did train
    assert json.loads((hf["root"] / "whole" / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8


def test_early_stopping_and_the_best_checkpoint_as_the_trainer_judges_them(hf):
    """No evaluation beats the first by the threshold: patience 2 stops after the third evaluation (step 6 of
    12); the best checkpoint is kept beyond --save_total_limit 1 and its weights are the final model."""
    out = hf["root"] / "early"
    metrics = clm.train(recipe_config(
        backend="keras", model_name_or_path=hf["models"]["gpt2"], train_file=hf["data"], output_dir=out,
        max_steps=12, save_steps=2, eval_steps=2, early_stopping_patience=2, early_stopping_threshold=100.0,
        load_best_model_at_end=True, save_total_limit=1, learning_rate=3e-3, sample_max_new_tokens=0))
    evals = {row["step"]: row["eval_loss"] for row in json.loads((out / "checkpoint-6" / "trainer_state.json")
                                                                  .read_text())["log_history"] if "eval_loss" in row}
    assert metrics["train_steps"] == 6 and sorted(evals) == [2, 4, 6]
    best = min(evals, key=evals.get)
    assert metrics["eval_loss"] == pytest.approx(evals[best], rel=1e-5)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{best}", "checkpoint-6"})


def test_a_streamed_run_of_packed_documents_trains(hf):
    """--streaming with --packing bfd: rows with position ids from the stream, through the packed model, saved
    through the KerasHub model it shares its weights with."""
    out = hf["root"] / "stream"
    metrics = clm.train(recipe_config(backend="keras", model_name_or_path=hf["models"]["gpt2"],
                                      train_file=hf["data"], output_dir=out, streaming=True, eval_samples=8,
                                      packing="bfd", max_steps=6, learning_rate=3e-3, sample_max_new_tokens=0))
    assert metrics["train_steps"] == 6 and metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["packing"] == "bfd" and (out / "checkpoint-6" / "model.safetensors").is_file()


# `python -m clm` with TensorFlow's CPU split into N logical devices (what two GPUs would be to MirroredStrategy)
TF_DEVICES = """
import sys
import tensorflow as tf
n = int(sys.argv[1])
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * n)
from clm.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def test_two_devices_train_what_one_device_trains(hf):
    """Two CPU devices with one device's global batch train what one device trains (no dropout in the Llama config,
    so no random draw differs): on JAX through Keras DataParallel; on TensorFlow through --tf_strategy mirrored,
    the loss divided by every replica's tokens and the gradients clipped after they are summed. The one-device
    run is keras on TensorFlow in this process (JAX's one-device run agrees with it to 1e-6)."""
    from clm.cli import main

    def args(framework: str, devices: int) -> list[str]:
        return ["--backend", "keras", "--keras_backend", framework, "--model_name_or_path", hf["models"]["llama"],
                "--train_file", str(hf["data"]), "--output_dir", str(hf["root"] / f"dp{devices}-{framework}"),
                "--block_size", "32", "--max_steps", "6", "--learning_rate", "3e-3",
                "--per_device_train_batch_size", str(4 // devices), "--per_device_eval_batch_size", "3",
                "--report_to", "none", "--sample_max_new_tokens", "0"]

    assert main(args("tensorflow", 1)) == 0
    procs = {"jax": run_clm(*args("jax", 2), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
             "tensorflow": subprocess.run([sys.executable, "-c", TF_DEVICES, "2", *args("tensorflow", 2),
                                           "--tf_strategy", "mirrored"], capture_output=True, text=True, cwd=ROOT,
                                          timeout=600)}
    one = json.loads((hf["root"] / "dp1-tensorflow" / "all_results.json").read_text())
    assert one["eval_loss"] < one["eval_loss_before"] and one["global_batch_size"] == 4
    for framework, proc in procs.items():
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = json.loads((hf["root"] / f"dp2-{framework}" / "all_results.json").read_text())
        assert two["world_size"] == 2 and two["global_batch_size"] == 4, two
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4), (framework, one, two)
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4), (framework, one, two)


def test_push_to_hub_carries_the_hugging_face_folder_and_the_last_checkpoint(hf):
    import secrets

    from hub_standin import HubStandin

    with HubStandin(token="hf_" + secrets.token_hex(16)) as hub:
        out = hf["root"] / "pushed"
        proc = run_clm("--backend", "keras", "--model_name_or_path", hf["models"]["gpt2"], "--train_file",
                       str(hf["data"]), "--output_dir", str(out), "--block_size", "32", "--max_steps", "4",
                       "--save_steps", "2", "--report_to", "none", "--sample_max_new_tokens", "0", "--push_to_hub",
                       "--hub_model_id", f"{hub.user}/k", "--hub_strategy", "checkpoint",
                       env={"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1",
                            "HF_HUB_OFFLINE": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        arrived = hub.files(f"{hub.user}/k")
        for name in ("model.safetensors", "config.json", "tokenizer.json", "all_results.json", "README.md",
                     "last-checkpoint/keras_state.npz", "last-checkpoint/trainer_state.json"):
            assert name in arrived, sorted(arrived)
        assert arrived["model.safetensors"] == (out / "model.safetensors").read_bytes()
        assert hub.token not in proc.stdout + proc.stderr and not hub.unhandled


LORA_IN_PT5 = """
import json, shutil, sys, tempfile
sys.path.insert(0, "tests")
import clm, transformers
from conftest import recipe_config
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, out, data = sys.argv[1:4]
merged = tempfile.mkdtemp()
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), f"{out}/adapter").merge_and_unload() \
    .save_pretrained(merged)
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f"{out}/{name}", merged)
score = lambda path: clm.evaluate(recipe_config(backend="pt", model_name_or_path=path, train_file=data,
                                                output_dir=tempfile.mkdtemp()))["eval_loss"]
print(json.dumps({"version": transformers.__version__, "base_and_adapter": score(merged), "merged": score(out)}))
"""


def test_lora_trains_peft_adapters_with_pefts_parameter_count_and_resumes(hf):
    """LoRA on GPT-2's fused c_attn (PEFT's default; KerasHub keeps query, key and value apart) and on Llama's
    q_proj/v_proj and all-linear: PEFT's trainable-parameter counts; the adapter PEFT loads onto the base scores
    what the merged output_dir and the keras run score; a run resumed from checkpoint-3 ends where it ends."""
    from clm.backends.keras import lora
    from clm.backends.keras.model import load_pretrained

    common = dict(backend="keras", model_name_or_path=hf["models"]["gpt2"], train_file=hf["data"], max_steps=6,
                  save_steps=3, lora_r=4, learning_rate=3e-2, sample_max_new_tokens=0)
    out = hf["root"] / "lora"
    whole = clm.train(recipe_config(output_dir=out, **common))
    assert whole["trainable_parameters"] == hf["peft"]["gpt2-default"] and whole["eval_loss"] < whole[
        "eval_loss_before"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["target_modules"], adapter["r"], adapter["fan_in_fan_out"]) == (["c_attn"], 4, True)
    scored = run_in_pt5(LORA_IN_PT5, hf["models"]["gpt2"], str(out), str(hf["data"]))
    assert scored["base_and_adapter"] == pytest.approx(whole["eval_loss"], rel=1e-3), (scored, whole["eval_loss"])
    assert scored["merged"] == pytest.approx(whole["eval_loss"], rel=1e-3)
    resumed = clm.train(recipe_config(output_dir=hf["root"] / "lora-resumed", **common,
                                      resume_from_checkpoint=str(out / "checkpoint-3")))
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-3)
    import keras
    import keras_hub

    for targets in ("default", "all-linear"):
        model = load_pretrained(keras_hub, hf["models"]["llama"])
        lora.apply_lora(keras, model, 4, 16.0, 0.05, ["q_proj", "v_proj"] if targets == "default" else [targets])
        count = sum(int(math.prod(w.shape)) for w in model.trainable_weights)
        assert count == hf["peft"][f"llama-{targets}"], targets


def test_a_checkpoints_rms_norm_eps_is_kept(hf):
    """KerasHub's Llama converter leaves rms_norm_eps at its default: clm passes the checkpoint's in."""
    got = clm.evaluate(recipe_config(backend="keras", model_name_or_path=hf["models"]["llama-eps"],
                                     train_file=hf["data"], output_dir=hf["root"] / "k-eps"))["eval_loss"]
    assert got == pytest.approx(hf["losses"]["llama-eps-wrapped"], rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--gradient_accumulation_steps", "2"], "--gradient_accumulation_steps > 1 is not supported by the keras"),
    (["--keras_backend", "torch"], "--keras_backend"),
    (["--tf_strategy", "multi_worker"], "--tf_strategy multi_worker (or TF_CONFIG) is not supported by the keras"),
])
def test_what_the_keras_backend_cannot_do_yet_is_one_line(tmp_path, flags, message):
    proc = run_clm("--backend", "keras", "--output_dir", str(tmp_path / "out"), *flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_family_kerashub_cannot_write_back_is_one_line(tmp_path):
    model = tmp_path / "opt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "opt", "vocab_size": 64}))
    proc = run_clm("--backend", "keras", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "keras backend (KerasHub) reads and writes" in proc.stderr, proc.stderr[-2000:]
    assert "gpt2, llama, mistral, qwen2, gemma" in proc.stderr
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 64,
                                                    "layer_norm_epsilon": 1e-6}))
    proc = run_clm("--backend", "keras", "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "KerasHub's GPT-2 layers use 1e-05 only" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_import_clm_chooses_no_keras_backend():
    code = "import clm, sys; clm.TrainConfig(backend='keras'); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
