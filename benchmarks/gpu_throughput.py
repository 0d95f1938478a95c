"""GPT-2 small (124 M parameters, built from its config: no download) trained by clm on each backend, in bf16:
tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/gpu_throughput.py                                  # both backends, on the GPU
    python benchmarks/gpu_throughput.py --backends pt --torch_compile --dataloader_num_workers 2
    python benchmarks/gpu_throughput.py --backends tf --no_jit_compile   # TensorFlow without XLA
    python benchmarks/gpu_throughput.py --smoke                          # a tiny GPT-2 on CPU: checks it runs

Each backend trains in a fresh process through ``clm.train`` (the real run) on synthetic text long enough for
``--warmup`` + ``--steps`` steps of ``--batch_size`` x ``--seq_len`` tokens; only the steps after the warm-up
are timed (``tf_vs_pt_throughput.StepClock``). With ``--repeat`` the backends alternate and the median is shown.

MFU = model FLOPs per second / the device's peak dense bf16 FLOPs. Model FLOPs per token (PaLM, appendix B):
6 N (forward and backward through every weight matrix; N counts all parameters but the position embeddings,
the tied token embedding once, as the output layer's matmul) + 12 L T d (attention scores and values, for
L layers, sequence T, width d). Peak figures: ``PEAK_BF16_TFLOPS`` (dense, no sparsity); ``--peak_tflops``
overrides. PyTorch options that matter on GPUs: SDPA attention (transformers' default where available, shown),
fused AdamW (the Trainer's default ``adamw_torch_fused``, shown), pinned memory (on with CUDA),
``--torch_compile`` and ``--dataloader_num_workers`` (clm flags). TensorFlow: XLA (clm's default; shown).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
for path in (str(ROOT), str(Path(__file__).resolve().parent)):
    if path not in sys.path:
        sys.path.insert(0, path)
MARK = "CLM_GPU_RESULT "

# Dense bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (SXM parts unless named).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,  # AWS's A10G (before A10: the names overlap)
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
}

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
GPT2_SMOKE = dict(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2)


def peak_tflops(device: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if name.lower() in device.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


def flops_per_token(n_params: int, n_layer: int, seq_len: int, n_embd: int) -> float:
    return 6.0 * n_params + 12.0 * n_layer * seq_len * n_embd


def write_corpus(path: Path, tokens: int, seed: int = 0) -> None:
    """Plain English-like text: about ``tokens`` GPT-2 tokens (one token per common word and space)."""
    words = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
             "have an they you were her she there been one all we their has would when if so no will can more "
             "time light energy water heat stars cells sound pressure because people could about other").split()
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(tokens // 400 + 1):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(400))}) + "\n")


# ------------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    from tf_vs_pt_throughput import _install_clock

    import clm
    from clm.defaults import tiny_gpt2_config

    shape = GPT2_SMOKE if args.smoke else GPT2_SMALL
    model_config = lambda **kw: tiny_gpt2_config(**{**shape, **kw})  # noqa: E731
    info: dict[str, Any] = {}
    if args.worker == "pt":
        import torch

        import clm.backends.pt.model as pt_model

        pt_model.tiny_gpt2_config = model_config
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    else:
        from clm.backends.tf.runtime import tf
        import clm.backends.tf.model as tf_model

        tf_model.tiny_gpt2_config = model_config
        gpus = tf.config.list_physical_devices("GPU")
        info["device"] = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                          if gpus else "cpu")
    clock = _install_clock(args.worker)
    config = clm.TrainConfig(
        backend=args.worker, train_file=args.data, output_dir=args.output_dir, block_size=args.seq_len,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, save_steps=10 ** 9, test_size=0.01, report_to="none",
        logging_steps=max(10, args.steps), bf16=not args.no_bf16, jit_compile=not args.no_jit_compile,
        # PyTorch-only options (the tf backend refuses --torch_compile)
        torch_compile=args.torch_compile and args.worker == "pt",
        dataloader_num_workers=args.dataloader_num_workers if args.worker == "pt" else 0,
        overwrite_output_dir=True, seed=0)
    if args.worker == "pt":  # report what the Trainer actually used
        from transformers import Trainer

        train = Trainer.train

        def traced(self: Any, *a: Any, **k: Any) -> Any:
            model = getattr(self.model, "_orig_mod", self.model)
            info.update(optim=str(getattr(self.args.optim, "value", self.args.optim)),
                        attention=getattr(model.config, "_attn_implementation", None),
                        pin_memory=self.args.dataloader_pin_memory, torch_compile=self.args.torch_compile,
                        dataloader_workers=self.args.dataloader_num_workers)
            return train(self, *a, **k)

        Trainer.train = traced
    else:
        info.update(jit_compile=config.jit_compile)
    metrics = clm.train(config)
    n_params = metrics["total_parameters"] - shape["n_positions"] * shape["n_embd"]  # not the position table
    tokens_per_step = metrics["global_batch_size"] * args.seq_len
    return {**info, "tokens_per_second": clock.rate(args.warmup, tokens_per_step), "params": n_params,
            "flops_per_token": flops_per_token(n_params, shape["n_layer"], args.seq_len, shape["n_embd"])}


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["pt", "tf"])
    p.add_argument("--smoke", action="store_true", help="a tiny GPT-2 and short sequences: runs on a CPU")
    p.add_argument("--batch_size", type=int, default=None, help="per device (default 16; --smoke 4)")
    p.add_argument("--seq_len", type=int, default=None, help="default 1024; --smoke 64")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50; --smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; --smoke 2)")
    p.add_argument("--repeat", type=int, default=1, help="rounds, backends alternating")
    p.add_argument("--no_bf16", action="store_true", help="float32 instead of bf16 mixed precision")
    p.add_argument("--no_jit_compile", action="store_true", help="TensorFlow without XLA")
    p.add_argument("--torch_compile", action="store_true", help="PyTorch: torch.compile the model")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="PyTorch: batch-loading processes")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s, if not known")
    p.add_argument("--pt_python", default=os.environ.get("CLM_PT_PYTHON", sys.executable))
    p.add_argument("--tf_python", default=os.environ.get("CLM_TF_PYTHON", sys.executable))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    defaults = dict(batch_size=(4, 16), seq_len=(64, 1024), steps=(4, 50), warmup=(2, 10))
    for name, (smoke, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.worker:
        print(MARK + json.dumps(worker(args)), flush=True)
        return

    results: dict[str, list[dict[str, Any]]] = {b: [] for b in args.backends}
    with tempfile.TemporaryDirectory(prefix="clm-gpu-bench-") as tmp:
        data = Path(tmp) / "corpus.jsonl"
        write_corpus(data, int((args.warmup + args.steps + 2) * args.batch_size * args.seq_len * 1.1 / 0.99))
        for rep in range(args.repeat):
            for backend in args.backends:
                python = args.pt_python if backend == "pt" else args.tf_python
                cmd = [python, __file__, "--worker", backend, "--data", str(data), "--output_dir",
                       str(Path(tmp) / f"{backend}-{rep}"), "--batch_size", str(args.batch_size), "--seq_len",
                       str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--dataloader_num_workers", str(args.dataloader_num_workers)]
                cmd += [f for f in ("--smoke", "--no_bf16", "--no_jit_compile", "--torch_compile")
                        if getattr(args, f.lstrip("-"))]
                env = {**os.environ, "CLM_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                lines = [x for x in proc.stdout.splitlines() if x.startswith(MARK)]
                if proc.returncode or not lines:
                    sys.exit(f"{backend} failed:\n{proc.stderr[-4000:]}")
                results[backend].append(json.loads(lines[-1][len(MARK):]))
                r = results[backend][-1]
                print(f"[{rep + 1}/{args.repeat}] {backend}: {r['tokens_per_second']:.0f} tokens/s on {r['device']}",
                      flush=True)

    print(f"\n{'GPT-2 smoke config' if args.smoke else 'GPT-2 small'}, batch {args.batch_size} x {args.seq_len}, "
          f"{'float32' if args.no_bf16 else 'bf16'}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"median of {args.repeat}")
    print(f"{'backend':8s}{'device':28s}{'params':>10s}{'tokens/s':>12s}{'TFLOP/s':>10s}{'MFU':>8s}  options")
    for backend, rows in results.items():
        r = rows[0]
        rate = statistics.median(x["tokens_per_second"] for x in rows)
        achieved = rate * r["flops_per_token"] / 1e12
        peak = peak_tflops(r["device"], args.peak_tflops)
        mfu = f"{achieved / peak:7.1%}" if peak and r["device"] != "cpu" else "    n/a"
        options = {k: v for k, v in r.items() if k not in ("device", "tokens_per_second", "params", "flops_per_token")}
        print(f"{backend:8s}{r['device'][:27]:28s}{r['params'] / 1e6:9.1f}M{rate:12.0f}{achieved:10.2f}{mfu:>8s}  "
              f"{options}")


if __name__ == "__main__":
    main()
