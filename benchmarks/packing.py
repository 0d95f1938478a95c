"""Packing and loss masks on Q&A data: the bundled ELI5 sample as prompt/completion (title -> answers), on both
backends, side by side.

    python benchmarks/packing.py                      # .venv for PyTorch, .venv-tf for TensorFlow
    python benchmarks/packing.py --repeat 3 --steps 12 --loss_steps 80

Three tables:
1. Padding: the share of each packing's rows that is padding (bfd against none; wrapped has none), from the
   data layer alone.
2. Speed: non-padding tokens per second while training, for wrapped, bfd and none on each backend. Each run is a
   fresh process through ``clm.train`` (``--warmup`` steps, then ``--steps`` timed ones, as
   tf_vs_pt_throughput.py times them); tokens/s counts every token of a row, times (1 - padding fraction).
   Configurations alternate within each round; the median over rounds is shown.
3. Loss masks: after ``--loss_steps`` steps from the same start, the eval loss on the answer tokens of the
   held-out questions, training with --completion_only_loss (the default) and with --no_completion_only_loss
   (the second model is scored on the answer tokens with ``clm.evaluate``).
The model is clm's built-in GPT-2 (random start, GPT-2's 50,257-token vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
MARK = "CLM_PACKING_RESULT "
QA = {"prompt_column": "title", "completion_column": "answers.text"}
PACKINGS = ("wrapped", "bfd", "none")


def padding_fractions(block_size: int) -> dict[str, float]:
    """Each packing's padding share of the train split's rows."""
    import clm
    from clm.data.examples import PROMPT_COMPLETION, tokenize_examples
    from clm.data.packing import pack_group
    from clm.data.rows import split
    from clm.data.source import load_raw

    config = clm.TrainConfig(**QA, block_size=block_size)
    tokenizer = clm.load_tokenizer(config)
    train = tokenize_examples(split(load_raw(config), config.test_size, config.split_seed)["train"],
                              PROMPT_COMPLETION, tokenizer, config)
    lengths = [len(ids) for ids in train["input_ids"]]
    import numpy as np

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.zeros(int(offsets[-1]), dtype=np.int32)
    out = {"wrapped": 0.0}
    for mode in ("bfd", "none"):
        out[mode] = pack_group(ids, None, offsets, block_size, mode, 0)[1].padding_fraction
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One training run (and, for the loss table, its answer-token eval loss)."""
    import clm
    from tf_vs_pt_throughput import _install_clock

    clock = _install_clock(args.backend)
    steps = args.loss_steps if args.kind == "loss" else args.warmup + args.steps
    extra = {"completion_only_loss": False} if args.kind == "loss" and args.mask == "off" else {}
    config = clm.TrainConfig(backend=args.backend, output_dir=args.output_dir, max_steps=steps, **QA,
                             packing=args.packing, block_size=args.block_size, seed=0, report_to="none",
                             per_device_train_batch_size=args.batch_size, save_steps=10 ** 9,
                             sample_max_new_tokens=0, overwrite_output_dir=True, **extra)
    metrics = clm.train(config)
    if args.kind == "speed":
        return {"tokens_per_second": clock.rate(args.warmup, metrics["global_batch_size"] * args.block_size)}
    answers = clm.evaluate(config.replace(model_name_or_path=args.output_dir, completion_only_loss=None,
                                          output_dir=str(Path(args.output_dir) / "eval")))
    return {"answer_eval_loss": answers["eval_loss"], "eval_loss_reported": metrics["eval_loss"],
            "loss_tokens": metrics["loss_tokens"]}


def run(python: str, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [python, __file__, "--worker", "--output_dir", tmp]
        shared = {k: getattr(args, k) for k in ("block_size", "batch_size", "warmup", "steps", "loss_steps")}
        for key, value in {**shared, **kw}.items():
            argv += [f"--{key}", str(value)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if proc.returncode or not lines:
            raise SystemExit(f"worker {kw} failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][len(MARK):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss_steps", type=int, default=60)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=["pt", "tf"])
    p.add_argument("--pt_python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--tf_python", default=str(ROOT / ".venv-tf" / "bin" / "python"))
    # worker-only
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--packing", help=argparse.SUPPRESS)
    p.add_argument("--mask", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(args)), flush=True)
        return

    python = {"pt": args.pt_python, "tf": args.tf_python}
    padding = padding_fractions(args.block_size)
    print(f"## Padding (train split, {args.block_size}-token rows)\n")
    print("| packing | padding |\n| --- | --- |")
    for mode in PACKINGS:
        print(f"| {mode} | {padding[mode]:.1%} |")
    print(f"\nbfd / none padding: {padding['bfd'] / padding['none']:.2f}x", flush=True)

    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeat):
        for backend in args.backends:
            for mode in PACKINGS:
                got = run(python[backend], args, backend=backend, kind="speed", packing=mode)
                rates.setdefault((backend, mode), []).append(got["tokens_per_second"] * (1 - padding[mode]))
    print(f"\n## Non-padding tokens/s while training ({args.batch_size} x {args.block_size} tokens per step, "
          f"median of {args.repeat})\n")
    print("| backend | wrapped | bfd | none | bfd / none |\n| --- | --- | --- | --- | --- |")
    for backend in args.backends:
        med = {mode: statistics.median(rates[(backend, mode)]) for mode in PACKINGS}
        print(f"| {backend} | {med['wrapped']:.0f} | {med['bfd']:.0f} | {med['none']:.0f} | "
              f"{med['bfd'] / med['none']:.2f}x |", flush=True)

    print(f"\n## Answer-token eval loss after {args.loss_steps} steps (bfd)\n")
    print("| backend | completion-only loss | loss on every token |\n| --- | --- | --- |")
    for backend in args.backends:
        on = run(python[backend], args, backend=backend, kind="loss", packing="bfd", mask="on")
        off = run(python[backend], args, backend=backend, kind="loss", packing="bfd", mask="off")
        print(f"| {backend} | {on['answer_eval_loss']:.4f} | {off['answer_eval_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
