"""clm.checkpoints: completeness, listing, pruning, which backend wrote a checkpoint, and the run record."""

from __future__ import annotations

import json

import pytest

from clm import checkpoints
from clm.checkpoints import RunRecord
from clm.errors import ConfigError


def _checkpoint(out, step, complete=True, backend="pt"):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if backend == "pt":
        (path / "optimizer.pt").write_bytes(b"x")
    elif backend == "tf":
        (path / checkpoints.TF_STATE_DIR).mkdir()
    if complete:
        (path / checkpoints.DONE_FILE).write_text(json.dumps({"global_step": step}))
    return path


def test_listing_is_numeric_and_skips_half_written_ones(tmp_path):
    for step in (2, 10, 4):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-14").mkdir()
    (tmp_path / "checkpoint-14" / checkpoints.DONE_FILE).write_text('{"global_st')  # truncated
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4",
                                                                        "checkpoint-10"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert checkpoints.latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_the_newest_and_the_one_just_saved(tmp_path):
    paths = [_checkpoint(tmp_path, step) for step in (1, 2, 3, 4)]
    checkpoints.prune(tmp_path, 2, keep=paths[-1])
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    checkpoints.prune(tmp_path, None, keep=paths[-1])  # no limit: nothing deleted
    assert len(checkpoints.list_checkpoints(tmp_path)) == 2


@pytest.mark.parametrize("owner,other", [("pt", "tf"), ("tf", "pt")])
def test_resuming_the_other_backends_checkpoint_is_one_clear_error(tmp_path, owner, other):
    path = _checkpoint(tmp_path, 4, backend=owner)
    assert checkpoints.written_by(path) == owner
    checkpoints.check_resumable(path, owner)
    with pytest.raises(ConfigError, match=f"written by the {owner} backend; resume it with --backend {owner}"):
        checkpoints.check_resumable(path, other)


def test_half_written_checkpoint_is_not_resumable(tmp_path):
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoints.check_resumable(_checkpoint(tmp_path, 4, complete=False), "pt")


def test_run_record_merges_updates_and_survives_a_corrupt_file(tmp_path):
    record = RunRecord(tmp_path)
    assert not record.exists() and record.get("eval_loss_before") is None
    record.update(backend="pt")
    record.update(eval_loss_before=10.5)
    assert RunRecord(tmp_path).load() == {"backend": "pt", "eval_loss_before": 10.5}
    record.path.write_text("{not json")
    assert record.load() == {}
    assert not [p for p in tmp_path.iterdir() if p.name != checkpoints.RUN_RECORD_FILE]  # no temp files left
