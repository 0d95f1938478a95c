"""The TensorFlow backend's pieces: the recipe, weights either framework reads, checkpoints and exact resume (end
to end: test_end_to_end)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytestmark = pytest.mark.tf

from clm.config import TrainConfig  # noqa: E402
from clm.errors import ConfigError  # noqa: E402

from conftest import METRIC_KEYS, eli5_rows, pt5_python, recipe_config, write_jsonl  # noqa: E402


def tiny_tf_model(seed: int = 0):
    from clm.backends.tf.runtime import keras
    from transformers import TFAutoModelForCausalLM

    from clm.defaults import tiny_gpt2_config

    keras.utils.set_random_seed(seed)
    model = TFAutoModelForCausalLM.from_config(tiny_gpt2_config(n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.build_in_name_scope()
    return model


IDS = (np.arange(40)[None] * 37 % 50000).astype(np.int64)


def tf_loss(model) -> float:
    return float(model(input_ids=IDS, labels=IDS, training=False).loss.numpy().mean())


# --------------------------------------------------------------------------------------------- recipe pieces
@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_matches_the_trainers(kind):
    pytest.importorskip("torch")
    import torch
    from transformers import get_scheduler

    from clm.backends.tf.optimizer import TrainerSchedule

    total, warmup = 50, 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total)
    ours = TrainerSchedule(1e-3, total, warmup, kind)
    for step in range(total):
        assert float(ours(step)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12), step
        opt.step()
        sched.step()


def test_data_order_is_seeded_per_epoch_and_resumable():
    from clm.backends.tf.batches import steps_per_epoch, train_indices

    n, batch, seed = 10, 4, 3
    per_epoch = steps_per_epoch(n, batch)
    assert per_epoch == 3  # ceil(10 / 4), as the Trainer's dataloader
    full = train_indices(n, batch, seed, 0, 7).reshape(7, batch)
    for epoch in range(2):  # each epoch: every block once, then padding rows (index n) to fill the last batch
        rows = full[epoch * per_epoch:(epoch + 1) * per_epoch].ravel()
        assert sorted(rows[:n]) == list(range(n)) and (rows[n:] == n).all()
    assert not np.array_equal(full[:3], full[3:6])  # reshuffled each epoch
    np.testing.assert_array_equal(train_indices(n, batch, seed, 4, 7).reshape(3, batch), full[4:7])
    assert not np.array_equal(train_indices(n, batch, seed + 1, 0, 3), full[:3].ravel())


def test_padding_rows_are_masked_out():
    from clm.backends.tf.batches import PAD_ROW_ID, collate_fixed

    batch = collate_fixed([{"input_ids": [5, 50256, 7]}, {"input_ids": [PAD_ROW_ID] * 3}])
    assert batch["labels"].tolist() == [[5, 50256, 7], [-100] * 3]  # EOS stays a target
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]] and batch["input_ids"].min() >= 0


def test_weight_decay_spares_biases_and_layernorms():
    from clm.backends.tf.optimizer import make_optimizer

    model = tiny_tf_model()
    opt = make_optimizer(TrainConfig(weight_decay=0.1, max_grad_norm=1.0), model, total_steps=10)
    decayed = {v.name for v in model.trainable_weights if opt._do_use_weight_decay(v.name)}
    assert any("wte" in n for n in decayed) and any("c_attn/weight" in n for n in decayed)
    assert not any("/ln_" in n or "bias" in n for n in decayed)
    assert opt.global_clipnorm == 1.0


def test_fit_plan_keeps_keras_epochs_on_checkpoint_intervals():
    from clm.backends.tf.trainer import fit_plan

    # (initial_epoch, epochs, steps_per_epoch, first step, end step) per fit call
    assert fit_plan(0, 10, 4) == [(0, 3, 4, 0, 10)]  # the last interval is cut at step 10
    assert fit_plan(8, 10, 4) == [(2, 3, 4, 8, 10)]
    assert fit_plan(6, 10, 4) == [(1, 2, 2, 6, 8), (2, 3, 4, 8, 10)]  # resumed mid-interval
    assert fit_plan(10, 10, 4) == []


def test_main_process_is_the_chief(monkeypatch):
    from clm.backends.tf.backend import TFBackend

    backend = TFBackend()
    assert backend.is_main_process and backend.world_size == 1
    cluster = {"worker": ["a:1", "b:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not backend.is_main_process
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert backend.is_main_process


def test_unsupported_settings_fail_before_training():
    from clm.backends.tf.backend import TFBackend

    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        TFBackend().check_config(TrainConfig(gradient_accumulation_steps=2))


# --------------------------------------------------------------------------------------------- weights
def test_saved_weights_round_trip_in_the_pytorch_layout(tmp_path):
    from safetensors import safe_open

    from clm.backends.tf.weights import load_pretrained, save_pretrained
    from clm.defaults import gpt2_tokenizer

    model = tiny_tf_model()
    save_pretrained(model, gpt2_tokenizer(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert "transformer.h.0.attn.c_attn.weight" in set(f.keys())
        assert f.get_tensor("transformer.h.0.attn.c_attn.bias").shape == (96,)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert tf_loss(load_pretrained(str(tmp_path))) == pytest.approx(tf_loss(model), rel=1e-6)


def test_tf_weights_load_in_pytorch_on_transformers_5(tmp_path):
    """AutoModelForCausalLM.from_pretrained on a TF-written directory, with PyTorch on transformers 5.x."""
    python = pt5_python()
    if not Path(python).exists():
        pytest.skip(f"no PyTorch/transformers-5 interpreter at {python} (set CLM_PT5_PYTHON)")
    from clm.backends.tf.weights import save_pretrained
    from clm.defaults import gpt2_tokenizer

    model = tiny_tf_model()
    model.generation_config.update(top_k=50, do_sample=True)
    save_pretrained(model, gpt2_tokenizer(), tmp_path)
    script = (
        "import json, sys, torch, transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad(): loss = m(input_ids=ids, labels=ids).loss.item()\n"
        "print(json.dumps({'version': transformers.__version__, 'loss': loss, 'top_k': m.generation_config.top_k}))\n")
    proc = subprocess.run([python, "-c", script, str(tmp_path), json.dumps(IDS.tolist())], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(got["version"].split(".")[0]) < 5:
        pytest.skip(f"{python} has transformers {got['version']}, not 5.x")
    assert got["loss"] == pytest.approx(tf_loss(model), rel=1e-5)
    assert got["top_k"] == 50


def test_loads_pytorch_safetensors_without_from_pt(tiny_model_dir):
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    from clm.backends.tf.weights import load_pretrained

    pt = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        pt_loss = pt(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.item()
    assert tf_loss(load_pretrained(str(tiny_model_dir))) == pytest.approx(pt_loss, rel=1e-5)


def test_generate_on_a_pytorch_written_directory_is_seeded(tiny_model_dir):
    import clm

    backend = clm.get_backend("tf")
    first = backend.generate(str(tiny_model_dir), ["Why is the sky", "Stars"], max_new_tokens=6, do_sample=True,
                             top_k=50, top_p=0.95, seed=3)
    again = backend.generate(str(tiny_model_dir), ["Why is the sky", "Stars"], max_new_tokens=6, do_sample=True,
                             top_k=50, top_p=0.95, seed=3)
    assert first == again and first[0].startswith("Why is the sky") and first[1].startswith("Stars")


# --------------------------------------------------------------------------------------------- checkpoints
def _config(data, out, **kw):
    return recipe_config(backend="tf", train_file=data, output_dir=out, seed=7, **kw)


def test_checkpoints_prune_and_resume_exactly(small_model_dir, tmp_path):
    """Checkpoints every save_steps with trainer_state.json; a run resumed from one ends exactly where the
    uninterrupted run ends (same data order, optimizer state and dropout masks)."""
    import clm
    from clm.checkpoints import list_checkpoints

    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(30))
    kw = dict(model_name_or_path=str(small_model_dir), max_steps=12, save_steps=4)
    ref = clm.train(_config(data, tmp_path / "ref", save_total_limit=2, **kw))
    assert ref["train_steps"] == 12 and METRIC_KEYS <= set(ref)
    assert [p.name for p in list_checkpoints(tmp_path / "ref")] == ["checkpoint-8", "checkpoint-12"]
    state = json.loads((tmp_path / "ref" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [2, 4, 6, 8]
    assert [r["step"] for r in state["log_history"] if "eval_loss" in r] == [4, 8]
    assert not list((tmp_path / "ref").glob(".*tmp*"))  # temporary save folders renamed away

    # A second output_dir holding only the step-8 checkpoint and the run record, as after a crash.
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref" / "checkpoint-8", out / "checkpoint-8")
    shutil.copy(tmp_path / "ref" / "clm_run.json", out)
    got = clm.train(_config(data, out, **kw))  # the runner finds checkpoint-8 and resumes
    assert got["resumed_from"].endswith("checkpoint-8") and got["train_steps"] == 12
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6)
    assert got["eval_loss_before"] == ref["eval_loss_before"]
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-6)


def test_epoch_checkpoints_and_fractional_epochs(small_model_dir, tmp_path):
    import clm
    from clm.checkpoints import list_checkpoints

    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(12))
    config = _config(data, tmp_path / "out", model_name_or_path=str(small_model_dir), num_train_epochs=1.5)
    metrics = clm.train(config)
    per_epoch = math.ceil(metrics["train_samples"] / 4)
    assert metrics["train_steps"] == math.ceil(1.5 * per_epoch)  # as the Trainer: ceil(epochs * steps/epoch)
    assert metrics["epoch"] == pytest.approx(metrics["train_steps"] / per_epoch, abs=1e-3)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == [
        f"checkpoint-{per_epoch}", f"checkpoint-{metrics['train_steps']}"]


# --------------------------------------------------------------------------------------------- end to end
def test_builtin_model_is_seeded_and_samples_as_the_guide():
    from clm.backends.tf.model import load_model
    from clm.defaults import gpt2_tokenizer

    first, again = (load_model(TrainConfig(seed=5), gpt2_tokenizer()) for _ in range(2))
    assert first.config.n_layer == 4 and first.config.n_embd == 128
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert first.generation_config.top_k == 50 and first.generation_config.pad_token_id == 50256
