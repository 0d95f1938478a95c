"""Data preparation at scale: clm against bare tokenization, the guide's pipeline and run_clm's.

    python benchmarks/data_prep.py                      # >= 20 M GPT-2 tokens, all pipelines, one table
    python benchmarks/data_prep.py --tokens 2M          # a quicker look
    python benchmarks/data_prep.py --streaming-memory   # peak memory of --streaming at two corpus sizes

The corpus is the bundled ELI5-layout sample, perturbed (each answer's sentences redrawn from the whole sample)
and repeated into a .jsonl in a temporary directory. Every pipeline runs on the same rows with the same number
of worker processes (clm's default: one per core), map caches off, and an empty clm cache (a cold run, saving
included). Loading the JSON into Arrow is shared by all pipelines and timed apart. Times are wall clock and the
CPU seconds of all processes; on a busy machine compare the CPU column, and use --repeat to take the best of
several interleaved rounds. One round at 20 M tokens takes 5-6 minutes on 2 cores (the guide's pipeline is
half of it); --streaming-memory takes about 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_tokens(text: str) -> int:
    """'20M', '2.5m', '500k' or '123456' -> a token count."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 20M, 500k)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()])


def human(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


# --------------------------------------------------------------------------------------------- corpus
def build_corpus(path: Path, tokens: int, tokens_per_row: int = 0, seed: int = 0) -> int:
    """Write ELI5-layout rows holding about ``tokens`` GPT-2 tokens to ``path``; returns the row count.

    Rows keep the sample's layout; every answer is made of sentences drawn at random from all the sample's
    answers, so rows differ while the text stays natural. With ``tokens_per_row`` 0 each row copies a sample
    row's shape (2-3 short answers, about 170 tokens); otherwise rows hold 1-12 answers and
    ``tokens_per_row`` tokens on average (0.5x to 1.5x), like the real ELI5 data.
    """
    from clm.defaults import gpt2_tokenizer, sample_data_path

    rows = [json.loads(line) for line in sample_data_path().read_text(encoding="utf-8").splitlines() if line]
    texts = [" ".join(r["answers"]["text"]) for r in rows]
    tokens_per_char = sum(map(len, gpt2_tokenizer()(texts)["input_ids"])) / sum(map(len, texts))
    sentences = [s for r in rows for a in r["answers"]["text"] for s in re.split(r"(?<=[.!?])\s+", a) if s]
    rng = random.Random(seed)

    def answer(chars: float) -> str:
        out = [rng.choice(sentences)]
        while sum(map(len, out)) + len(out) < chars:
            out.append(rng.choice(sentences))
        return " ".join(out)

    total, n = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while total * tokens_per_char < tokens:
            base = rows[n % len(rows)]
            if tokens_per_row:
                k = rng.randint(1, 12)
                row_chars = tokens_per_row / tokens_per_char * rng.uniform(0.5, 1.5)
                answers = [answer(row_chars / k) for _ in range(k)]
            else:
                answers = [answer(len(a)) for a in base["answers"]["text"]]
            total += sum(map(len, answers)) + len(answers) - 1
            n += 1
            sub = {"a_id": [f"{n}-{i}" for i in range(len(answers))], "text": answers,
                   "score": [len(answers) - i for i in range(len(answers))],
                   "text_urls": [[] for _ in answers]}
            f.write(json.dumps({**base, "q_id": f"{base['q_id']}-{n}", "answers": sub}) + "\n")
    return n


# --------------------------------------------------------------------------------------------- the baselines
def guide_group_texts(examples: dict[str, list[list[int]]], block_size: int = 128) -> dict[str, list]:
    """Verbatim from the Hugging Face causal language modeling guide (sum(lists, []))."""
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


def chain_group_texts(examples: dict[str, list[list[int]]], block_size: int = 128) -> dict[str, list]:
    """Verbatim from transformers' examples/pytorch/language-modeling/run_clm.py (itertools.chain)."""
    concatenated_examples = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated_examples[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {
        k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
        for k, t in concatenated_examples.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def guide_tokenize(raw, tokenizer, num_proc, test_size, seed):
    """The guide's steps up to tokenizing: train_test_split, flatten, join answers, tokenize (batched)."""
    splits = raw.train_test_split(test_size=test_size, seed=seed).flatten()

    def preprocess_function(examples):
        return tokenizer([" ".join(x) for x in examples["answers.text"]])

    return splits.map(preprocess_function, batched=True, num_proc=num_proc,
                      remove_columns=splits["train"].column_names, load_from_cache_file=False)


def group(tokenized, group_fn, block_size, num_proc):
    return tokenized.map(group_fn, batched=True, num_proc=num_proc, fn_kwargs={"block_size": block_size},
                         load_from_cache_file=False)


# --------------------------------------------------------------------------------------------- measuring
def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the map workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def n_blocks(dd) -> int:
    return sum(len(ds) for ds in dd.values())


class Timings:
    """Best wall and best CPU seconds per step over the rounds (steps interleave, so a busy spell on a shared
    machine does not land on one pipeline only)."""

    def __init__(self) -> None:
        self.best: dict[str, list[float]] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        best = self.best.setdefault(name, [wall, cpu])
        best[:] = [min(best[0], wall), min(best[1], cpu)]
        print(f"  {name:<40}{wall:8.2f} s wall {cpu:8.2f} s cpu", flush=True)
        return result

    def ratio(self, a: str, b: str) -> tuple[float, float]:
        return self.best[a][0] / self.best[b][0], self.best[a][1] / self.best[b][1]


BARE, IDS = "bare tokenization: tokenizer(texts)", "bare tokenization, ids only"
GUIDE, CHAIN, CLM = "guide pipeline (sum)", "run_clm pipeline (itertools.chain)", "clm prepare_dataset (cold cache)"
G_GUIDE, G_CHAIN, G_CLM = ("grouping alone: guide (sum)", "grouping alone: run_clm (chain)",
                           "grouping alone: clm (pack_split)")


def run_pipelines(args: argparse.Namespace, workdir: Path) -> None:
    import datasets
    import transformers

    from clm import data
    from clm.config import TrainConfig
    from clm.data.tokens import cpu_count, worker_count
    from clm.defaults import gpt2_tokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" is expected here
    started = time.perf_counter()
    corpus = workdir / "corpus.jsonl"
    t = time.perf_counter()
    rows = build_corpus(corpus, args.tokens, args.tokens_per_row)
    print(f"corpus: {rows} rows (~{args.tokens_per_row or 170} tokens each), {corpus.stat().st_size / 1e6:.0f} MB "
          f"(built in {time.perf_counter() - t:.1f} s)")

    tokenizer = gpt2_tokenizer()
    bs = args.block_size
    # join_with_eos off: clm cuts the guide's token stream, so the block counts compare like for like.
    config = TrainConfig(train_file=str(corpus), block_size=bs, overwrite_cache=True,
                         join_with_eos=args.join_with_eos, preprocessing_num_workers=args.num_proc)
    t = time.perf_counter()
    raw = data.load_raw(config)
    print(f"JSON -> Arrow load (shared by all pipelines, not counted): {time.perf_counter() - t:.1f} s")
    flat = raw.flatten()
    num_proc = worker_count(config, len(flat), flat.data.column("answers.text").nbytes)  # clm's choice
    if (num_proc or 1) > 1:  # workers are the parallelism; keep the tokenizer's threads out of each other's way
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    texts = flat.map(lambda col: {"text": [" ".join(x) for x in col]}, batched=True, input_columns=["answers.text"],
                     remove_columns=flat.column_names)  # the same documents, joined, for bare tokenization
    given = guide_tokenize(raw, tokenizer, num_proc, config.test_size, config.seed)  # for grouping alone
    n_tokens = sum(len(c.flatten()) for ds in given.values() for c in ds.data.column("input_ids").chunks)
    pad_id = tokenizer.pad_token_id
    print(f"workers: {num_proc or 1} (num_proc={num_proc}), cores: {cpu_count()}, block_size: {bs}, "
          f"join_with_eos: {config.join_with_eos}, rounds: {args.repeat}, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")

    def bare(**kw):
        return texts.map(lambda col: tokenizer(col, **kw), batched=True, input_columns=["text"],
                         remove_columns=["text"], num_proc=num_proc, load_from_cache_file=False)

    def pipeline(group_fn):
        return group(guide_tokenize(raw, tokenizer, num_proc, config.test_size, config.seed), group_fn, bs, num_proc)

    timings, blocks = Timings(), {}
    for round_ in range(args.repeat):
        print(f"\nround {round_ + 1}/{args.repeat}")
        timings.run(BARE, bare)
        timings.run(IDS, lambda: bare(return_attention_mask=False))
        blocks["guide"] = n_blocks(timings.run(GUIDE, lambda: pipeline(guide_group_texts)))
        blocks["chain"] = n_blocks(timings.run(CHAIN, lambda: pipeline(chain_group_texts)))
        blocks["clm"] = n_blocks(timings.run(CLM, lambda: data.prepare_dataset(config, tokenizer)))
        timings.run(G_GUIDE, lambda: group(given, guide_group_texts, bs, num_proc))
        timings.run(G_CHAIN, lambda: group(given, chain_group_texts, bs, num_proc))
        timings.run(G_CLM, lambda: {name: data.pack_split(ds, config, pad_id, name) for name, ds in given.items()})

    width = 42
    print(f"\n{'step (best of ' + str(args.repeat) + ')':<{width}}{'wall s':>9}{'cpu s':>9}")
    for name, (wall, cpu) in timings.best.items():
        print(f"{name:<{width}}{wall:9.2f}{cpu:9.2f}")
    print(f"\ntokens: {n_tokens:,} ({human(n_tokens)}); blocks of {bs}: clm {blocks['clm']:,}, "
          f"guide {blocks['guide']:,}, run_clm {blocks['chain']:,} "
          f"(tokens dropped: clm {n_tokens - blocks['clm'] * bs:,}, guide and run_clm "
          f"{n_tokens - blocks['guide'] * bs:,})")

    checks = [
        ("clm / bare tokenization", CLM, BARE, "<=", 1.15),
        ("clm / bare tokenization (ids only)", CLM, IDS, "<=", 1.15),
        ("run_clm chain / clm", CHAIN, CLM, ">=", 2.0),
        ("guide / clm", GUIDE, CLM, ">=", 4.0),
        ("grouping alone: chain / clm", G_CHAIN, G_CLM, ">=", 10.0),
        ("grouping alone: guide / clm", G_GUIDE, G_CLM, ">=", 10.0),
    ]
    print(f"\n{'ratio':<{width}}{'wall':>9}{'cpu':>9}   goal")
    for label, a, b, op, goal in checks:
        w, c = timings.ratio(a, b)
        met = [(x <= goal) if op == "<=" else (x >= goal) for x in (w, c)]
        verdict = "met" if all(met) else "NOT met" if not any(met) else "met on " + ("wall" if met[0] else "cpu")
        print(f"{label:<{width}}{w:8.2f}x{c:8.2f}x   {op} {goal:g}x: {verdict}")
    # No pipeline beats its own tokenizer: these are the best ratios a free grouping step could reach.
    print(f"\n{'ceiling (bare tokenization + grouping) / bare':<{width}}")
    for label, g in (("  run_clm chain", G_CHAIN), ("  guide", G_GUIDE)):
        w = (timings.best[BARE][0] + timings.best[g][0]) / timings.best[BARE][0]
        c = (timings.best[BARE][1] + timings.best[g][1]) / timings.best[BARE][1]
        print(f"{label:<{width}}{w:8.2f}x{c:8.2f}x")
    print(f"\nbenchmark run time: {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------------------------- memory
def memory_child(args: argparse.Namespace) -> None:
    """One preparation in a fresh process: print its peak memory as JSON (run by --streaming-memory)."""
    import tracemalloc

    import datasets
    import transformers

    from clm import data
    from clm.config import TrainConfig
    from clm.defaults import gpt2_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tokenizer = gpt2_tokenizer()
    streaming = args.mode == "streaming"
    config = TrainConfig(train_file=args.file, block_size=args.block_size, streaming=streaming,
                         max_steps=1 if streaming else -1, overwrite_cache=True, preprocessing_num_workers=1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.tracemalloc:  # Python allocations only, and its bookkeeping inflates RSS: a separate question
        tracemalloc.start()
    t = time.perf_counter()
    dd = data.prepare_dataset(config, tokenizer)
    n = sum(1 for _ in dd["train"]) if streaming else len(dd["train"])  # streaming: read the whole stream
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if args.tracemalloc else None
    print(json.dumps({"blocks": n, "eval_blocks": len(dd["test"]), "seconds": elapsed, "traced_peak_mb": peak,
                      "rss_before_mb": rss_before / 1024,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def streaming_memory(args: argparse.Namespace, workdir: Path) -> None:
    print(f"peak memory of preparation, each run in a fresh process with one worker (block_size "
          f"{args.block_size}, ~{args.tokens_per_row or 170} tokens per row); streaming reads the whole train "
          f"stream, prepared tokenizes, packs and saves (the non-streaming path, for contrast)\n")
    traced = "traced peak MB" if args.tracemalloc else ""
    print(f"{'mode':<11}{'corpus':>8}{'rows':>8}{'train blocks':>14}{'time s':>8}{'RSS after imports MB':>22}"
          f"{'peak RSS MB':>13}{traced:>16}")
    for size in args.memory_sizes:
        corpus = workdir / f"corpus-{size}.jsonl"
        rows = build_corpus(corpus, size, args.tokens_per_row)
        for mode in args.memory_modes:
            env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / f"hf-{mode}-{size}"),
                   "CLM_CACHE": str(workdir / f"clm-{mode}-{size}")}
            cmd = [sys.executable, __file__, "--memory-child", "--mode", mode, "--file", str(corpus),
                   "--block_size", str(args.block_size)] + (["--tracemalloc"] if args.tracemalloc else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"memory run failed ({mode}, {size}):\n{out.stderr[-3000:]}")
            m = json.loads(out.stdout.strip().splitlines()[-1])
            extra = f"{m['traced_peak_mb']:16.1f}" if args.tracemalloc else ""
            print(f"{mode:<11}{human(size):>8}{rows:>8}{m['blocks']:>14}{m['seconds']:8.1f}"
                  f"{m['rss_before_mb']:22.0f}{m['peak_rss_mb']:13.0f}{extra}", flush=True)
            shutil.rmtree(workdir / f"hf-{mode}-{size}", ignore_errors=True)
            shutil.rmtree(workdir / f"clm-{mode}-{size}", ignore_errors=True)
        corpus.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=parse_tokens, default=parse_tokens("20M"),
                        help="corpus size in GPT-2 tokens (default 20M)")
    parser.add_argument("--num_proc", type=int, default=None,
                        help="worker processes for every pipeline (default: clm's, one per core)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--tokens_per_row", type=int, default=1700,
                        help="average tokens per row: 1700 is the real eli5_category data's (2.7 M tokens in "
                             "1580 rows); 0 keeps the bundled sample's short rows (~170)")
    parser.add_argument("--join_with_eos", action="store_true",
                        help="clm puts EOS between documents (its default); off here so all pipelines cut the "
                             "same token stream")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all steps, interleaved; each step's best is shown")
    parser.add_argument("--workdir", help="where the corpus and caches go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--streaming-memory", action="store_true",
                        help="instead of timings: peak memory of --streaming at --memory-sizes")
    parser.add_argument("--memory-sizes", type=lambda s: [parse_tokens(x) for x in s.split(",")],
                        default=[parse_tokens(x) for x in ("2M", "8M", "32M")],
                        help="corpus sizes, default 2M,8M,32M")
    parser.add_argument("--memory-modes", type=lambda s: s.split(","), default=["streaming", "prepared"],
                        help="streaming and/or prepared (the non-streaming path, for contrast)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="--streaming-memory: also trace Python allocations (slower)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="clm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Fresh caches: nothing from an earlier run is reused (set before datasets is imported).
    os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf-datasets")
    os.environ["CLM_CACHE"] = str(workdir / "clm-cache")
    try:
        if args.streaming_memory:
            streaming_memory(args, workdir)
        else:
            run_pipelines(args, workdir)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
