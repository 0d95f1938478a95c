"""Shared fixtures: no network, an isolated prepared-data cache, tiny data and models written per test."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# all_results.json keys DESIGN.md names, and the rest that both backends report (clm.backends.base.train_metrics)
DESIGN_KEYS = {"train_loss", "eval_loss", "perplexity", "eval_loss_before", "perplexity_before",
               "train_runtime", "world_size"}
METRIC_KEYS = DESIGN_KEYS | {"train_steps", "epoch", "train_samples", "train_tokens_per_second",
                             "train_tokens_per_second_per_process", "eval_samples", "global_batch_size",
                             "resumed_from", "trainable_parameters", "total_parameters"}


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    """Session-wide, so module-scoped fixtures (which run before function-scoped ones) are covered too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("CLM_CACHE", str(tmp_path_factory.getbasetemp() / "clm-cache"))
        mp.delenv("CLM_BACKEND", raising=False)
        # In-process tests run both backends in one process: transformers must be imported with TensorFlow in
        # view before a pt run imports it with PyTorch alone (clm.backends.load_only), as a pt CLI process does.
        import importlib.util

        if importlib.util.find_spec("tensorflow") is not None:
            import transformers  # noqa: F401
        yield


def eli5_rows(n: int, layout: str = "eli5_category", words: int = 40) -> list[dict]:
    """Rows in an ELI5 layout with varied, deterministic text."""
    vocab = ("light energy atoms stars water cells heat pressure gravity waves electrons planets "
             "molecules sound ice carbon oxygen magnet orbit mass").split()
    rows = []
    for i in range(n):
        answers = [" ".join(vocab[(i * 7 + j * 3 + k) % len(vocab)] for k in range(words)) + "."
                   for j in range(2 + i % 2)]
        sub = {"a_id": [f"a{i}{j}" for j in range(len(answers))], "text": answers,
               "score": [5 - j for j in range(len(answers))]}
        if layout == "eli5_category":
            sub["text_urls"] = [[] for _ in answers]
        rows.append({"q_id": f"q{i}", "title": f"Question {i}?", "selftext": "", "answers": sub})
    return rows


def guide_group_texts(examples, block_size=128):
    """Verbatim from the Hugging Face causal language modeling guide."""
    concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    if total_length >= block_size:
        total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's tokenizer from the packaged BPE files (the offline default)."""
    from clm.defaults import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture
def eli5_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "my_eli5.jsonl", eli5_rows(40))


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A prepared-data cache for this test alone (cache reuse and invalidation are asserted)."""
    monkeypatch.setenv("CLM_CACHE", str(tmp_path / "cache"))


def small_bpe_tokenizer():
    """GPT-2's kind of tokenizer (byte-level BPE, "<|endoftext|>" as BOS/EOS/UNK, no pad token) with 384 tokens
    instead of 50,257, trained on the test data's words: every text round-trips, and a model's output layer is
    130x smaller. For runs whose checks do not depend on the vocabulary (resume, faults, pushes, schedules)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for row in eli5_rows(20) for text in row["answers"]["text"]]
    texts.append("Why is the sky blue? Why do stars shine? How do magnets work? Question 1?")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(  # deterministic: the same file in every process
        vocab_size=SMALL_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1024)


SMALL_VOCAB = 384


def save_tiny_gpt2(out: Path, small_vocab: bool = False, **config_overrides) -> Path:
    """A tiny GPT-2 (random weights from seed 0) saved by PyTorch as safetensors, with GPT-2's tokenizer, or with
    small_bpe_tokenizer() where the vocabulary does not matter."""
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    from clm.defaults import gpt2_tokenizer, tiny_gpt2_config

    tokenizer = small_bpe_tokenizer() if small_vocab else gpt2_tokenizer()
    torch.manual_seed(0)
    config = tiny_gpt2_config(**{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128,
                                 **({"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id} if small_vocab else {}),
                                 **config_overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny GPT-2 with GPT-2's own tokenizer: for checks about that tokenizer or a 50k-token output layer."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """Tiny GPT-2 with the 384-token BPE tokenizer (small_bpe_tokenizer)."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("small-gpt2"), small_vocab=True)


def recipe_config(**kw):
    """The TrainConfig the in-process training tests share: 32-token blocks, batches of 4 (eval 6), no reports;
    each test names what it changes."""
    from clm.config import TrainConfig

    base = dict(block_size=32, per_device_train_batch_size=4, per_device_eval_batch_size=6, learning_rate=1e-3,
                report_to="none", logging_steps=2, seed=11)
    return TrainConfig(**{**base, **{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}})


def pt5_python() -> str:
    """An interpreter with PyTorch on transformers 5.x: $CLM_PT5_PYTHON, else the repo's .venv."""
    return os.environ.get("CLM_PT5_PYTHON") or str(ROOT / ".venv" / "bin" / "python")


def run_in_pt5(script: str, *args: str) -> dict:
    """``script`` in the transformers-5 interpreter; its last stdout line, parsed as JSON (which must hold the
    interpreter's transformers "version")."""
    python = pt5_python()
    if not Path(python).exists():
        pytest.skip(f"no PyTorch/transformers-5 interpreter at {python} (set CLM_PT5_PYTHON)")
    proc = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if int(got["version"].split(".")[0]) < 5:
        pytest.skip(f"{python} has transformers {got['version']}, not 5.x")
    return got


def clm_main(*argv: str) -> tuple[int, str]:
    """``clm.cli.main(ARGV)`` in this process (a run with no signal, kill or launcher in it): its exit code and
    what it printed to stdout."""
    import contextlib
    import io

    from clm.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(list(argv))
    return code, stdout.getvalue()


def run_clm(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m clm ARGS`` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "clm", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full_env, timeout=timeout)


# --------------------------------------------------------------------------------------------- test scope
# CI runs the suite twice: in .venv (transformers 5.x, PyTorch) everything runs and TensorFlow tests skip; in
# .venv-tf (transformers 4.57) only what that environment adds: tests marked `tf` (a backend param "tf" marks
# itself) and PyTorch tests marked `compat` that must also hold on transformers 4.x. Framework-free tests run
# once, and so do compat-module tests marked `latest_only`. CLM_TEST_SCOPE=tf selects that second set, and
# CLM_TEST_SCOPE=keras the tests marked `keras` (the keras backend, in .venv-keras, which has no torch); unset,
# everything is collected.
def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "tf":
            item.add_marker(pytest.mark.tf)
    scope = os.environ.get("CLM_TEST_SCOPE")
    if scope not in ("tf", "keras"):
        return
    if scope == "keras":  # .venv-keras (no torch): the keras backend's own tests
        keep = [i for i in items if i.get_closest_marker("keras")]
    else:
        keep = [i for i in items if (i.get_closest_marker("tf") or i.get_closest_marker("compat"))
                and not i.get_closest_marker("latest_only")]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def recipe_args(model_dir: Path, data: Path, backend: str, out: Path, *extra: str) -> list[str]:
    """The 24-step run the resume, preemption and multi-process tests stop and resume: a checkpoint every 4 steps,
    and no sample generations at each evaluation (these runs test training, and TF's eager generate is slow). On
    TensorFlow without XLA: compiling the steps is a third of such a short run's CPU time, and what these runs
    check does not depend on it (test_tf_backend resumes an XLA run exactly, in process)."""
    return ["--backend", backend, "--model_name_or_path", str(model_dir), "--train_file", str(data),
            "--output_dir", str(out), "--block_size", "32", "--per_device_train_batch_size", "4",
            "--max_steps", "24", "--save_steps", "4", "--learning_rate", "1e-3", "--seed", "7",
            "--report_to", "none", "--logging_steps", "4", "--sample_max_new_tokens", "0",
            *(["--no_jit_compile"] if backend == "tf" else []), *extra]


PLANTED_TOKEN = "hf_plantedTokenDoNotLeak1234567890"  # in the reference runs' environment; must land nowhere
DETERMINISTIC = {"TF_DETERMINISTIC_OPS": "1"}  # bit-identical TF kernels, so runs compare to 1e-6


@pytest.fixture(scope="session")
def recipe_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("recipe") / "d.jsonl", eli5_rows(60))


@pytest.fixture(scope="session")
def recipe(recipe_data, small_model_dir):
    """recipe(backend, out, *extra): recipe_args on the small-vocabulary model (the vocabulary plays no part in
    what these runs check)."""
    return functools.partial(recipe_args, small_model_dir, recipe_data)


@pytest.fixture(scope="session")
def recipe_reference(tmp_path_factory, recipe):
    """recipe(backend, ...) run uninterrupted, once per backend and extra flags for the whole session, with a Hub
    token in its environment that must not show in its output; every interrupted run is compared with it."""
    cache = {}

    def get(backend: str, *extra: str) -> Path:
        if (backend, extra) not in cache:
            out = tmp_path_factory.mktemp("ref") / f"ref-{backend}"
            proc = run_clm(*recipe(backend, out, *extra), env={**DETERMINISTIC, "HF_TOKEN": PLANTED_TOKEN})
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert PLANTED_TOKEN not in proc.stdout + proc.stderr
            cache[backend, extra] = out
        return cache[backend, extra]
    return get


# --------------------------------------------------------------------------------------------- two processes
@pytest.fixture(scope="session")
def no_dropout_model(tmp_path_factory) -> Path:
    """The small model without dropout: one process and two then draw no random masks to differ in."""
    return save_tiny_gpt2(tmp_path_factory.mktemp("nodrop"), small_vocab=True, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)


MULTI_PROCESS = ("--learning_rate", "5e-3")  # the two-process recipe: the loss drops > 1 nat, far beyond 1e-3


def launch_two(backend: str, argv: list[str], script: Path | None = None, timeout: int = 600,
               **env: str) -> tuple[list[int], list[str]]:
    """``clm ARGV`` (or ``script ARGV``) as two processes on loopback: torchrun --nproc_per_node 2 for pt (one
    exit code and torchrun's stderr), two TF_CONFIG workers under --tf_strategy multi_worker for tf (each
    worker's exit code and stderr)."""
    entry = [str(script)] if script else ["-m", "clm"]
    if backend == "pt":
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        if torchrun is None:
            pytest.skip("torchrun not installed")
        proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]), *entry,
                               *argv], cwd=ROOT, env={**os.environ, **DETERMINISTIC, "OMP_NUM_THREADS": "1", **env},
                              capture_output=True, text=True, timeout=timeout)
        return [proc.returncode], [proc.stderr]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = [subprocess.Popen([sys.executable, *entry, *argv, "--tf_strategy", "multi_worker"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **DETERMINISTIC, "TF_NUM_INTRAOP_THREADS": "1",
                                     "TF_NUM_INTEROP_THREADS": "1", **env,
                                     "TF_CONFIG": json.dumps({"cluster": cluster,
                                                              "task": {"type": "worker", "index": i}})})
               for i in range(2)]
    errs = [w.communicate(timeout=timeout)[1] for w in workers]
    return [w.returncode for w in workers], errs


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory, recipe_data, no_dropout_model):
    """The two-process recipe (no dropout, MULTI_PROCESS) run uninterrupted, once per backend for the session,
    preparing its data itself (a cache of its own): test_distributed compares one process with it, and the
    multi-process preemption tests resume to it. Returns the output dir and the (first) stderr."""
    cache = {}

    def get(backend: str) -> tuple[Path, str]:
        if backend not in cache:
            tmp = tmp_path_factory.mktemp(f"two-{backend}")
            args = recipe_args(no_dropout_model, recipe_data, backend, tmp / "out", *MULTI_PROCESS)
            codes, errs = launch_two(backend, args, CLM_CACHE=str(tmp / "cache"))
            assert set(codes) == {0}, "\n".join(e[-3000:] for e in errs)
            cache[backend] = tmp / "out", errs[0]
        return cache[backend]
    return get


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (for torchrun's master and TF_CONFIG workers)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
