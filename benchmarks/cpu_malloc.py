"""CPU training with glibc's default malloc settings against settings that keep freed memory for reuse.

    python benchmarks/cpu_malloc.py                         # PyTorch, the built-in tiny GPT-2, 3 rounds
    .venv-tf/bin/python benchmarks/cpu_malloc.py --backend tf

A 50,257-token vocabulary makes each step's logits and their gradients hundreds of MB. glibc serves blocks
that large with fresh mmap()s and returns them at free(), so every step faults in and zeroes new pages in the
kernel: system time. ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_`` (TUNED below) keep
them in the heap. Each setting trains in a fresh process through ``clm.train`` (tf_vs_pt_throughput's worker),
alternating, and the table gives steady tokens/s and the process's user and system CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tf_vs_pt_throughput import add_run_arguments, ratio_summary, run_worker, summary  # noqa: E402

TUNED = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
         "MALLOC_TOP_PAD_": "500000000"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["pt", "tf"], default="pt")
    add_run_arguments(p)
    args = p.parse_args()
    settings = {"glibc defaults": {}, "tuned": TUNED}
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="clm-bench-") as tmp:
        for rep in range(args.repeat):
            for name, env in settings.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                result = run_worker(sys.executable, "train", args.backend, None, args, Path(tmp),
                                    f"{name[:5]}-{rep}", extra_env=env)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                row = (result["steady"], after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
                rows[name].append(row)
                print(f"[{rep + 1}/{args.repeat}] {name:15s} steady {row[0]:8.1f} tokens/s  user {row[1]:6.1f} s  "
                      f"system {row[2]:6.1f} s", flush=True)
    print(f"\n{args.backend}: model {args.model or 'built-in tiny GPT-2'}, batch {args.batch_size} x "
          f"{args.block_size}, {args.warmup} + {args.steps} steps per process, {args.repeat} rounds, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':16s}{'steady tokens/s: median (range)':38s}{'user s':>8s}{'system s':>10s}   tokens/s ratio per round")
    base = [r[0] for r in rows["glibc defaults"]]
    for name, values in rows.items():
        rates = [r[0] for r in values]
        ratio = "" if name == "glibc defaults" else ratio_summary([t / b for t, b in zip(rates, base)])
        user = sorted(r[1] for r in values)[len(values) // 2]
        system = sorted(r[2] for r in values)[len(values) // 2]
        print(f"{name:16s}{summary(rates):38s}{user:8.1f}{system:10.1f}   {ratio}")


if __name__ == "__main__":
    main()
