"""Faults and preemption: a stop signal mid-step writes a checkpoint and exits 128+signal; SIGKILL after a
checkpoint or in the middle of a save loses at most the steps since the last complete checkpoint; a failed write
(a full disk) keeps the last checkpoint; and in every case the same command resumes to the result of the
uninterrupted run (conftest's recipe_reference, run once per backend for the session). One run per output_dir;
--streaming resumes like the prepared path; reruns are reproducible and a Hub token lands on no file.

Faults are injected inside a real ``clm`` process by ``HOOKS`` (a wrapper around ``clm.cli.main``): at a given
optimizer step it signals itself or waits for a file; a library's save function raises ENOSPC for one path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clm import lock, preemption
from clm.checkpoints import is_complete, latest_checkpoint, list_checkpoints
from clm.errors import Preempted

from conftest import DETERMINISTIC, MULTI_PROCESS, PLANTED_TOKEN, ROOT, launch_two, recipe_args

TIMEOUT = 600

HOOKS = r'''
import errno, importlib, os, signal, sys, time
from pathlib import Path

def rank():
    """This process's rank under torchrun (RANK) or a TF cluster (TF_CONFIG's task index); 0 alone."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    import json
    return json.loads(os.environ["TF_CONFIG"])["task"]["index"] if os.environ.get("TF_CONFIG") else 0

def at_step(done):
    """Called before each optimizer step, with the number of steps done."""
    spec = os.environ.get("HOOK_SIGNAL_AT")  # "<steps done>:<SIG>[,<SIG>...]" (",": 1.5 s apart; "+": at once)
    only = os.environ.get("HOOK_RANK")  # signal only the process of this rank
    if spec and int(spec.split(":")[0]) == done and (only is None or int(only) == rank()):
        for i, group in enumerate(spec.split(":")[1].split(",")):
            if i:
                time.sleep(1.5)  # beyond clm.preemption.DUPLICATE_WINDOW: a second signal, not a duplicate
            for name in group.split("+"):
                if os.environ.get("HOOK_STAMP"):  # when the signal went out, for the time-to-exit figure
                    Path(os.environ["HOOK_STAMP"]).write_text(str(time.time()))
                os.kill(os.getpid(), getattr(signal, name))
        time.sleep(0.2)  # the signal is handled in this step
    spec = os.environ.get("HOOK_PAUSE_AT")  # "<steps done>:<file>": create <file>.reached, wait for <file>
    if spec and int(spec.split(":")[0]) == done:
        flag = Path(spec.split(":", 1)[1])
        Path(f"{flag}.reached").write_text(str(os.getpid()))
        deadline = time.time() + 300
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.05)

# "<module>:<function>:<path part>": that save raises ENOSPC (FAIL) or the process dies there, mid-save (KILL)
for hook in ("HOOK_FAIL_WRITE", "HOOK_KILL_WRITE"):
    spec = os.environ.get(hook)
    if spec:
        module_name, function, part = spec.split(":")
        module = importlib.import_module(module_name)
        def failing(obj, path, *args, _original=getattr(module, function), _part=part, _kill=hook == "HOOK_KILL_WRITE",
                    **kwargs):
            if _part in str(path):
                if _kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return _original(obj, path, *args, **kwargs)
        setattr(module, function, failing)

if "tf" in sys.argv:
    from clm.backends.tf.trainer import ClmCallback
    ClmCallback.on_train_batch_begin = lambda self, batch, logs=None: at_step(self.step)
else:
    from transformers.trainer_callback import CallbackHandler
    original_begin = CallbackHandler.on_step_begin
    def on_step_begin(self, args, state, control):
        at_step(state.global_step)
        return original_begin(self, args, state, control)
    CallbackHandler.on_step_begin = on_step_begin

from clm.cli import main
sys.exit(main())
'''


def _need(backend):
    pytest.importorskip("torch")  # the test models are written by PyTorch
    if backend == "tf":
        pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hooks") / "clm_hooks.py"
    path.write_text(HOOKS)
    return path


def _env(**extra) -> dict:
    return {**os.environ, **DETERMINISTIC, **extra}


def _clm(argv, hooks: Path = None, **env) -> subprocess.CompletedProcess:
    """``python -m clm ARGV`` (or through HOOKS, with the faults ``env`` asks for), run to its end."""
    cmd = [sys.executable, str(hooks), *argv] if hooks else [sys.executable, "-m", "clm", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def _ok(argv) -> subprocess.CompletedProcess:
    proc = _clm(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _last_line(proc) -> str:
    """clm's one line about the outcome (a progress bar may still print its last state after it)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("clm: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _assert_same_run(out: Path, ref: Path, rel: float = 1e-6) -> None:
    got, want = _results(out), _results(ref)
    print(f"{out.name}: eval_loss {got['eval_loss']:.6f}, uninterrupted {want['eval_loss']:.6f}")
    assert got["train_steps"] == want["train_steps"] == 24
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=rel)
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=rel)
    assert got["eval_loss_before"] == pytest.approx(want["eval_loss_before"], rel=1e-6)


# --------------------------------------------------------------------------------------------- signals
def test_handlers_record_a_signal_while_training_and_interrupt_outside_it():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.handling():
        with preemption.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert preemption.stop_signal() == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGUSR1)  # the same stop delivered twice (torchrun forwards it): once
            time.sleep(0.01)
        assert preemption.votes() == [0, 0, 1] and preemption.agree([0, 0, 0]) is None  # SIGTERM, SIGINT, SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before and preemption.stop_signal() is None
    with pytest.raises(preemption.Interrupted) as info, preemption.handling():
        os.kill(os.getpid(), signal.SIGTERM)  # outside training: nothing to save, stop at once
        time.sleep(1)
    assert info.value.signum == signal.SIGTERM
    assert [Preempted(s).exit_code for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)] == [130, 138, 143]


def test_processes_agree_on_one_signal():
    with preemption.handling():
        votes = [sum(v) for v in zip([0, 0, 0], [0, 1, 0], [1, 0, 0])]  # a SIGINT here, a SIGTERM elsewhere
        assert preemption.agree(votes) == signal.SIGTERM == preemption.stop_signal()


def test_a_second_signal_exits_at_once():
    code = ("import os, signal, time; from clm import preemption\n"
            "with preemption.handling(), preemption.deferred():\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(1.5); os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143 and time.monotonic() - began < 20
    assert "second SIGTERM; exiting now, without saving" in proc.stderr


def test_a_signal_before_training_stops_with_nothing_to_save(tmp_path, monkeypatch, capsys, tiny_model_dir,
                                                             eli5_file):
    pytest.importorskip("torch")
    import clm.data
    from clm.cli import main

    handler = signal.getsignal(signal.SIGINT)

    def prepare(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        pytest.fail("the signal did not interrupt data preparation")
    monkeypatch.setattr(clm.data, "prepare_dataset", prepare)
    out = tmp_path / "out"
    code = main(["--backend", "pt", "--model_name_or_path", str(tiny_model_dir), "--train_file", str(eli5_file),
                 "--output_dir", str(out), "--report_to", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err[-1].startswith("clm: stopped by SIGINT before any checkpoint was written; to start over, run the "
                              "same command again")
    assert not (out / lock.LOCK_FILE).exists()  # the lock is released
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are restored


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_sigterm_mid_step_saves_a_checkpoint_and_the_same_command_resumes(backend, tmp_path, recipe, hooks,
                                                                           recipe_reference):
    _need(backend)
    ref = recipe_reference(backend)
    out = tmp_path / "out"
    # During step 6, with the checkpoints of steps 4 and 8 not due: the stop writes checkpoint-6.
    stamp = tmp_path / "signal-sent"
    stopped = _clm(recipe(backend, out), hooks, HOOK_SIGNAL_AT="5:SIGTERM", HOOK_STAMP=str(stamp))
    print(f"{backend}: SIGTERM to exit {time.time() - float(stamp.read_text()):.2f} s")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    ckpt = out / "checkpoint-6"
    assert _last_line(stopped) == (f"clm: stopped by SIGTERM: saved checkpoint {ckpt}; to resume from it, run the "
                                   f"same command again: clm_hooks.py {shlex.join(recipe(backend, out))}")
    assert latest_checkpoint(out) == ckpt and is_complete(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["log_history"][-1]["step"] == 6  # the loss of steps 5-6 kept
    assert not (out / "all_results.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / lock.LOCK_FILE).exists()

    resumed = _ok(recipe(backend, out))
    assert f"Resuming from {ckpt}" in resumed.stderr
    _assert_same_run(out, ref)


@pytest.mark.slow
def test_signals_twice_at_once_count_once_and_twice_apart_exit_without_saving(tmp_path, recipe, hooks):
    _need("pt")
    out = tmp_path / "twice-at-once"  # torchrun forwards the scheduler's signal, which also reached the worker
    proc = _clm(recipe("pt", out), hooks, HOOK_SIGNAL_AT="5:SIGUSR1+SIGUSR1")
    assert proc.returncode == 138 and latest_checkpoint(out) == out / "checkpoint-6", proc.stderr[-3000:]
    out = tmp_path / "twice-apart"
    proc = _clm(recipe("pt", out), hooks, HOOK_SIGNAL_AT="5:SIGINT,SIGINT")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert _last_line(proc) == "clm: second SIGINT; exiting now, without saving"
    assert latest_checkpoint(out) == out / "checkpoint-4"


# --------------------------------------------------------------------------------------------- several processes
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_a_signal_on_one_process_stops_every_process_at_one_checkpoint(backend, tmp_path, recipe_data, hooks,
                                                                        no_dropout_model, two_process_reference):
    """Process 1 alone gets SIGTERM (a node's share of a job stopped first). pt (torchrun): the ranks agree at the
    step's end, rank 0 writes checkpoint-6, every rank exits 143. tf (two TF_CONFIG workers): the workers agree
    through a collective at the step's end, the chief writes checkpoint-6, both exit 143. The same command then
    resumes exactly to the result of the uninterrupted two-process run (test_distributed's), which on PyTorch also
    checks that a resumed session trains in DDP as a fresh one does."""
    _need(backend)
    argv = recipe_args(no_dropout_model, recipe_data, backend, tmp_path / "out", *MULTI_PROCESS)
    out, ckpt, stamp = tmp_path / "out", tmp_path / "out" / "checkpoint-6", tmp_path / "signal-sent"
    codes, errs = launch_two(backend, argv, hooks, HOOK_SIGNAL_AT="5:SIGTERM", HOOK_RANK="1",
                             HOOK_STAMP=str(stamp))
    print(f"{backend} two processes: SIGTERM to exit {time.time() - float(stamp.read_text()):.2f} s")
    assert f"clm: stopped by SIGTERM: saved checkpoint {ckpt}" in errs[0], errs[0][-3000:]
    if backend == "pt":
        assert codes[0] != 0
        ranks = re.findall(r"exitcode\s*:\s*(-?\d+)", errs[0])  # torchrun's summary of its workers' ends
        assert len(ranks) >= 2 and set(ranks) == {"143"}, errs[0][-3000:]
    else:
        assert codes == [143, 143], "\n".join(e[-3000:] for e in errs)
    assert latest_checkpoint(out) == ckpt and is_complete(ckpt)
    assert not (out / "all_results.json").exists()
    codes, errs = launch_two(backend, argv, hooks)
    assert set(codes) == {0} and f"Resuming from {ckpt}" in errs[0], "\n".join(e[-3000:] for e in errs)
    # pt: the same eval loss to 1e-6; transformers 4.57 rebuilds a resumed run's train_loss from the logged losses,
    # rounded to 4 decimals (observed 3.4e-6 relative): 1e-4, a tenth of the bound before two processes trained in
    # DDP from the start.
    ref = two_process_reference(backend)[0]
    _assert_same_run(out, ref, rel=1e-4 if backend == "pt" else 1e-6)
    assert _results(out)["eval_loss"] == pytest.approx(_results(ref)["eval_loss"], rel=1e-6)


# --------------------------------------------------------------------------------------------- one run per dir
def test_lock_refuses_a_second_holder_and_a_dead_holder_never_blocks(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from clm import lock\n"
                               f"with lock.hold({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.OutputDirBusy, match=rf"in use by another clm run \(pid {holder.pid}\)"):
            with lock.hold(out):
                pass
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel's lock does not
        holder.wait(timeout=60)
    assert (out / lock.LOCK_FILE).exists()
    with lock.hold(out) as path:
        assert path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(lock.OutputDirBusy):  # one run per output_dir within a process too
            with lock.hold(out):
                pass
    assert not path.exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_a_second_run_on_a_busy_output_dir_is_refused_and_the_first_finishes_unharmed(backend, tmp_path, recipe,
                                                                                      hooks, recipe_reference):
    """Also the reproducibility check: the first run, paused but never interrupted, ends where the reference run
    with the same seed ends (1e-6)."""
    _need(backend)
    out, flag = tmp_path / "out", tmp_path / "go-on"
    first = subprocess.Popen([sys.executable, str(hooks), *recipe(backend, out)], cwd=ROOT, text=True,
                             env=_env(HOOK_PAUSE_AT=f"5:{flag}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + TIMEOUT
        while not Path(f"{flag}.reached").exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not reach step 5"
            time.sleep(0.1)
        before = sorted((str(p.relative_to(out)), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*"))
        second = _clm(recipe(backend, out, "--overwrite_output_dir"))  # the most destructive second run
        after = sorted((str(p.relative_to(out)), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*"))
    finally:
        flag.touch()
    assert second.returncode == 2
    assert _last_line(second) == (f"clm: error: --output_dir {str(out)!r} is in use by another clm run (pid "
                                  f"{first.pid}); wait for it to finish, or choose another --output_dir")
    assert after == before  # it touched nothing
    _, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err[-3000:]
    _assert_same_run(out, recipe_reference(backend))
    assert not (out / lock.LOCK_FILE).exists()


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


# --------------------------------------------------------------------------------------------- write errors
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_failed_and_killed_writes_keep_the_last_checkpoint_and_the_next_run_resumes(backend, tmp_path, recipe,
                                                                                    hooks, recipe_reference):
    _need(backend)
    ref = recipe_reference(backend)
    out = tmp_path / "out"
    save = "torch:save" if backend == "pt" else "safetensors.numpy:save_file"  # a file of every save
    # A full disk while checkpoint-8 is written: one line, checkpoint-4 stays the newest, no torn folder.
    failed = _clm(recipe(backend, out), hooks, HOOK_FAIL_WRITE=f"{save}:checkpoint-8")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert _last_line(failed) == (f"clm: error: saving checkpoint-8 failed: No space left on device "
                                  f"({out / 'checkpoint-8'}); free space or fix the permissions there, then run "
                                  f"the same command again to resume from {out / 'checkpoint-4'}")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "clm_run.json"]
    # Resumed, it is killed (SIGKILL) in the middle of writing checkpoint-12, after checkpoint-8 was complete.
    # PyTorch writes checkpoint-12/ in place (trainer_state.json last); TensorFlow fills a hidden
    # .checkpoint-12.tmp/ and renames it: either way a torn save, which is never a resume point.
    killed = _clm(recipe(backend, out), hooks, HOOK_KILL_WRITE=f"{save}:checkpoint-12")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "Resuming from" in killed.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    torn = out / ("checkpoint-12" if backend == "pt" else ".checkpoint-12.tmp")
    assert torn.is_dir() and not is_complete(torn) and not (out / "all_results.json").exists()
    # Resumed from checkpoint-8, it then fails to save the final model: the checkpoint of the last step is the
    # resume point.
    failed = _clm(recipe(backend, out), hooks, HOOK_FAIL_WRITE=f"{save}:.final-save.tmp")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-8'}" in failed.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]  # the torn save is cleared
    assert _last_line(failed).startswith(f"clm: error: saving the model failed: No space left on device ({out}); ")
    assert _last_line(failed).endswith(f"resume from {out / 'checkpoint-24'}")
    assert not (out / "all_results.json").exists() and not (out / "model.safetensors").exists()
    # With space again the same command ends where an uninterrupted run ends.
    _ok(recipe(backend, out))
    _assert_same_run(out, ref)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.5 MiB filesystem (tmpfs; needs root), for writes that fail the way a full disk fails them: the
    recipe's checkpoints are about 0.6 MB each, so the third one does not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_a_really_full_disk_keeps_the_last_checkpoint(backend, recipe, small_disk, recipe_reference):
    """Each library reports a full disk its own way (torch: "unexpected pos", TensorFlow: ResourceExhausted)."""
    _need(backend)
    out = small_disk / "out"
    failed = _clm(recipe(backend, out))
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = _last_line(failed)
    assert last.startswith("clm: error: saving checkpoint-") and "failed: No space left on device" in last
    newest = latest_checkpoint(out)
    assert newest is not None and last.endswith(f"resume from {newest}")
    assert not [p for p in out.iterdir() if p.name.startswith(".") or
                (p.name.startswith("checkpoint-") and not is_complete(p))]  # no torn or temporary folder
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)  # space again
    resumed = _ok(recipe(backend, out))
    assert f"Resuming from {newest}" in resumed.stderr
    _assert_same_run(out, recipe_reference(backend))


# --------------------------------------------------------------------------------------------- streaming
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_streaming_run_killed_and_resumed_equals_uninterrupted(backend, tmp_path, recipe, recipe_reference):
    _need(backend)
    streaming = ("--streaming", "--eval_samples", "10")
    ref = recipe_reference(backend, *streaming)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "clm", *recipe(backend, out, *streaming)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT
    while len(list_checkpoints(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "all_results.json").exists()
    assert (out / lock.LOCK_FILE).exists()  # left by the killed run: it must not block the next one
    resumed = _ok(recipe(backend, out, *streaming))
    assert "Resuming from" in resumed.stderr
    _assert_same_run(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pt", "tf"])
def test_no_hub_token_on_disk(backend, recipe_reference):
    """The reference run had HF_TOKEN in its environment (and did not print it): no file it wrote holds it."""
    _need(backend)
    for path in recipe_reference(backend).rglob("*"):
        if path.is_file():
            assert PLANTED_TOKEN.encode() not in path.read_bytes(), path
