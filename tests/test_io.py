"""clm.io: the crash-safe writes (atomic file or folder, JSON, the staged final save)."""

from __future__ import annotations

import json
import os

import pytest

from clm.io import atomic_path, staged_save, write_json


def test_atomic_path_replaces_a_file_and_a_folder(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not tmp.exists()
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block succeeds
    folder = tmp_path / "checkpoint-10"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "stale").write_text("x")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "model").write_text("weights")
    assert target.read_text() == "new" and os.listdir(folder) == ["model"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "r.json"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_atomic_path_keeps_the_old_content_and_leaves_nothing_on_failure(tmp_path, kind):
    target = tmp_path / "out"
    target.write_text("old") if kind == "file" else target.mkdir()
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half") if kind == "file" else (tmp.mkdir(), (tmp / "half").write_text("h"))
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == ["out"]
    assert (target.read_text() if kind == "file" else os.listdir(target)) == ("old" if kind == "file" else [])


def test_atomic_path_shared_keeps_the_first_finished_copy(tmp_path, monkeypatch):
    target = tmp_path / "cache"
    with atomic_path(target, shared=True) as first:
        first.mkdir()
        (first / "data").write_text("first")
        monkeypatch.setattr(os, "getpid", lambda: 4_000_000)  # another process, finishing first
        with atomic_path(target, shared=True) as second:
            assert second != first
            second.mkdir()
            (second / "data").write_text("second")
    assert (target / "data").read_text() == "second" and os.listdir(tmp_path) == ["cache"]


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": float("nan")})
    assert json.loads(path.read_text())["a"] == 2
    assert os.listdir(tmp_path) == ["r.json"]


def test_staged_save_moves_the_files_in_only_when_the_save_succeeds(tmp_path):
    (tmp_path / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with staged_save(tmp_path) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (tmp_path / "model.safetensors").read_text() == "old"
    with staged_save(tmp_path) as tmp:
        tmp.mkdir(exist_ok=True)
        (tmp / "model.safetensors").write_text("new")
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_text() == "new"
