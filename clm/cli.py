"""``python -m clm [train|evaluate|generate|prepare] ...``: one parser built from TrainConfig.

Settings come from, lowest priority first: TrainConfig's defaults, ``--preset``, ``--config FILE`` (JSON or
YAML), then flags. A user's mistake is reported as one line on stderr with exit code 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from clm.config import PRESETS, TrainConfig
from clm.errors import ClmError, ConfigError

COMMANDS = ("train", "evaluate", "generate", "prepare")
DESCRIPTIONS = {
    "train": "Fine-tune a causal language model (the default command).",
    "evaluate": "Eval loss and perplexity of --model_name_or_path on the eval split; writes eval_results.json.",
    "generate": "Continue a prompt with a trained model (prints the prompt with its continuation).",
    "prepare": "Load, split, tokenize and pack the data, and save it with save_to_disk to --output_dir.",
}


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(p.read_text())
        else:
            values = json.loads(p.read_text())
    except Exception as exc:
        raise ConfigError(f"config file {path!r} could not be parsed: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of setting names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"config file {path!r} has unknown settings: {', '.join(unknown)}")
    return values


def _base_parser() -> argparse.ArgumentParser:
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--config", help="JSON or YAML file of settings (flags override it).")
    base.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    return base


def _config_parser(command: str, defaults: dict[str, Any]):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TrainConfig, prog=f"clm {command}", description=DESCRIPTIONS[command],
                              parents=[_base_parser()])
    parser.set_defaults(**defaults)
    return parser


def parse_config(command: str, argv: Sequence[str]) -> TrainConfig:
    """Flags (after an optional --config file and --preset) to a validated TrainConfig."""
    pre, _ = _base_parser().parse_known_args(argv)
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset")
    preset_name = preset.parse_known_args(argv)[0].preset
    file_values = _load_config_file(pre.config) if pre.config else {}
    preset_name = preset_name or file_values.get("preset")
    if preset_name and preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; choose one of: {', '.join(PRESETS)}")
    defaults = {**PRESETS.get(preset_name or "", {}), **file_values}
    if command == "prepare":
        defaults.setdefault("output_dir", "clm-prepared")
    parser = _config_parser(command, defaults)
    # The extra namespace holds --config/--debug, already handled.
    return parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)[0]


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clm generate", description=DESCRIPTIONS["generate"], parents=[_base_parser()])
    p.add_argument("--model_name_or_path", "--model-name-or-path", required=True,
                   help="Trained model directory (or Hub id).")
    p.add_argument("--prompt", action="append", required=True, help="Text to continue; repeat for several.")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=100, help="Tokens to add.")
    p.add_argument("--do_sample", "--do-sample", action=argparse.BooleanOptionalAction, default=True,
                   help="Sample (default) or decode greedily (--no-do_sample).")
    p.add_argument("--top_k", "--top-k", type=int, default=50, help="Sample from the k most likely tokens.")
    p.add_argument("--top_p", "--top-p", type=float, default=0.95, help="Nucleus sampling probability mass.")
    p.add_argument("--seed", type=int, default=None, help="Seed for reproducible sampling.")
    p.add_argument("--backend", default=None, help="pt or tf (default: $CLM_BACKEND, else first installed).")
    return p


def _setup_logging() -> None:
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("clm").setLevel(logging.INFO)
    logging.getLogger("clm.data").setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def run(argv: Sequence[str]) -> int:
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    args = list(argv[1:] if argv and argv[0] in COMMANDS else argv)
    _setup_logging()
    import clm

    if command == "generate":
        ns = _generate_parser().parse_args(args)
        for text in clm.generate(ns.model_name_or_path, ns.prompt, backend=ns.backend,
                                 max_new_tokens=ns.max_new_tokens, do_sample=ns.do_sample, top_k=ns.top_k,
                                 top_p=ns.top_p, seed=ns.seed):
            print(text)
        return 0

    config = parse_config(command, args)
    if command == "prepare":
        from clm.runner import prepare_to_disk

        path = prepare_to_disk(config)
        print(f"prepared data saved to {path}")
    elif command == "evaluate":
        metrics = clm.evaluate(config)
        print(f"eval_loss {metrics['eval_loss']:.4f}  perplexity {metrics['perplexity']:.2f}")
    else:
        metrics = clm.train(config)
        print(f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity']:.2f} "
              f"(eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}); "
              f"model and results in {config.output_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CLM_DEBUG") == "1"
    try:
        return run(argv)
    except ClmError as exc:
        if debug:
            raise
        print(f"clm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clm: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
