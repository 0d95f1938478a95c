"""``python -m clm [train|evaluate|generate|prepare|push] ...``: each command's flags come from one dataclass.

Settings come from, lowest priority first: the dataclass's defaults, ``--preset`` (TrainConfig applies it
under everything given), ``--config FILE`` (JSON or YAML), then flags. A user's mistake, a misspelt flag
included, is reported as one line on stderr with exit code 2; ``--debug`` shows the traceback.

A new command adds an entry to ``COMMANDS`` and a handler to ``HANDLERS``; ``parse_options`` gives it the
same flags, config file and one-line errors as the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from clm.config import GenerateConfig, PushConfig, TrainConfig
from clm.errors import ClmError, ConfigError

COMMANDS = {
    "train": "Fine-tune a causal language model (the default command).",
    "evaluate": "Eval loss, perplexity and next-token accuracy of --model_name_or_path on the eval split; writes eval_results.json.",
    "generate": "Continue a prompt with a trained model (prints the prompt with its continuation).",
    "prepare": "Load, split, tokenize and pack the data, and save it with save_to_disk to --output_dir.",
    "push": "Upload a finished run's output dir to the Hugging Face Hub (again, after a failed --push_to_hub).",
}
PREPARE_OUTPUT_DIR = "clm-prepared"  # prepare's own default: prepared data, not a model, lives there
_UNSET = object()  # marks a field neither a flag nor the config file set, so the dataclass default applies


class _OneLineErrors:
    """argparse reports errors as usage + message and exits; raise instead, so main prints one line."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class _PreParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _base_parser() -> argparse.ArgumentParser:
    base = _PreParser(add_help=False, allow_abbrev=False)
    base.add_argument("--config", help="JSON or YAML file of settings (flags override it).")
    base.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    return base


@functools.lru_cache(maxsize=1)
def _parser_class() -> type:
    from transformers import HfArgumentParser  # imported on first parse only: `import clm.cli` stays light

    return type("ClmArgumentParser", (_OneLineErrors, HfArgumentParser), {})


def build_parser(cls: type, command: str) -> argparse.ArgumentParser:
    """The parser for ``command``: a flag (and a dash alias) per field of ``cls``, plus --config/--debug."""
    # allow_abbrev=False: a misspelt flag must not pass silently as a prefix of a real one (--learning-rat).
    parser = _parser_class()(cls, prog=f"clm {command}", description=COMMANDS[command],
                             parents=[_base_parser()], allow_abbrev=False)
    # A switch whose default depends on the data (None) gets its --no_ form too; HfArgumentParser adds one
    # only to switches that default to True.
    for f in dataclasses.fields(cls):
        if f.default is None and f.type in ("Optional[bool]", Optional[bool]):
            switch = next(a for a in parser._actions if a.dest == f.name)
            switch.nargs, switch.const = "?", True  # a bare --flag turns it on, as for the other switches
            parser.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                                dest=f.name, default=argparse.SUPPRESS, help=f"Turn --{f.name} off.")
    return parser


def _suggest(word: str, candidates: dict[str, str]) -> str:
    """'; did you mean X?' for the closest candidate (keys are matched, values named), else ''."""
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {candidates[match[0]]}?" if match else ""


def _looks_like_flag(arg: str) -> bool:
    """As argparse decides: '-x...' is a flag unless it is a number or holds a space (then it is a value)."""
    try:
        float(arg)
        return False
    except ValueError:
        return arg.startswith("-") and arg not in ("-", "--") and " " not in arg


def check_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """ConfigError naming the closest valid flag for the first flag ``parser`` does not define. Run before
    parsing, so a misspelt flag is what the user hears about, not the required flag it failed to set."""
    # Each spelling of a flag (dash alias included) points to its first, underscore form.
    spellings = {opt: action.option_strings[0] for action in parser._actions for opt in action.option_strings}
    for arg in argv:
        if arg == "--":  # the rest are values
            return
        flag = arg.split("=", 1)[0]
        if _looks_like_flag(arg) and flag not in spellings:
            raise ConfigError(f"unknown flag {flag}{_suggest(flag, spellings) or '; see --help'}")


def _load_config_file(path: str, cls: type) -> dict[str, Any]:
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
    known = {f.name: f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"config file {path!r} has unknown settings: {', '.join(unknown)}"
                          f"{_suggest(unknown[0], known)}")
    return values


def parse_options(cls: type, command: str, argv: Sequence[str]) -> dict[str, Any]:
    """The fields of ``cls`` that flags or the --config file set (flags win); the rest are left out so the
    dataclass fills them (TrainConfig: from the preset, then its defaults). Bad input raises ConfigError."""
    argv = list(argv)
    pre, _ = _base_parser().parse_known_args(argv)
    file_values = _load_config_file(pre.config, cls) if pre.config else {}
    parser = build_parser(cls, command)
    check_flags(parser, argv)
    parser.set_defaults(**file_values)  # as defaults, argparse converts the file's strings with the flag's type
    unset = {f.name: _unset_marker(f) for f in dataclasses.fields(cls) if f.name not in file_values}
    namespace, leftover = parser.parse_known_args(argv, namespace=argparse.Namespace(**unset))
    if leftover:  # only values can be left: check_flags has refused unknown flags
        raise ConfigError(f"unexpected argument {leftover[0]!r}; settings are given as flags, see --help")
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)}
    return {name: value for name, value in values.items() if value is not unset.get(name, _UNSET)}


def _unset_marker(f: dataclasses.Field) -> Any:
    """What a field holds after parsing when no flag set it; append/extend actions need None to add to."""
    return None if f.metadata.get("action") in ("append", "extend") else _UNSET


def parse_config(command: str, argv: Sequence[str]) -> TrainConfig:
    """Flags (over an optional --config file, over --preset) to a validated TrainConfig."""
    given = parse_options(TrainConfig, command, argv)
    if command == "prepare":
        given.setdefault("output_dir", PREPARE_OUTPUT_DIR)
    return TrainConfig(**given)


def parse_generate(argv: Sequence[str]) -> GenerateConfig:
    return GenerateConfig(**parse_options(GenerateConfig, "generate", argv))


def split_command(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(command, its arguments); no command means train."""
    if argv and argv[0] in COMMANDS:
        return argv[0], list(argv[1:])
    if argv and not argv[0].startswith("-"):
        hint = _suggest(argv[0], {c: c for c in COMMANDS}) or f"; choose one of: {', '.join(COMMANDS)}"
        raise ConfigError(f"unknown command {argv[0]!r}{hint}")
    return "train", list(argv)


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a record is written. A handler bound to the stream of the moment it was
    made (datasets makes one at import) writes to a closed stream once a caller (a notebook, a test's capture)
    has replaced and closed it, and logging then prints a "Logging error" traceback."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging() -> None:
    logging.basicConfig(format="[%(name)s] %(message)s", level=logging.WARNING, stream=_CurrentStderr())
    for library in ("datasets", "transformers"):
        for handler in logging.getLogger(library).handlers:
            if type(handler) is logging.StreamHandler and handler.stream not in (sys.stdout, sys.__stdout__):
                handler.stream = _CurrentStderr()  # not setStream: it flushes the old one, maybe closed
    logging.getLogger("clm").setLevel(logging.INFO)
    logging.getLogger("clm.data").setLevel(logging.INFO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import transformers

        transformers.logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _train(args: list[str]) -> None:
    import clm

    config = parse_config("train", args)
    metrics = clm.train(config)
    accuracy = ""
    if metrics.get("eval_accuracy") is not None and metrics.get("eval_accuracy_before") is not None:
        accuracy = f", accuracy {metrics['eval_accuracy_before']:.4f} -> {metrics['eval_accuracy']:.4f}"
    print(f"perplexity {metrics['perplexity_before']:.2f} -> {metrics['perplexity']:.2f} "
          f"(eval loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}{accuracy}); "
          f"model and results in {config.output_dir}")


def _evaluate(args: list[str]) -> None:
    import clm

    metrics = clm.evaluate(parse_config("evaluate", args))
    accuracy = f"  accuracy {metrics['eval_accuracy']:.4f}" if metrics.get("eval_accuracy") is not None else ""
    print(f"eval_loss {metrics['eval_loss']:.4f}  perplexity {metrics['perplexity']:.2f}{accuracy}")


def _generate(args: list[str]) -> None:
    import clm

    options = parse_generate(args)
    for text in clm.generate(options.model_name_or_path, options.prompt, backend=options.backend,
                             seed=options.seed, chat=options.chat, **options.sampling()):
        print(text)


def _prepare(args: list[str]) -> None:
    from clm.runner import prepare_to_disk

    print(f"prepared data saved to {prepare_to_disk(parse_config('prepare', args))}")


def _push(args: list[str]) -> None:
    import clm

    options = PushConfig(**parse_options(PushConfig, "push", args))
    url = clm.push(options.output_dir, options.hub_model_id, hub_private_repo=options.hub_private_repo,
                   hub_strategy=options.hub_strategy)
    print(f"pushed {options.output_dir} to {url}")


HANDLERS: dict[str, Callable[[list[str]], None]] = {
    "train": _train, "evaluate": _evaluate, "generate": _generate, "prepare": _prepare, "push": _push}


def backend_asked(command: str, argv: Sequence[str]) -> Optional[str]:
    """The backend a command will use (--backend, else the --config file's, else $CLM_BACKEND or the first
    installed), read before anything imports transformers; None for push, or when the input is wrong (the full
    parse then says how)."""
    cls = {"generate": GenerateConfig, "push": None}.get(command, TrainConfig)
    if cls is None:
        return None
    pre = _PreParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--backend")
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(list(argv))
        name = known.backend or (_load_config_file(known.config, cls).get("backend") if known.config else None)
        from clm.backends import resolve_backend_name

        return resolve_backend_name(name)
    except ClmError:
        return None


def run(argv: Sequence[str]) -> int:
    command, args = split_command(list(argv))
    backend = backend_asked(command, args)
    if backend is not None:  # before _setup_logging and the parser import transformers
        from clm.backends import load_only

        load_only(backend)
    _setup_logging()
    HANDLERS[command](args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CLM_DEBUG") == "1"
    try:
        return run(argv)
    except ClmError as exc:
        from clm.errors import Preempted

        if isinstance(exc, Preempted):  # a stop signal, not an error: where the checkpoint is, how to resume
            from clm.preemption import ignore_stop_signals, same_command

            exc.command = same_command([sys.argv[0], *argv])
            # Leaving anyway: a launcher's late signal (torchrun stops the other ranks once one has exited) must
            # not turn this rank's clean stop into a death by signal.
            ignore_stop_signals()
            if exc.report:  # the main process speaks for the run
                print(f"clm: {exc}", file=sys.stderr)
            return exc.exit_code
        if debug:
            raise
        print(f"clm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clm: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
