"""What a PyTorch run's process loads and prints: never TensorFlow (transformers 4.x imports it with any PyTorch
model when it is installed, TensorBoard's writer too), and none of transformers' warnings about how clm calls it.
One run in a subprocess, as a user's command runs, with the defaults' TensorBoard and sample generations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl

pytestmark = pytest.mark.compat  # transformers 4.57 (.venv-tf, TensorFlow installed) is where TF came along

SCRIPT = """
import json, sys
from clm.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit_code": code, "tensorflow": "tensorflow" in sys.modules}))
"""
NOISE = ("`gradient_checkpointing` is deprecated", "We strongly recommend passing in an `attention_mask`",
         "`loss_type=None` was set in the config")


@pytest.fixture(scope="module")
def pt_run(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("pt-run")
    # Each document is 31 tokens plus EOS: every 32-token block ends with EOS, which is also the pad id.
    words = "light energy atoms stars water cells heat pressure gravity waves".split()
    data = write_jsonl(tmp / "d.jsonl", [{"text": "The " + " ".join(words[(i + k) % 10] for k in range(30))}
                                        for i in range(40)])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--backend", "pt", "--model_name_or_path", str(tiny_model_dir),
         "--train_file", str(data), "--output_dir", str(tmp / "out"), "--block_size", "32", "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--sample_max_new_tokens", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_pytorch_run_never_imports_tensorflow(pt_run):
    result, _ = pt_run
    assert result == {"exit_code": 0, "tensorflow": False}


def test_a_pytorch_run_prints_no_transformers_warnings(pt_run):
    _, stderr = pt_run
    assert [line for line in stderr.splitlines() if any(noise in line for noise in NOISE)] == []
