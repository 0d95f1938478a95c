"""--push_to_hub and ``clm push`` against a local stand-in of the Hub's HTTP API (tests/hub_standin.py, loopback
only), reached through HF_ENDPOINT. The stand-in does not speak Xet, so these runs set HF_HUB_DISABLE_XET=1.

What a push carries is framework-free (clm.hub_push) and tested in process, per strategy; the end-to-end runs train
each backend as a user would and check the files that arrive, the token, and failures mid-commit."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, eli5_rows, run_clm, write_jsonl
from hub_standin import HubStandin

pytestmark = pytest.mark.compat  # huggingface_hub 0.36 (.venv-tf) and 1.x+ (.venv) both

REPO = "standin-user/tiny-clm"
SKIP_DIRS = {".venv", ".venv-tf", ".git", "__pycache__"}


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def hub():
    with HubStandin(token="hf_" + secrets.token_hex(16)) as standin:  # stops at the end of the test
        yield standin


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def public(output_dir: Path) -> dict[str, bytes]:
    """The output dir's public files, written out independently of clm.hub_push: no hidden or temporary entry, no
    `_*` file (the Trainer's private ones), no run record, no checkpoint."""
    return {rel: data for rel, data in local_files(output_dir).items()
            if not any(part.startswith(".") for part in rel.split("/"))
            and rel != "clm_run.json" and not rel.startswith(("checkpoint-", "_"))}


def files_holding(token: str, *roots: Path) -> list[str]:
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            for name in files:
                path = Path(folder, name)
                try:
                    if path.stat().st_size < 64 * 2**20 and token.encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    pass
    return found


# --------------------------------------------------------------------------------------------- in process
@pytest.fixture
def inprocess(hub, monkeypatch, tmp_path):
    """huggingface_hub in this process aimed at the stand-in (it reads its settings at import time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache"))
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


def fake_run(out: Path) -> Path:
    """An output dir as a finished run leaves it, with every kind of entry a push must sort."""
    files = {
        "model.safetensors": os.urandom(3000), "config.json": b"{}", "tokenizer.json": b"{}", "README.md": b"# m\n",
        "all_results.json": b'{"eval_loss": 1.0}', "loss_curve.png": os.urandom(500),
        "runs/Jan01_host/events.out.tfevents.1.host": b"\0tb", "clm_run.json": b'{"backend": "pt"}',
        ".final-save.tmp/model.safetensors": b"stray", ".all_results.json.tmp": b"half", ".clm.lock": b"1",
        "runs/.hidden": b"x", "_private.txt": b"x", "checkpoint-9/model.safetensors": b"half-written",
    }
    for step in (2, 4):
        files.update({f"checkpoint-{step}/model.safetensors": os.urandom(3000),
                      f"checkpoint-{step}/config.json": b"{}", f"checkpoint-{step}/tokenizer.json": b"{}",
                      f"checkpoint-{step}/optimizer.pt": os.urandom(800),
                      f"checkpoint-{step}/tf_checkpoint/ckpt.index": os.urandom(80),
                      f"checkpoint-{step}/trainer_state.json": json.dumps({"global_step": step}).encode()})
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


def under(files: dict[str, bytes], prefix: str) -> dict[str, bytes]:
    return {rel[len(prefix):]: data for rel, data in files.items() if rel.startswith(prefix)}


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_what_each_strategy_pushes(inprocess, tmp_path, strategy):
    from clm.hub_push import HubPush

    out = fake_run(tmp_path / "out")
    push = HubPush(out, REPO, private=True, strategy=strategy)
    for step in (2, 4):
        push.on_save(out / f"checkpoint-{step}")
        push.wait()  # each save finds the previous push done: nothing skipped
    push.finish()

    arrived, local = inprocess.files(REPO), local_files(out)
    expected = dict(public(out))
    if strategy == "checkpoint":
        expected.update({f"last-checkpoint/{k}": v for k, v in under(local, "checkpoint-4/").items()})
    if strategy == "all_checkpoints":
        expected.update({k: v for k, v in local.items() if k.startswith(("checkpoint-2/", "checkpoint-4/"))})
    assert arrived == expected
    assert inprocess.repos[REPO].private and not inprocess.unhandled
    commits = inprocess.commits(REPO)
    assert commits[-1]["summary"] == "End of training"
    if strategy == "end":
        assert len(commits) == 1
    else:  # each save pushed that checkpoint's model to the root, without its training state
        saves = [c for c in commits if c["summary"].startswith("Training in progress") and "checkpoint" not in
                 c["summary"]]
        assert [c["paths"] for c in saves] == [["config.json", "model.safetensors", "tokenizer.json"]] * 2


def test_the_end_pushes_what_a_skipped_save_did_not(inprocess, tmp_path):
    """A save that finds the previous push running skips its own (the Trainer's rule); the end catches up."""
    from clm.hub_push import HubPush

    out = fake_run(tmp_path / "out")
    push = HubPush(out, REPO, strategy="all_checkpoints")
    push.on_save(out / "checkpoint-2")
    push.on_save(out / "checkpoint-4")  # usually skipped: checkpoint-2's upload has barely started
    push.finish()
    assert under(inprocess.files(REPO), "checkpoint-4/") == under(local_files(out), "checkpoint-4/")


def test_a_failed_background_push_is_a_warning(inprocess, tmp_path, caplog):
    from clm.hub_push import HubPush

    out = fake_run(tmp_path / "out")
    inprocess.fail(500, "commit", match="step 2")
    push = HubPush(out, REPO)
    with caplog.at_level(logging.WARNING, logger="clm"):
        push.on_save(out / "checkpoint-2")
        push.wait()
    assert "server error (500)" in caplog.text
    push.finish()
    assert inprocess.files(REPO) == public(out)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, cause", [
    ("commit-401", "401 Unauthorized"), ("commit-403", "403 Forbidden"), ("commit-500", "server error (500)"),
    ("preupload-502", "server error (502)"), ("create-401", "401 Unauthorized"),
    ("other-namespace", "403 Forbidden"), ("unreachable", "is unreachable"), ("no-token", "no Hugging Face token"),
    ("offline", "HF_HUB_OFFLINE=1"),
])
def test_failures_are_one_line_naming_the_cause(inprocess, tmp_path, monkeypatch, case, cause):
    from huggingface_hub import constants

    from clm.hub_push import HubPush, HubPushError

    out = fake_run(tmp_path / "out")
    repo = "someone-else/m" if case == "other-namespace" else REPO
    where, _, status = case.partition("-")
    if status.isdigit():
        inprocess.fail(int(status), where, times=None)
    if case == "preupload-502":  # huggingface_hub retries a preupload on 5xx: keep its waits short
        monkeypatch.setattr("time.sleep", lambda s: None)
    if case == "unreachable":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    if case == "no-token":
        monkeypatch.delenv("HF_TOKEN")
    if case == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError) as err:
        HubPush(out, repo).finish()
    message = str(err.value)
    assert cause in message and "\n" not in message and inprocess.token not in message
    assert err.value.exit_code != 0
    assert inprocess.files(repo) == {}  # a failed commit leaves nothing half-pushed


# --------------------------------------------------------------------------------------------- end to end
class Clm:
    """``clm ...`` in a subprocess aimed at the stand-in, with HOME and TMPDIR of its own (searched for the token
    afterwards); model and data stay local."""

    def __init__(self, hub: HubStandin, tmp_path: Path, model_dir: Path):
        home, tmp = tmp_path / "home", tmp_path / "tmp"
        home.mkdir()
        tmp.mkdir()
        self.hub, self.out, self.model_dir = hub, tmp_path / "out", model_dir
        self.data = write_jsonl(tmp_path / "my_eli5.jsonl", eli5_rows(30))
        self.scanned = (tmp_path, ROOT)  # output dir, HOME, TMPDIR, and the repo
        self.env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1",
                    "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HOME": str(home), "TMPDIR": str(tmp),
                    "HF_HOME": str(home / "hf"), "NO_PROXY": "127.0.0.1,localhost"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        proc = run_clm(*args, env=self.env)
        assert self.hub.token not in proc.stdout + proc.stderr
        return proc

    def train(self, backend: str, *extra: str) -> subprocess.CompletedProcess:
        return self("--backend", backend, "--model_name_or_path", str(self.model_dir), "--train_file",
                    str(self.data), "--output_dir", str(self.out), "--max_steps", "4", "--save_steps", "2",
                    "--block_size", "32", "--logging_steps", "2", "--push_to_hub", "--hub_model_id", REPO, *extra)


@pytest.fixture
def run(hub, tmp_path, tiny_model_dir) -> Clm:
    """On the GPT-2-vocabulary model: its saves take long enough for each checkpoint's upload to finish before
    the next save (a faster model coalesces them, and the last commit's summary changes)."""
    return Clm(hub, tmp_path, tiny_model_dir)


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("clm: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def assert_model_complete(out: Path) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "all_results.json", "README.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "all_results.json").read_text())["eval_loss"] > 0


# What a PyTorch run pushes does not depend on transformers' version (the push is clm's own; the in-process
# tests above run on both huggingface_hub lines): transformers 5.x only.
@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("pt", marks=pytest.mark.latest_only), "tf"])
def test_training_pushes_the_output_dirs_public_files(hub, run, backend):
    if backend == "tf":
        pytest.importorskip("tensorflow")
    proc = run.train(backend, "--hub_strategy", "checkpoint", "--hub_private_repo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, arrived = run.out, hub.files(REPO)
    expected = {**public(out), **{f"last-checkpoint/{k}": v for k, v in
                                  under(local_files(out), "checkpoint-4/").items()}}
    assert arrived == expected  # the final model, card, results, logs; no staging folder, temp file, run record
    assert "model.safetensors" in arrived and not any(p.endswith(".h5") for p in arrived)
    assert hub.repos[REPO].private and not hub.unhandled
    assert [c["summary"] for c in hub.commits(REPO)][-1] == "End of training"
    assert files_holding(hub.token, *run.scanned) == []


CAUSE = {401: "401 Unauthorized", 500: "server error (500)"}


@pytest.mark.slow
@pytest.mark.parametrize("backend, status", [pytest.param("pt", 401, marks=pytest.mark.latest_only),
                                             ("tf", 500)])
def test_a_failed_push_loses_nothing_and_clm_push_retries(hub, run, backend, status):
    """A 401 or 500 on the commit, after the preupload and LFS uploads went through: during training on one
    backend, then from ``clm push`` with the other status (the same HubPush.finish), then a clean retry."""
    if backend == "tf":
        pytest.importorskip("tensorflow")
    hub.fail(status, "commit", times=None, match="End of training")
    proc = run.train(backend, "--hub_strategy", "end")
    line = error_line(proc)
    assert proc.returncode != 0 and CAUSE[status] in line and f"clm push --output_dir {run.out}" in line
    assert_model_complete(run.out)
    assert hub.files(REPO) == {}

    hub.clear_failures()
    other = 500 if status == 401 else 401
    hub.fail(other, "commit", times=None)
    retry = run("push", "--output_dir", str(run.out), "--hub_model_id", REPO)
    assert retry.returncode != 0 and CAUSE[other] in error_line(retry)
    assert_model_complete(run.out)

    hub.clear_failures()
    retry = run("push", "--output_dir", str(run.out), "--hub_model_id", REPO)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert hub.files(REPO) == public(run.out)
    assert files_holding(hub.token, *run.scanned) == []
