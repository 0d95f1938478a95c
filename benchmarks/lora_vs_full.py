"""Full fine-tuning against LoRA on the same model: peak memory and step time, side by side, in one run.

    python benchmarks/lora_vs_full.py                    # PyTorch, a deeper tiny GPT-2 on CPU (or the GPU)
    .venv-tf/bin/python benchmarks/lora_vs_full.py --backend tf

Each mode trains in its own process (``clm.train``, the same path as the CLI) from one saved random model, on
the bundled sample, so one mode's memory cannot hide in the other's. Memory is the peak the training adds
over the process after start-up (peak RSS on CPU; ``torch.cuda.max_memory_allocated`` on a GPU with
PyTorch). Step time is the run's ``train_runtime`` over its steps (the first step's set-up included, the same
for both modes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_model(args: argparse.Namespace, out: Path) -> None:
    """A deeper tiny GPT-2 (random weights), saved by PyTorch, with the packaged GPT-2 tokenizer."""
    from clm.defaults import gpt2_tokenizer, tiny_gpt2_config

    config = tiny_gpt2_config(n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64,
                              n_positions=args.block_size)
    if args.backend == "tf":
        from clm.backends.tf.runtime import keras
        from clm.backends.tf.weights import save_pretrained
        from transformers import TFAutoModelForCausalLM

        keras.utils.set_random_seed(0)
        model = TFAutoModelForCausalLM.from_config(config)
        model.build_in_name_scope()
        save_pretrained(model, gpt2_tokenizer(), out)
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        gpt2_tokenizer().save_pretrained(out)


def child(args: argparse.Namespace) -> None:
    """One training run; prints its figures as JSON on the last line."""
    import clm  # noqa: F401
    from clm.backends import get_backend

    get_backend(args.backend)  # the framework imported before the baseline is taken
    cuda = False
    if args.backend == "pt":
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    from clm.config import TrainConfig

    config = TrainConfig(
        backend=args.backend, model_name_or_path=args.model, output_dir=args.out, block_size=args.block_size,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=args.steps, logging_steps=args.steps, learning_rate=2e-4, report_to="none", test_size=0.05,
        lora_r=args.lora_r if args.mode == "lora" else 0, lora_alpha=2 * args.lora_r,
        gradient_checkpointing=args.gradient_checkpointing)
    base = rss_mb()
    began = time.perf_counter()
    metrics = clm.train(config)
    wall = time.perf_counter() - began
    history = json.loads((Path(args.out) / "all_results.json").read_text())
    peak = (torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mb() - base
    print(json.dumps({"mode": args.mode, "peak_mb": peak, "memory": "cuda allocated" if cuda else "RSS above start",
                      "runtime": metrics["train_runtime"], "steps": metrics["train_steps"], "wall": wall,
                      "trainable": history.get("trainable_parameters"), "total": history.get("total_parameters"),
                      "eval_loss": metrics["eval_loss"]}))


def run(args: argparse.Namespace, mode: str, model: Path, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--_child", mode, "--_model", str(model), "--_out", str(tmp / mode),
           *sys.argv[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CLM_CACHE": str(tmp / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["pt", "tf"], default="pt")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--_child", dest="mode", help=argparse.SUPPRESS)
    parser.add_argument("--_model", dest="model", help=argparse.SUPPRESS)
    parser.add_argument("--_out", dest="out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        save_model(args, tmp / "model")
        runs = {mode: run(args, mode, tmp / "model", tmp) for mode in ("full", "lora")}
    full, lora = runs["full"], runs["lora"]
    step = {m: r["runtime"] / r["steps"] for m, r in runs.items()}
    print(f"\n{args.backend}: GPT-2 config, {args.layers} layers x {args.hidden} hidden, block {args.block_size}, "
          f"batch {args.batch_size}, {args.steps} steps, LoRA r={args.lora_r} on PEFT's default targets"
          + (", gradient checkpointing" if args.gradient_checkpointing else ""))
    rows = [
        ("trainable parameters", f"{full['trainable']:,}", f"{lora['trainable']:,}",
         lora["trainable"] / full["trainable"]),
        ("total parameters", f"{full['total']:,}", f"{lora['total']:,}", lora["total"] / full["total"]),
        (f"peak memory, MB ({full['memory']})", f"{full['peak_mb']:.0f}", f"{lora['peak_mb']:.0f}",
         lora["peak_mb"] / full["peak_mb"]),
        ("time per step, s", f"{step['full']:.3f}", f"{step['lora']:.3f}", step["lora"] / step["full"]),
        ("eval loss after", f"{full['eval_loss']:.4f}", f"{lora['eval_loss']:.4f}", None),
    ]
    print(f"{'':38}{'full':>14}{'LoRA':>14}{'LoRA/full':>11}")
    for name, a, b, ratio in rows:
        print(f"{name:38}{a:>14}{b:>14}{'' if ratio is None else f'{ratio:.3f}x':>11}")


if __name__ == "__main__":
    main()
