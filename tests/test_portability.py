"""One model folder, every backend: what PyTorch saves on transformers 5, PyTorch on 4.57 and TensorFlow save,
and a folder transformers 5 saves on its own, each scores the same, generates the same greedy tokens and trains
further on every backend (pt on 5.x in a subprocess of .venv, pt on 4.57 and tf in this process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")
pytestmark = pytest.mark.tf

import clm  # noqa: E402

from conftest import clm_main, eli5_rows, recipe_config, run_in_pt5, write_jsonl  # noqa: E402

PROMPT = "Why is the sky blue?"
GREEDY = ["--no_do_sample", "--max_new_tokens", "8", "--seed", "0", "--prompt", PROMPT]
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"

# Jobs for the transformers-5 interpreter: {"key": {"kind": ..., ...}}; prints {"version", "results"}.
PT5_JOBS = r"""
import contextlib, io, json, sys
import transformers
import clm
from clm.cli import main
from clm.config import TrainConfig

results = {}
for key, job in json.loads(sys.argv[1]).items():
    kind = job.pop("kind")
    if kind == "train":
        results[key] = {k: v for k, v in clm.train(TrainConfig(**job)).items() if k.startswith("eval_loss")}
    elif kind == "evaluate":
        results[key] = clm.evaluate(TrainConfig(**job))["eval_loss"]
    elif kind == "generate":
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["generate", "--backend", "pt", "--model_name_or_path", job["model"], *job["args"]]) == 0
        results[key] = out.getvalue()
    elif kind == "save_raw":  # transformers 5's own save, no clm in it: tokenizer_class TokenizersBackend
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["src"])
        tokenizer.chat_template = job["chat_template"]
        tokenizer.save_pretrained(job["dst"])
        transformers.AutoModelForCausalLM.from_pretrained(job["src"]).save_pretrained(job["dst"])
        results[key] = json.load(open(job["dst"] + "/tokenizer_config.json"))["tokenizer_class"]
print(json.dumps({"version": transformers.__version__, "results": results}))
"""


def _config(model, data: Path, out: Path, backend: str, train: bool = False):
    """The shared recipe, TF without XLA (nothing here depends on it); to train: two steps, no samples."""
    steps = {"max_steps": 2, "sample_max_new_tokens": 0} if train else {}
    return recipe_config(model_name_or_path=model, train_file=data, output_dir=out, backend=backend,
                         jit_compile=False, **steps)


def _generate(backend: str, model: Path) -> str:
    code, printed = clm_main("generate", "--backend", backend, "--model_name_or_path", str(model), *GREEDY)
    assert code == 0
    return printed


@pytest.fixture(scope="module")
def matrix(tiny_model_dir, tmp_path_factory):
    """Folders: A = the README's main job (built-in model, GPT-2's tokenizer) on pt/transformers 5, B = pt on
    4.57 and C = tf from the tiny GPT-2, D = that model saved by transformers 5 alone (with a chat template).
    Each is evaluated and generated from on pt5, pt4 (4.57) and tf, and fine-tuned on the backends it was not
    made with. Returns ({(folder, env): eval loss}, {(folder, env): text}, {(folder, env): fine-tune metrics})."""
    tmp = tmp_path_factory.mktemp("portability")
    data = write_jsonl(tmp / "d.jsonl", eli5_rows(16))
    folders = {name: tmp / name for name in "ABCD"}
    made_on = {"A": "pt5", "B": "pt4", "C": "tf", "D": "pt5"}
    clm.train(_config(tiny_model_dir, data, folders["B"], "pt", train=True))
    clm.train(_config(tiny_model_dir, data, folders["C"], "tf", train=True))
    # One transformers-5 process makes A and D, then scores, generates from and fine-tunes every folder.
    jobs = {"A": {"kind": "train", **_config(None, data, folders["A"], "pt", train=True).to_dict()},
            "D": {"kind": "save_raw", "src": str(tiny_model_dir), "dst": str(folders["D"]),
                  "chat_template": CHAT_TEMPLATE}}
    for name, folder in folders.items():
        jobs[f"eval-{name}"] = {"kind": "evaluate", **_config(folder, data, tmp / f"eval-{name}-pt5", "pt").to_dict()}
        jobs[f"gen-{name}"] = {"kind": "generate", "model": str(folder), "args": GREEDY}
        if made_on[name] != "pt5":
            jobs[f"tune-{name}"] = {"kind": "train", **_config(folder, data, tmp / f"tune-{name}-pt5", "pt",
                                                                  train=True).to_dict()}
    got = run_in_pt5(PT5_JOBS, json.dumps(jobs))["results"]
    assert got["D"] == "TokenizersBackend"  # what 4.57 cannot import by name

    losses, texts, tuned = {}, {}, {}
    for name, folder in folders.items():
        losses[name, "pt5"] = got[f"eval-{name}"]
        texts[name, "pt5"] = got[f"gen-{name}"]
        if f"tune-{name}" in got:
            tuned[name, "pt5"] = got[f"tune-{name}"]
        for env, backend in (("pt4", "pt"), ("tf", "tf")):
            losses[name, env] = clm.evaluate(_config(folder, data, tmp / f"eval-{name}-{env}", backend))["eval_loss"]
            texts[name, env] = _generate(backend, folder)
            if made_on[name] != env:
                tuned[name, env] = clm.train(_config(folder, data, tmp / f"tune-{name}-{env}", backend, train=True))
    return losses, texts, tuned, folders


@pytest.mark.parametrize("folder", ["A", "B", "C", "D"])
def test_every_backend_scores_and_generates_the_same_from_each_folder(matrix, folder):
    losses, texts, _, _ = matrix
    pt5, pt4, tf = (losses[folder, env] for env in ("pt5", "pt4", "tf"))
    print(f"\n{folder}: eval loss pt5 {pt5:.6f} pt4 {pt4:.6f} tf {tf:.6f}; {texts[folder, 'pt5']!r}")
    assert pt4 == pytest.approx(pt5, rel=1e-3) and tf == pytest.approx(pt5, rel=1e-3)
    assert texts[folder, "pt5"].startswith(PROMPT) and len(texts[folder, "pt5"]) > len(PROMPT)
    assert texts[folder, "pt4"] == texts[folder, "pt5"] == texts[folder, "tf"]


@pytest.mark.parametrize("folder", ["A", "B", "C", "D"])
def test_each_folder_trains_further_on_the_other_backends(matrix, folder):
    """Fine-tuning (not a resume) starts from the folder's weights: its eval loss before is the folder's, and
    two steps lower it; what it saves is readable everywhere (no TokenizersBackend, generation settings that
    agree)."""
    losses, _, tuned, folders = matrix
    runs = {env: metrics for (name, env), metrics in tuned.items() if name == folder}
    assert len(runs) == 2
    for env, metrics in runs.items():
        assert metrics["eval_loss_before"] == pytest.approx(losses[folder, env], rel=1e-3), env
        assert metrics["eval_loss"] < metrics["eval_loss_before"], env
    tuned_dirs = [p.parent for p in folders["A"].parent.glob("tune-*/tokenizer_config.json")]
    assert len(tuned_dirs) == 8
    for folder_dir in [*tuned_dirs, folders["A"], folders["B"], folders["C"]]:
        saved = json.loads((folder_dir / "tokenizer_config.json").read_text())
        assert saved["tokenizer_class"] == "PreTrainedTokenizerFast", folder_dir
        # the model's own value, not the one transformers 5's Trainer sets for training
        assert json.loads((folder_dir / "config.json").read_text())["use_cache"] is True, folder_dir
        assert "_from_model_config" not in json.loads((folder_dir / "generation_config.json").read_text())


def test_a_folder_transformers_5_saved_loads_on_4_57_with_its_tokens_and_template(matrix):
    from clm.tokenizer import load_pretrained_tokenizer

    _, _, _, folders = matrix
    tokenizer = load_pretrained_tokenizer(str(folders["D"]))
    assert tokenizer.is_fast and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer(PROMPT)["input_ids"] == load_pretrained_tokenizer(str(folders["B"]))(PROMPT)["input_ids"]


def test_an_unreadable_tokenizer_file_gets_one_line_naming_it(tiny_model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    code, _ = clm_main("evaluate", "--backend", "tf", "--model_name_or_path", str(broken),
                       "--output_dir", str(tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "tokenizer.json" in err[0] and "could not read" in err[0]
