"""Faults: SIGKILL a real training process, run the same command again, and end where an uninterrupted run
ends. Also: resume skips half-written checkpoints, runs are reproducible, and a hub token never lands on disk."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clm.checkpoints import list_checkpoints

from conftest import ROOT, eli5_rows, recipe_args, run_clm, write_jsonl

PLANTED_TOKEN = "hf_plantedTokenDoNotLeak1234567890"
DETERMINISTIC = {"TF_DETERMINISTIC_OPS": "1"}  # bit-identical TF kernels, so runs compare to 1e-6


def _need(backend):
    pytest.importorskip("torch")  # tiny_model_dir is written by PyTorch
    if backend == "tf":
        pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def args(tmp_path_factory, tiny_model_dir):
    data = write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", eli5_rows(60))
    return functools.partial(recipe_args, tiny_model_dir, data)


def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _start(argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clm", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **DETERMINISTIC})


def _run_to_end(argv, **env) -> subprocess.CompletedProcess:
    """The same command run to completion (after a kill, it resumes); fails the test if it fails."""
    proc = run_clm(*argv, env={**DETERMINISTIC, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail("training ended before it could be killed")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args):
    """Uninterrupted runs, with a planted hub token in the environment: one per backend for the module."""
    cache = {}

    def get(backend):
        if backend not in cache:
            out = tmp_path_factory.mktemp("ref") / f"ref-{backend}"
            proc = _run_to_end(args(backend, out), HF_TOKEN=PLANTED_TOKEN)
            assert PLANTED_TOKEN not in proc.stdout + proc.stderr
            cache[backend] = out
        return cache[backend]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_sigkill_after_a_checkpoint_then_resume(backend, tmp_path, args, reference):
    _need(backend)
    ref = _results(reference(backend))
    out = tmp_path / "killed"
    _kill_when(_start(args(backend, out)), lambda: len(list_checkpoints(out)) >= 2)
    assert not (out / "all_results.json").exists()
    resumed = _run_to_end(args(backend, out))
    assert "Resuming from" in resumed.stderr
    got = _results(out)
    assert got["resumed_from"] and got["train_steps"] == ref["train_steps"] == 24
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-3)
    assert got["eval_loss_before"] == pytest.approx(ref["eval_loss_before"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_sigkill_during_a_save_then_resume(backend, tmp_path, args, reference):
    _need(backend)
    ref = _results(reference(backend))
    out = tmp_path / "killed-in-save"
    # Kill mid-save: PyTorch writes checkpoint-N/ in place (trainer_state.json last); TensorFlow fills a hidden
    # .checkpoint-N.tmp/ and renames it, so that temporary folder is what a kill mid-save leaves.
    prefix = "checkpoint-" if backend == "pt" else ".checkpoint-"
    _kill_when(_start(args(backend, out)),
               lambda: out.is_dir() and any(p.name.startswith(prefix) for p in out.iterdir()))
    if backend == "tf":
        assert not list_checkpoints(out), "killed before the first checkpoint was complete"
    _run_to_end(args(backend, out))
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]  # the torn save is cleared
    assert _results(out)["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_same_seed_same_metrics_and_no_token_on_disk(backend, tmp_path, args, reference):
    _need(backend)
    first = reference(backend)
    _run_to_end(args(backend, tmp_path / "again"))
    a, b = _results(first), _results(tmp_path / "again")
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    for path in first.rglob("*"):
        if path.is_file():
            assert PLANTED_TOKEN.encode() not in path.read_bytes(), path


def test_rerun_of_a_finished_run_is_refused_and_overwrite_starts_fresh(tmp_path, capsys):
    from clm.cli import main
    from clm.checkpoints import RunRecord

    out = tmp_path / "out"
    RunRecord(out).update(backend="pt")
    (out / "all_results.json").write_text("{}")
    assert main(["--output_dir", str(out)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    from clm.config import TrainConfig
    from clm.runner import prepare_output_dir

    prepare_output_dir(TrainConfig(output_dir=str(out), overwrite_output_dir=True))
    assert list(out.iterdir()) == []
