"""Training throughput of the TensorFlow backend against the PyTorch backend, on the same model and data.

    python benchmarks/tf_vs_pt_throughput.py                       # the offline default model, bundled sample
    python benchmarks/tf_vs_pt_throughput.py --steps 10 40 --block_size 64
    python benchmarks/tf_vs_pt_throughput.py --pt_python .venv/bin/python --tf_python .venv-tf/bin/python

Each configuration (pt; tf; tf with --jit_compile) trains in a fresh process through ``clm.train`` (the real
backends: data, eval, checkpoint and all) for a short and a long run. "end to end" is the long run's own
train_tokens_per_second, which includes start-up costs (tracing, XLA compilation, the end-of-run eval and save);
"steady" divides the extra tokens of the long run by its extra time, which cancels them. Run it with the TF
environment (it has both frameworks) or name an interpreter per framework.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "CLM_BENCH_RESULT "


def worker(args: argparse.Namespace) -> None:
    import clm

    config = clm.TrainConfig(backend=args.worker, model_name_or_path=args.model, output_dir=args.output_dir,
                             max_steps=args.worker_steps, block_size=args.block_size,
                             per_device_train_batch_size=args.batch_size, jit_compile=args.jit, report_to="none",
                             logging_steps=max(1, args.worker_steps), seed=0)
    metrics = clm.train(config)
    print(MARK + json.dumps({k: metrics[k] for k in ("train_runtime", "train_steps", "global_batch_size")}))


def run_one(python: str, backend: str, jit: bool, steps: int, args: argparse.Namespace, tmp: Path,
            rep: int) -> dict:
    out = tmp / f"{backend}-{'xla' if jit else 'nojit'}-{steps}-{rep}"
    cmd = [python, str(Path(__file__).resolve()), "--worker", backend, "--worker_steps", str(steps),
           "--output_dir", str(out), "--block_size", str(args.block_size), "--batch_size", str(args.batch_size)]
    cmd += ["--jit"] if jit else []
    cmd += ["--model", args.model] if args.model else []
    env = {**os.environ, "CLM_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        sys.exit(f"{backend} (jit={jit}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len(MARK):])
    result["tokens"] = result["train_steps"] * result["global_batch_size"] * args.block_size
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs=2, default=[5, 20], metavar=("SHORT", "LONG"),
                   help="optimizer steps of the short and the long run")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--repeat", type=int, default=1, help="rounds over all configurations; the best is kept")
    p.add_argument("--model", default=None, help="model directory (default: the built-in tiny GPT-2)")
    p.add_argument("--pt_python", default=os.environ.get("CLM_PT_PYTHON", sys.executable))
    p.add_argument("--tf_python", default=os.environ.get("CLM_TF_PYTHON", sys.executable))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    p.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    short, long = args.steps
    configs = (("pt", args.pt_python, "pt", False), ("tf", args.tf_python, "tf", False),
               ("tf --jit_compile", args.tf_python, "tf", True))
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="clm-bench-") as tmp:
        for rep in range(args.repeat):  # interleaved, best of: a busy machine slows every configuration alike
            for name, python, backend, jit in configs:
                a, b = (run_one(python, backend, jit, steps, args, Path(tmp), rep) for steps in (short, long))
                row = {"end_to_end": b["tokens"] / b["train_runtime"],
                       "steady": (b["tokens"] - a["tokens"]) / (b["train_runtime"] - a["train_runtime"])}
                print(f"[{rep + 1}/{args.repeat}] {name:17s} end to end {row['end_to_end']:9.1f} tokens/s   "
                      f"steady {row['steady']:9.1f} tokens/s", flush=True)
                best = rows.setdefault(name, row)
                rows[name] = {k: max(best[k], row[k]) for k in row}
    print(f"\nmodel {args.model or 'built-in tiny GPT-2'}, block {args.block_size}, batch {args.batch_size}, "
          f"steps {short} and {long}, best of {args.repeat}")
    for name in rows:
        print(f"{name:17s} end to end {rows[name]['end_to_end']:9.1f} tokens/s   steady "
              f"{rows[name]['steady']:9.1f} tokens/s")
    for name in ("tf", "tf --jit_compile"):
        print(f"TF/PT ratio, {name:17s}: end to end {rows[name]['end_to_end'] / rows['pt']['end_to_end']:.2f}, "
              f"steady {rows[name]['steady'] / rows['pt']['steady']:.2f}")


if __name__ == "__main__":
    main()
