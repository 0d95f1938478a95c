"""A two-process PyTorch run trains in DDP from its first step, and a resumed one ends where it would have.

clm evaluates before training. On an untrained Trainer, ``evaluate`` has accelerate prepare the model for
evaluation only, which marks it prepared, and accelerate 1.16 then skipped the DDP wrapping when training prepared
it: each process trained its own replica on its half of every global batch, and process zero's was saved. A resumed
session, which skips that evaluation, trained in DDP, so a run stopped and resumed ended elsewhere than an
uninterrupted one (observed 9.9767 vs 9.9879 eval loss on the GPT-2-vocabulary recipe). Without dropout, two
processes with 4 blocks each (DDP averages their gradients) follow one process with 8 blocks: accelerate shards the
same seeded batch order, so both see the same global batches (observed equal to the last bit; without DDP, 0.14%
apart).
"""

from __future__ import annotations

import json

import pytest

from conftest import MULTI_PROCESS, launch_two, recipe_args, run_clm

pytestmark = pytest.mark.distributed

# SIGTERM to process 1 before the step after STOP_AFTER: every process stops there and rank 0 saves a checkpoint
HOOKS = r'''
import os, signal, sys, time
from transformers.trainer_callback import CallbackHandler
original = CallbackHandler.on_step_begin
def on_step_begin(self, args, state, control):
    if os.environ.get("STOP_AFTER") == str(state.global_step) and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    return original(self, args, state, control)
CallbackHandler.on_step_begin = on_step_begin
from clm.cli import main
sys.exit(main())
'''


def _results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


@pytest.mark.compat
def test_two_processes_stopped_and_resumed_follow_one_process(tmp_path, no_dropout_model, recipe_data):
    pytest.importorskip("torch")
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS)
    short = ("--max_steps", "8", *MULTI_PROCESS)
    one = run_clm(*recipe_args(no_dropout_model, recipe_data, "pt", tmp_path / "one", *short,
                               "--per_device_train_batch_size", "8"), env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]

    argv = recipe_args(no_dropout_model, recipe_data, "pt", tmp_path / "two", *short)
    codes, errs = launch_two("pt", argv, hooks, STOP_AFTER="2")
    assert codes[0] != 0 and "stopped by SIGTERM: saved checkpoint" in errs[0], errs[0][-3000:]
    assert (tmp_path / "two" / "checkpoint-3").is_dir()
    codes, errs = launch_two("pt", argv, hooks)
    assert codes == [0] and "Resuming from" in errs[0], errs[0][-3000:]

    r1, r2 = _results(tmp_path / "one"), _results(tmp_path / "two")
    print(f"eval_loss: one process {r1['eval_loss']:.7f}, two stopped and resumed {r2['eval_loss']:.7f}")
    assert (r1["world_size"], r2["world_size"], r1["global_batch_size"], r2["global_batch_size"]) == (1, 2, 8, 8)
    assert r1["eval_loss_before"] - r1["eval_loss"] > 0.5  # trained well beyond the tolerance
    assert r2["eval_loss_before"] == pytest.approx(r1["eval_loss_before"], rel=1e-6)
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-5)
