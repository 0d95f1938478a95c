"""Bad input: exit code 2, one or two lines naming the problem and the fix, no traceback, nothing written."""

from __future__ import annotations

import os

import pytest

from clm.cli import main

from conftest import eli5_rows, run_clm, write_jsonl


def fails(capsys, argv, message, out_dir=None):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("clm: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    if out_dir is not None:
        assert not os.path.exists(out_dir) or not os.listdir(out_dir), "something was written"
    return lines[0]


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


@pytest.fixture
def deny_access(monkeypatch):
    """Root reads everything, so unreadable/unwritable paths are simulated at os.access."""
    denied = set()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) in denied
                        else real(p, mode, **kw))
    return lambda path: denied.add(os.path.abspath(path))


def test_unknown_backend(capsys, out):
    fails(capsys, ["--backend", "jax", "--output_dir", out], "choose one of: pt, tf", out)


def test_framework_not_installed(capsys, monkeypatch, out):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else real(name, *a))
    fails(capsys, ["--backend", "tf", "--output_dir", out], "pip install 'clm[tf]'", out)


def test_missing_data_file(capsys, tmp_path, out):
    fails(capsys, ["--train_file", str(tmp_path / "nope.jsonl"), "--output_dir", out], "does not exist", out)


def test_unreadable_data_file(capsys, tmp_path, out, deny_access):
    path = write_jsonl(tmp_path / "d.jsonl", eli5_rows(5))
    deny_access(path)
    fails(capsys, ["--train_file", str(path), "--output_dir", out], "not readable", out)


def test_empty_data_file(capsys, tmp_path, out):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    fails(capsys, ["--train_file", str(path), "--output_dir", out], "is empty", out)


def test_corrupt_jsonl_names_the_line(capsys, tmp_path, out):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"\n')
    fails(capsys, ["--train_file", str(path), "--output_dir", out], "line 3 is not valid JSON", out)


def test_no_usable_text_column(capsys, tmp_path, out):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "id": i} for i in range(10)])
    fails(capsys, ["--train_file", str(path), "--output_dir", out], "columns found: question, id", out)


def test_fewer_tokens_than_one_block(capsys, tmp_path, out):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"} for _ in range(10)])
    fails(capsys, ["--train_file", str(path), "--output_dir", out], "fewer than one block", out)


def test_block_size_not_positive(capsys, out):
    fails(capsys, ["--block_size", "0", "--output_dir", out], "--block_size must be positive", out)


def test_block_size_above_the_models_positions_is_clamped(caplog):
    from clm.config import TrainConfig
    from clm.runner import fit_block_size

    assert fit_block_size(TrainConfig(block_size=4096)).block_size == 512
    assert "larger than the model's 512 positions" in caplog.text


@pytest.mark.parametrize("flag, value", [("--learning_rate", "-1"), ("--learning_rate", "0"),
                                         ("--num_train_epochs", "0"), ("--per_device_train_batch_size", "0")])
def test_non_positive_numbers(capsys, out, flag, value):
    fails(capsys, [flag, value, "--output_dir", out], f"{flag} must be positive", out)


def test_negative_dataloader_workers(capsys, out):
    fails(capsys, ["--dataloader_num_workers", "-1", "--output_dir", out], "--dataloader_num_workers must be >= 0",
          out)


@pytest.mark.parametrize("value", ["0", "1", "-0.1"])
def test_test_size_outside_0_1(capsys, out, value):
    fails(capsys, ["--test_size", value, "--output_dir", out], "--test_size must be between 0 and 1", out)


def test_missing_model_path(capsys, tmp_path, out):
    fails(capsys, ["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", out], "does not exist", out)


def test_unreadable_model_path(capsys, tmp_path, out, deny_access):
    model = tmp_path / "model"
    model.mkdir()
    deny_access(model)
    fails(capsys, ["--model_name_or_path", str(model), "--output_dir", out], "not readable", out)


def test_hub_unreachable_for_a_model_name(capsys, out):
    line = fails(capsys, ["--model_name_or_path", "someone/some-model", "--output_dir", out], "someone/some-model",
                 out)
    assert "HF_HUB_OFFLINE" in line and "local path" in line


def test_hub_unreachable_for_a_dataset_name(capsys, out):
    line = fails(capsys, ["--dataset_name", "eli5_category", "--output_dir", out], "eli5_category", out)
    assert "HF_HUB_OFFLINE" in line


def test_output_dir_is_a_file(capsys, tmp_path):
    path = tmp_path / "file"
    path.write_text("mine")
    fails(capsys, ["--output_dir", str(path)], "is a file")
    assert path.read_text() == "mine"


def test_output_dir_not_writable(capsys, tmp_path, deny_access):
    parent = tmp_path / "ro"
    parent.mkdir()
    deny_access(parent)
    fails(capsys, ["--output_dir", str(parent / "out")], "not writable")


def test_output_dir_holding_something_else_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    fails(capsys, ["--output_dir", str(out)], "not written by clm")
    fails(capsys, ["--output_dir", str(out), "--overwrite_output_dir"], "not written by clm")
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("argv, message", [
    (["--dataset_name", "x", "--train_file", "y.jsonl"], "use one data source"),
    (["--fp16", "--bf16"], "choose one precision"),
    (["--overwrite_output_dir", "--resume_from_checkpoint", "c"], "drop one"),
    (["--hub_model_id", "me/m"], "without --push_to_hub"),
])
def test_conflicting_flags(capsys, out, argv, message):
    fails(capsys, [*argv, "--output_dir", out], message, out)


def test_unknown_config_key_and_bad_generate_input(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\n")
    fails(capsys, ["--config", str(cfg)], "unknown settings: epochs")
    fails(capsys, ["generate", "--model_name_or_path", str(tmp_path / "none"), "--prompt", "hi"], "does not exist")


@pytest.mark.parametrize("argv, message", [
    (["--learning-rat", "1e-3"], "unknown flag --learning-rat; did you mean --learning_rate?"),
    (["train", "--learning_rat=1e-3"], "unknown flag --learning_rat; did you mean --learning_rate?"),
    (["evaluate", "--modle_name_or_path", "x"], "unknown flag --modle_name_or_path; did you mean "
                                                "--model_name_or_path?"),
    (["generate", "--model_name_or_path", "m", "--promt", "hi"], "unknown flag --promt; did you mean --prompt?"),
    (["generate", "--promt", "hi"], "did you mean --prompt?"),  # named before the missing required flags
    (["prepare", "--block-sise", "64"], "unknown flag --block-sise; did you mean --block_size?"),
    (["--zzz"], "unknown flag --zzz; see --help"),
    (["evalute"], "unknown command 'evalute'; did you mean evaluate?"),
])
def test_misspelt_flag_or_command_names_the_closest(capsys, out, argv, message):
    fails(capsys, [*argv, "--output_dir", out] if argv[0] != "evalute" else argv, message, out)


@pytest.mark.parametrize("argv, message", [
    (["--block_size", "abc"], "argument --block_size/--block-size: invalid int value: 'abc'"),
    (["--lr_scheduler_type", "cos"], "invalid choice: 'cos' (choose from 'linear', 'cosine', 'constant')"),
    (["--preset", "nope"], "invalid choice: 'nope' (choose from 'tiny', 'guide', 'eli5_qa')"),
    (["--config"], "argument --config: expected one argument"),
    (["generate", "--prompt", "hi"], "the following arguments are required: --model_name_or_path"),
    (["--output_dir", "o", "stray"], "unexpected argument 'stray'"),
])
def test_argparse_errors_are_one_line(capsys, argv, message):
    fails(capsys, argv, message)


def test_a_misspelt_flag_is_one_line_on_stderr_exit_2(tmp_path):
    proc = run_clm("--learning-rat", "1e-3", "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and not (tmp_path / "o").exists()
    assert proc.stderr.strip() == "clm: error: unknown flag --learning-rat; did you mean --learning_rate?"


def test_process_level_exit_code_and_debug_traceback(tmp_path):
    proc = run_clm("--test_size", "2", "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("clm: error: --test_size")
    debug = run_clm("--test_size", "2", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
