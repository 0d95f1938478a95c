"""Data-parallel training on CPU: two processes reach the loss of one process with the same global batch.

Dropout is off and the global batch is the same (2 x 4 vs 1 x 8). PyTorch: accelerate shards one seeded batch
order, so each step sees the blocks one process sees and DDP averages the two halves' gradients: the same result
but for float rounding, which 24 steps at this rate grow to 3.4e-4 relative (the tolerance is 1e-3, a 20th of the
old 2%). That two processes train in DDP from the first step is checked exactly by the multi-process preemption
test, whose resumed session always did. TensorFlow: the workers keep their
shares of every global batch (explicit DATA sharding): the runs differ only in float summation order (1e-3).
The two-process runs are conftest's two_process_reference, which the multi-process preemption tests resume to.
"""

from __future__ import annotations

import json

import pytest

from conftest import MULTI_PROCESS, recipe_args, run_clm

pytestmark = pytest.mark.distributed


def _results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


@pytest.mark.compat
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_two_processes_match_one(backend, two_process_reference, no_dropout_model, recipe_data, tmp_path):
    """pt: torchrun --nproc_per_node 2. tf: two TF_CONFIG workers on loopback ports under
    MultiWorkerMirroredStrategy."""
    pytest.importorskip("torch")
    if backend == "tf":
        pytest.importorskip("tensorflow")
    two, two_err = two_process_reference(backend)
    one = run_clm(*recipe_args(no_dropout_model, recipe_data, backend, tmp_path / "one", *MULTI_PROCESS,
                               "--per_device_train_batch_size", "8"),
                  env={"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    r2, r1 = _results(two), _results(tmp_path / "one")
    assert (r2["world_size"], r2["global_batch_size"]) == (2, 8)
    assert (r1["world_size"], r1["global_batch_size"]) == (1, 8)
    assert r1["eval_loss_before"] - r1["eval_loss"] > 1.0  # training moved the loss well beyond the tolerance
    if backend == "pt":
        assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-3)  # observed 3.4e-4 over the 24 steps
        assert two_err.count("Prepared data saved") == 1  # prepared once, by the main process
        assert r2["train_tokens_per_second_per_process"] == pytest.approx(r2["train_tokens_per_second"] / 2)
    else:
        assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-3)
        assert r2["eval_loss_before"] == pytest.approx(r1["eval_loss_before"], rel=1e-5)


def test_pt_finish_releases_the_process_group(tmp_path):
    """A torchrun process that exits with its gloo group alive can abort in the group's destructor
    (seen as SIGABRT, "terminate called without an active exception", failing a finished job)."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    from clm.backends.pt.backend import TorchBackend

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    TorchBackend().finish()
    assert not dist.is_initialized()
    TorchBackend().finish()  # and a no-op when there is no group
