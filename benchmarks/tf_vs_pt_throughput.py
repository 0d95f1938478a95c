"""Training throughput: TensorFlow backend against PyTorch backend, and each backend against a bare loop.

    python benchmarks/tf_vs_pt_throughput.py                       # both tables, 3 interleaved rounds
    python benchmarks/tf_vs_pt_throughput.py --mode backends --repeat 5 --steps 40
    python benchmarks/tf_vs_pt_throughput.py --mode overhead --frameworks tf
    python benchmarks/tf_vs_pt_throughput.py --pt_python .venv/bin/python --tf_python .venv-tf/bin/python

Run it with the TF environment (it has both frameworks) or name an interpreter per framework.

``--mode backends``: each configuration (pt; tf with default flags; tf with the other XLA setting) trains in a
fresh process through ``clm.train`` (the real run: data, eval, checkpoint and all), ``--warmup`` steps then
``--steps`` timed steps. Only the timed steps count: the time from the end of the last warm-up step to the end
of the last step (tracing, XLA compilation, evaluation and saving fall outside). Configurations alternate
(pt, tf, tf', pt, tf, tf', ...) so a busy machine slows each alike; the table shows the median and the
spread (min-max) over rounds, and the TF/PT ratio computed within each round.

``--mode overhead``: one process per framework builds clm's training path (the ``ClmTrainer`` of the pt
backend; the tf backend's compiled Keras model, ``fit`` and callbacks) and a bare loop on the same model and
the same batches (PyTorch: AdamW, gradient clipping, linear schedule, ``backward``/``step``; TensorFlow: a
``tf.function`` with ``tf.GradientTape`` and the same optimizer and loss, XLA as configured), and times them
alternately in one process (bare, clm, bare, clm, ...). The bare loops take their batches pre-collated, so
any input-pipeline cost counts as clm's overhead. Ratio = clm tokens/s / bare tokens/s (goal >= 0.98).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MARK = "CLM_BENCH_RESULT "
NEVER = 10 ** 9  # save_steps beyond the run: no checkpoint or evaluation inside the timed steps


# ------------------------------------------------------------------------------------------------ workers
def _config(args: argparse.Namespace, backend: str, output_dir: str, **kw: Any) -> Any:
    import clm

    extra = {} if args.jit is None else {"jit_compile": args.jit == "on"}
    if backend == "keras":
        extra["keras_backend"] = args.keras_backend
    return clm.TrainConfig(backend=backend, model_name_or_path=args.model, output_dir=output_dir,
                           max_steps=args.warmup + args.steps, block_size=args.block_size,
                           per_device_train_batch_size=args.batch_size, report_to="none", seed=0,
                           save_steps=NEVER, overwrite_output_dir=True, **extra, **kw)


class StepClock:
    """Timestamps of optimizer-step ends; ``rate`` counts only steps after the warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def rate(self, warmup: int, tokens_per_step: int) -> float:
        t = self.times
        if len(t) <= warmup:
            raise RuntimeError(f"only {len(t)} steps timed, warm-up is {warmup}")
        return (len(t) - warmup) * tokens_per_step / (t[-1] - t[warmup - 1] if warmup else t[-1] - t[0])


def _install_clock(backend: str) -> StepClock:
    """Hook a clock into the backend's own per-step callback (no extra callback in the tf path)."""
    clock = StepClock()
    if backend == "keras":
        from clm.backends.keras.callback import RunLog

        batch_end = RunLog.batch_end

        def keras_batch_end(self: Any, *a: Any, **k: Any) -> None:
            clock.tick()  # first: the step's end, before the evaluation or checkpoint the callback may run
            batch_end(self, *a, **k)

        RunLog.batch_end = keras_batch_end
    elif backend == "pt":
        from transformers import TrainerCallback

        import clm.backends.pt.backend as ptb

        class Tick(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                clock.tick()

        original = ptb.callbacks
        ptb.callbacks = lambda *a, **k: [*original(*a, **k), Tick()]
    else:
        from clm.backends.tf.trainer import ClmCallback

        end = ClmCallback.on_train_batch_end

        def on_train_batch_end(self: Any, batch: int, logs: Any = None) -> None:
            end(self, batch, logs)
            clock.tick()

        ClmCallback.on_train_batch_end = on_train_batch_end
    return clock


def worker_train(args: argparse.Namespace) -> dict[str, float]:
    """One clm.train run; steady tokens/s over the timed steps."""
    import clm

    clock = _install_clock(args.worker)
    config = _config(args, args.worker, args.output_dir)
    metrics = clm.train(config)
    tokens = metrics["global_batch_size"] * args.block_size
    return {"steady": clock.rate(args.warmup, tokens), "end_to_end": metrics["train_tokens_per_second"]}


def _prepared(args: argparse.Namespace, name: str) -> tuple[Any, Any, Any, list[list[dict[str, Any]]]]:
    """One backend set up as a run sets it up (config, tokenizer, data, model, prepare): (backend, model,
    config, the rows of each batch both paths train on)."""
    import clm
    from clm.data import prepare_dataset
    from clm.defaults import load_tokenizer

    config = _config(args, name, args.output_dir)
    tokenizer = load_tokenizer(config)
    backend = clm.get_backend(name)
    with backend.main_process_first(config):
        data = prepare_dataset(config, tokenizer)
    model = backend.load_model(config, tokenizer)
    backend.prepare(model, config, tokenizer, data["train"], data["test"])
    train, per_step = data["train"], config.per_device_train_batch_size
    rows = [[train[(i * per_step + j) % len(train)] for j in range(per_step)]
            for i in range(args.warmup + args.steps)]
    return backend, model, config, rows


def _pt_paths(args: argparse.Namespace) -> tuple[Callable[[], float], Callable[[], float]]:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from clm.backends.pt.batches import torch_collate

    clock = _install_clock("pt")
    backend, model, config, rows = _prepared(args, "pt")
    trainer = backend._trainer
    batches = [torch_collate(batch) for batch in rows]
    tokens = config.per_device_train_batch_size * config.block_size

    def clm_path() -> float:
        clock.times.clear()
        trainer.optimizer = trainer.lr_scheduler = None  # a fresh optimizer and schedule, as a new run has
        trainer.train()
        return clock.rate(args.warmup, tokens)

    # The bare loop: the Trainer's recipe written out (decay groups, AdamW, clipping, linear schedule).
    decay = set(trainer.get_decay_parameter_names(model))
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": config.weight_decay},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    fused = "fused" in str(getattr(trainer.args.optim, "value", trainer.args.optim))

    def bare() -> float:
        opt = torch.optim.AdamW(groups, lr=config.effective_learning_rate, betas=(config.adam_beta1,
                                config.adam_beta2), eps=config.adam_epsilon, fused=fused or None)
        sched = get_linear_schedule_with_warmup(opt, 0, len(batches))
        model.train()
        bare_clock = StepClock()
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bare_clock.tick()
        return bare_clock.rate(args.warmup, tokens)

    return bare, clm_path


def _tf_paths(args: argparse.Namespace) -> tuple[Callable[[], float], Callable[[], float]]:
    from clm.backends.tf.batches import collate_fixed
    from clm.backends.tf.optimizer import make_optimizer
    from clm.backends.tf.runtime import tf
    from clm.backends.tf.trainer import causal_lm_loss

    clock = _install_clock("tf")
    backend, model, config, rows = _prepared(args, "tf")
    tokens = config.per_device_train_batch_size * config.block_size

    def clm_path() -> float:
        clock.times.clear()
        backend.fit(None)
        return clock.rate(args.warmup, tokens)

    batches = []
    for batch in rows:
        b = collate_fixed(batch)
        batches.append(({"input_ids": tf.constant(b["input_ids"]), "attention_mask": tf.constant(b["attention_mask"])},
                        tf.constant(b["labels"])))
    optimizer = make_optimizer(config, model, len(batches))

    @tf.function(jit_compile=config.jit_compile)
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = causal_lm_loss(y, model(x, training=True).logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def bare() -> float:
        bare_clock = StepClock()
        for x, y in batches:
            step(x, y)
            bare_clock.tick()
        return bare_clock.rate(args.warmup, tokens)

    return bare, clm_path


def worker_overhead(args: argparse.Namespace) -> dict[str, list[float]]:
    bare, clm_path = (_pt_paths if args.worker == "pt" else _tf_paths)(args)
    out: dict[str, list[float]] = {"bare": [], "clm": []}
    for _ in range(args.repeat):  # interleaved in one process: bare, clm, bare, clm, ...
        out["bare"].append(bare())
        out["clm"].append(clm_path())
        print(f"  {args.worker}: bare {out['bare'][-1]:8.1f}  clm {out['clm'][-1]:8.1f} tokens/s", file=sys.stderr,
              flush=True)
    return out


# ------------------------------------------------------------------------------------------------ driver
def run_worker(python: str, kind: str, backend: str, jit: str | None, args: argparse.Namespace,
               tmp: Path, tag: str, extra_env: dict[str, str] | None = None, keras_backend: str | None = None) -> Any:
    cmd = [python, str(Path(__file__).resolve()), "--worker", backend, "--worker_kind", kind,
           "--output_dir", str(tmp / tag), "--block_size", str(args.block_size), "--batch_size",
           str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat)]
    cmd += ["--jit", jit] if jit else []
    cmd += ["--keras_backend", keras_backend] if keras_backend else []
    cmd += ["--model", args.model] if args.model else []
    env = {**os.environ, "CLM_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if kind == "overhead" else subprocess.PIPE,
                          text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        sys.exit(f"{backend} {kind} (jit={jit}) failed:\n{(proc.stderr or '')[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.1f}  ({min(values):8.1f} - {max(values):8.1f})"


def ratio_summary(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f}x  ({min(values):.2f} - {max(values):.2f})"


def mode_backends(args: argparse.Namespace, tmp: Path) -> None:
    other = "off" if args.tf_default_jit else "on"
    configs = [("pt", args.pt_python, "pt", None, None), ("tf (default flags)", args.tf_python, "tf", None, None),
               (f"tf jit_compile {other}", args.tf_python, "tf", other, None)]
    if args.keras_python:  # the keras backend on each framework Keras 3 runs on
        configs += [(f"keras ({name})", args.keras_python, "keras", None, name) for name in ("tensorflow", "jax")]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in configs}
    for rep in range(args.repeat):  # interleaved: pt, tf, tf', pt, tf, tf', ...
        for name, python, backend, jit, keras_backend in configs:
            result = run_worker(python, "train", backend, jit, args, tmp, f"{backend}-{jit}-{keras_backend}-{rep}",
                                keras_backend=keras_backend)
            rows[name].append(result)
            print(f"[{rep + 1}/{args.repeat}] {name:22s} steady {result['steady']:9.1f} tokens/s   end to end "
                  f"{result['end_to_end']:9.1f}", flush=True)
    print(f"\nTF vs PT: model {args.model or 'built-in tiny GPT-2'}, batch {args.batch_size} x {args.block_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeat} interleaved rounds, "
          f"{os.cpu_count()} CPUs")
    print(f"{'configuration':24s}{'steady tokens/s: median (min - max)':38s}  ratio to pt, per round: median (range)")
    pt = [r["steady"] for r in rows["pt"]]
    for name in rows:
        steady = [r["steady"] for r in rows[name]]
        ratio = "" if name == "pt" else ratio_summary([s / p for s, p in zip(steady, pt)])
        print(f"{name:24s}{summary(steady):38s}  {ratio}")


def mode_overhead(args: argparse.Namespace, tmp: Path) -> None:
    results = {}
    for backend in args.frameworks:
        python = args.pt_python if backend == "pt" else args.tf_python
        results[backend] = run_worker(python, "overhead", backend, None, args, tmp, f"overhead-{backend}")
    print(f"\nOverhead: clm's training path against a bare loop in the same framework, same model and batches, "
          f"batch {args.batch_size} x {args.block_size}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.repeat} interleaved rounds")
    print(f"{'':6s}{'bare tokens/s: median (range)':34s}{'clm tokens/s: median (range)':34s}"
          f"clm / bare per round (goal >= 0.98)")
    for backend, r in results.items():
        ratios = [c / b for c, b in zip(r["clm"], r["bare"])]
        print(f"{backend:6s}{summary(r['bare']):34s}{summary(r['clm']):34s}{ratio_summary(ratios)}")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What ``run_worker`` reads from ``args``: the run's shape and the rounds."""
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (tracing, XLA compilation)")
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    p.add_argument("--model", default=None, help="model directory (default: the built-in tiny GPT-2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["all", "backends", "overhead"], default="all")
    add_run_arguments(p)
    p.add_argument("--frameworks", nargs="+", default=["pt", "tf"], help="--mode overhead: which frameworks")
    p.add_argument("--pt_python", default=os.environ.get("CLM_PT_PYTHON", sys.executable))
    p.add_argument("--tf_python", default=os.environ.get("CLM_TF_PYTHON", sys.executable))
    keras_python = ROOT / ".venv-keras" / "bin" / "python"
    p.add_argument("--keras_python", default=os.environ.get("CLM_KERAS_PYTHON") or (
        str(keras_python) if keras_python.exists() else None), help="the keras backend's interpreter ('' skips it)")
    p.add_argument("--keras_backend", default="tensorflow", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_kind", help=argparse.SUPPRESS)
    p.add_argument("--output_dir", help=argparse.SUPPRESS)
    p.add_argument("--jit", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (worker_train if args.worker_kind == "train" else worker_overhead)(args)
        print(MARK + json.dumps(result), flush=True)
        return
    from clm.config import TrainConfig

    args.tf_default_jit = TrainConfig.__dataclass_fields__["jit_compile"].default
    with tempfile.TemporaryDirectory(prefix="clm-bench-") as tmp:
        if args.mode in ("all", "backends"):
            mode_backends(args, Path(tmp))
        if args.mode in ("all", "overhead"):
            mode_overhead(args, Path(tmp))


if __name__ == "__main__":
    main()
