"""PyTorch and TensorFlow backends agree: the same checkpoint scores the same on both (label shifting, masking and
batch averaging match), one epoch of the same recipe lands in the same place, and a TF-trained directory scores
the same in PyTorch. Run with -s to see the figures."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytestmark = pytest.mark.tf

import clm  # noqa: E402
from clm.config import TrainConfig  # noqa: E402
from clm.data import prepare_dataset  # noqa: E402
from clm.defaults import load_tokenizer  # noqa: E402

from conftest import eli5_rows, recipe_config, write_jsonl  # noqa: E402


def _config(model, data, out, **kw) -> TrainConfig:
    return recipe_config(model_name_or_path=model, train_file=data, output_dir=out, num_train_epochs=1,
                         logging_steps=4, **kw)


def _why(pt: float, tf: float, block_size: int) -> str:
    """A hint when PyTorch's figure is TF's times (block_size - 1) / block_size: the Trainer then divides the
    summed token loss by num_items_in_batch counted on the unshifted labels (the first token of each block,
    which nothing predicts, included), so its eval loss is not the mean token loss."""
    if abs(pt / tf - (block_size - 1) / block_size) < 1e-4:
        return ("pt eval loss = tf eval loss * (block_size - 1) / block_size: the Trainer averages over unshifted "
                "labels (num_items_in_batch); the PyTorch backend must average over predicted tokens")
    return f"pt {pt} tf {tf}"


def _eval_both(config: TrainConfig) -> tuple[float, float]:
    tokenizer = load_tokenizer(config)
    test = prepare_dataset(config, tokenizer)["test"]
    pt = clm.get_backend("pt").evaluate_model(config.replace(backend="pt"), tokenizer, test)["eval_loss"]
    tf = clm.get_backend("tf").evaluate_model(config.replace(backend="tf"), tokenizer, test)["eval_loss"]
    return pt, tf


@pytest.mark.parametrize("keep_remainder", [False, True])
def test_one_checkpoint_scores_the_same_on_both(small_model_dir, tmp_path, keep_remainder):
    """(a) eval batch 6 does not divide the eval blocks, and keep_remainder adds a padded, masked block."""
    data = write_jsonl(tmp_path / "d.jsonl", eli5_rows(40))
    pt, tf = _eval_both(_config(small_model_dir, data, tmp_path / "eval", keep_remainder=keep_remainder))
    print(f"\n(a) keep_remainder={keep_remainder}: eval loss pt {pt:.6f} tf {tf:.6f} rel {abs(tf - pt) / pt:.2e}")
    assert tf == pytest.approx(pt, rel=1e-4), _why(pt, tf, 32)


@pytest.fixture(scope="module")
def one_epoch_runs(small_model_dir, tmp_path_factory):
    """One epoch of one recipe from one PyTorch-saved checkpoint, on each backend."""
    tmp = tmp_path_factory.mktemp("parity")
    data = write_jsonl(tmp / "d.jsonl", eli5_rows(40))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLM_CACHE", str(tmp / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        runs = {b: clm.train(_config(small_model_dir, data, tmp / b, backend=b)) for b in ("pt", "tf")}
    return runs, data, tmp


def test_one_epoch_of_the_same_recipe_ends_close(one_epoch_runs):
    """(b) different dropout draws and shuffles, same schedule, batches and steps: within 3%."""
    runs, _, _ = one_epoch_runs
    pt, tf = runs["pt"], runs["tf"]
    print(f"\n(b) steps {pt['train_steps']}/{tf['train_steps']}: eval loss before {pt['eval_loss_before']:.4f}/"
          f"{tf['eval_loss_before']:.4f}, after pt {pt['eval_loss']:.4f} tf {tf['eval_loss']:.4f} "
          f"(rel {abs(tf['eval_loss'] - pt['eval_loss']) / pt['eval_loss']:.2%}); train loss pt "
          f"{pt['train_loss']:.4f} tf {tf['train_loss']:.4f}")
    assert pt["train_steps"] == tf["train_steps"] and pt["global_batch_size"] == tf["global_batch_size"]
    assert tf["eval_loss_before"] == pytest.approx(pt["eval_loss_before"], rel=1e-4), _why(
        pt["eval_loss_before"], tf["eval_loss_before"], 32)
    assert tf["eval_loss"] < tf["eval_loss_before"] - 0.1
    assert tf["eval_loss"] == pytest.approx(pt["eval_loss"], rel=0.03)


def _eval_metrics_both(config: TrainConfig) -> tuple[dict, dict]:
    tokenizer = load_tokenizer(config)
    test = prepare_dataset(config, tokenizer)["test"]
    return tuple(clm.get_backend(b).evaluate_model(config.replace(backend=b), tokenizer, test) for b in ("pt", "tf"))


@pytest.mark.parametrize("keep_remainder", [False, True])
def test_one_checkpoint_has_the_same_accuracy_on_both(one_epoch_runs, tmp_path, keep_remainder):
    """(d) eval_accuracy of one trained checkpoint (the PyTorch run's), run_clm's shifted argmax: the same on
    both to 1e-3; keep_remainder's padded labels and TF's padding rows count on neither."""
    runs, data, tmp = one_epoch_runs
    pt, tf = _eval_metrics_both(_config(tmp / "pt", data, tmp_path / "eval", keep_remainder=keep_remainder))
    print(f"\n(d) keep_remainder={keep_remainder}: eval accuracy pt {pt['eval_accuracy']:.6f} "
          f"tf {tf['eval_accuracy']:.6f}")
    assert 0.01 < pt["eval_accuracy"] < 1
    assert tf["eval_accuracy"] == pytest.approx(pt["eval_accuracy"], abs=1e-3)
    assert tf["eval_loss"] == pytest.approx(pt["eval_loss"], rel=1e-4)
    # both backends' runs report it before and after training; the same start scores the same
    for run in runs.values():
        assert {"eval_accuracy", "eval_accuracy_before"} <= set(run)
    assert runs["tf"]["eval_accuracy_before"] == pytest.approx(runs["pt"]["eval_accuracy_before"], abs=1e-3)


def test_tf_trained_directory_scores_the_same_in_pytorch(one_epoch_runs, tmp_path):
    """(c) the TF backend's saved model, read by both backends."""
    runs, data, tmp = one_epoch_runs
    pt, tf = _eval_both(_config(tmp / "tf", data, tmp_path / "eval"))
    print(f"\n(c) TF-trained dir: eval loss pt {pt:.6f} tf {tf:.6f} rel {abs(tf - pt) / pt:.2e}")
    assert tf == pytest.approx(pt, rel=1e-4), _why(pt, tf, 32)
    assert tf == pytest.approx(runs["tf"]["eval_loss"], rel=1e-5)  # the saved weights are the trained ones
