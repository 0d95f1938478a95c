"""TrainConfig: the one set of settings behind the CLI, config files and library calls (``clm.options`` has
the field helper and the options of generate and push).

Each field's ``help`` becomes its ``--help`` text, and a ``Literal`` field's values become its choices. Field
names follow Hugging Face's (TrainingArguments, run_clm.py) so users can carry their flags over. Validation
lives in ``__post_init__`` so a bad value fails the same way from the CLI, a config file or Python. A preset
(``clm.presets``) is applied in ``TrainConfig.__init__`` and only there: its values fill the fields the caller
did not give.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from clm.errors import ConfigError
# The field helper, and generate's and push's options: clm.config's names too
from clm.options import (GENERATION_DEFAULTS, GenerateConfig, HubStrategy, PushConfig,  # noqa: F401
                         _f, check_choices, field_choices)
from clm.presets import PRESETS, PresetName, preset_under_given  # noqa: F401  (PRESETS: clm.config's name too)

# The guide's learning rate for fine-tuning a pretrained model, and a rate that lets the built-in tiny model,
# which starts from random weights, learn within a few hundred steps.
FINETUNE_LEARNING_RATE = 2e-5
FROM_SCRATCH_LEARNING_RATE = 1e-3
LORA_LEARNING_RATE = 2e-4  # LoRA's usual rate: its updates start at zero and are scaled by alpha / r

SchedulerType = Literal["linear", "cosine", "constant"]
TfStrategy = Literal["auto", "one_device", "mirrored", "multi_worker", "tpu"]
EvalStrategy = Literal["no", "steps", "epoch"]  # TrainingArguments' eval_strategy
Packing = Literal["wrapped", "bfd", "none"]
KerasBackend = Literal["tensorflow", "jax"]
# --report_to names: the Trainer's integrations (transformers.integrations.INTEGRATION_TO_CALLBACK), "all" and
# "none". Kept here as data so `import clm` needs no transformers; a backend checks the library is installed.
REPORT_TO_NAMES = ("tensorboard", "wandb", "mlflow", "comet_ml", "neptune", "clearml", "dagshub", "dvclive",
                   "azure_ml", "codecarbon", "flyte", "swanlab", "trackio", "kubeflow", "all", "none")


@preset_under_given
@dataclass
class TrainConfig:
    """Settings for preparing data, training, evaluating and saving a causal language model."""

    # --- what to run on
    backend: Optional[str] = _f(
        None, "Framework: 'pt' (PyTorch Trainer), 'tf' (transformers' TF models, Keras fit) or 'keras' (Keras 3 + "
        "KerasHub, on TensorFlow or JAX). Default: $CLM_BACKEND, else the first installed of pt, tf, keras.")
    keras_backend: KerasBackend = _f(
        "tensorflow", "With --backend keras: the framework Keras 3 runs on, 'tensorflow' or 'jax' (set before Keras "
        "is first imported in the process).")
    preset: Optional[PresetName] = _f(
        None, "Start from a named recipe: its values fill every setting you do not give (a --train_file or "
        "--dataset_name of yours replaces its data). 'tiny': the offline default. 'guide': the "
        "Hugging Face guide (distilgpt2 on eli5_category train[:5000], lr 2e-5, 3 epochs; needs the Hub). "
        "'eli5_qa': the guide as questions and answers (title as prompt, answers as completion).")

    # --- model and tokenizer
    model_name_or_path: Optional[str] = _f(
        None, "Hub model id or local directory to fine-tune. Default: a small GPT-2 built from a config "
        "(random weights) with GPT-2's tokenizer, which needs no network.")
    tokenizer_name: Optional[str] = _f(None, "Tokenizer id or directory, if not the model's own.")
    trust_remote_code: bool = _f(False, "Allow model code from the Hub to run. Off by default: only enable "
                                        "for repositories you trust.")
    model_revision: Optional[str] = _f(None, "Hub branch, tag or commit of the model.")

    # --- data
    dataset_name: Optional[str] = _f(None, "Hub dataset id, e.g. 'eli5_category'. Default: the bundled sample.")
    dataset_config_name: Optional[str] = _f(None, "Configuration name of the Hub dataset.")
    dataset_split: str = _f("train", "Split to load, with slicing, e.g. 'train[:5000]'.")
    train_file: Optional[str] = _f(None, "Local data file: .jsonl, .json, .csv, .txt or .parquet.")
    text_column: Optional[str] = _f(
        None, "Column holding the text. Default: 'answers.text' (ELI5 layout, answers joined with a space), "
        "else 'text'.")
    prompt_column: Optional[str] = _f(
        None, "Prompt/completion data: the column holding the prompt (default: 'prompt' when the data has "
        "'prompt' and 'completion' columns). For ELI5: --prompt_column title --completion_column answers.text.")
    completion_column: Optional[str] = _f(
        None, "Prompt/completion data: the column holding the completion (lists are joined with a space, as "
        "ELI5's answers). The completion follows the prompt directly and ends with EOS.")
    chat_template: Optional[str] = _f(
        None, "Conversational data (a 'messages' column of {role, content} lists): a Jinja chat template file "
        "to render them with, instead of the tokenizer's own; it is saved with the model.")
    completion_only_loss: Optional[bool] = _f(
        None, "Prompt/completion data: train on the completion and its EOS only, not the prompt (default: on; "
        "--no_completion_only_loss trains on every token).")
    assistant_only_loss: Optional[bool] = _f(
        None, "Conversational data: train on the assistant turns and their end-of-turn only (default: on; "
        "--no_assistant_only_loss trains on every token).")
    packing: Optional[Packing] = _f(
        None, "How examples become rows of --block_size tokens. 'wrapped': concatenated and cut (the guide's "
        "group_texts; the default for plain text). 'bfd': whole examples placed by best-fit decreasing, positions "
        "restarting per example and no attention across examples (the default for prompt/completion and "
        "messages). 'none': one example per row, padded. With bfd and none, longer examples are split.")
    test_size: float = _f(0.2, "Fraction of rows held out for evaluation (split before tokenizing, as the guide).")
    split_seed: int = _f(
        42, "Seed of that split (the guide's train_test_split seed). Apart from --seed, so runs with different "
        "seeds, and `clm evaluate` on any of them, hold out the same rows.")
    seed: int = _f(42, "Random seed for weight init, data order and sampling (the row split has --split_seed).")
    block_size: int = _f(128, "Tokens per row (training example): see --packing.")
    join_with_eos: bool = _f(True, "Put the EOS token between documents so the model learns where a text "
                                   "ends. --no_join_with_eos reproduces the guide's blocks exactly.")
    keep_remainder: bool = _f(False, "Pad the final partial block (padding ignored in the loss) instead of "
                                     "dropping it.")
    preprocessing_num_workers: Optional[int] = _f(None, "Processes for tokenizing. Default: the machine's cores.")
    validation_file: Optional[str] = _f(
        None, "Local file to evaluate on (same formats as --train_file): the eval split is this whole file and "
        "the training data is not split (--test_size, and --eval_samples with --streaming, are then unused).")
    max_train_samples: Optional[int] = _f(
        None, "Keep only the first N training rows (documents, after the split) before tokenizing and packing, "
        "for quick runs. With --streaming: the first N rows of the training stream.")
    max_eval_samples: Optional[int] = _f(
        None, "Keep only the first N eval rows (documents) before tokenizing and packing. With --streaming only "
        "together with --validation_file (else --eval_samples sets the eval rows).")
    streaming: bool = _f(False, "Stream the data instead of preparing it on disk (needs --max_steps).")
    eval_samples: int = _f(200, "With --streaming: rows taken from the start of the stream for evaluation.")
    overwrite_cache: bool = _f(False, "Prepare the data again even if a prepared copy is cached.")

    # --- output
    output_dir: str = _f("clm-output", "Where the model, checkpoints, logs and results are written.")
    overwrite_output_dir: bool = _f(False, "Start fresh in an output_dir that holds an earlier run.")
    resume_from_checkpoint: Optional[str] = _f(
        None, "Checkpoint directory to resume from. Default: the newest complete checkpoint in output_dir.")
    save_steps: Optional[int] = _f(None, "Save a checkpoint every N optimizer steps (default: every epoch).")
    save_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints, deleting the oldest.")
    logging_steps: int = _f(10, "Log the training loss every N steps.")
    report_to: list[str] = _f(
        ["tensorboard"], "Where to log, as the Trainer's --report_to: tensorboard (under output_dir/runs), wandb, "
        "mlflow, comet_ml, ... , all or none; several may be given. The tf backend takes tensorboard, wandb and "
        "mlflow (their Keras callbacks).")

    # --- evaluation during training
    eval_strategy: Optional[EvalStrategy] = _f(
        None, "When to evaluate during training: 'steps' (every --eval_steps), 'epoch', or 'no'. Default: at "
        "each checkpoint (every --save_steps, else every epoch). clm always evaluates before and after training.")
    eval_steps: Optional[int] = _f(
        None, "Evaluate every N optimizer steps (implies --eval_strategy steps). Default with --eval_strategy "
        "steps: --save_steps, else --logging_steps.")
    early_stopping_patience: Optional[int] = _f(
        None, "Stop training after N evaluations in a row whose eval loss does not beat the best so far by more "
        "than --early_stopping_threshold (the Trainer's EarlyStoppingCallback; the same rule on tf).")
    early_stopping_threshold: float = _f(
        0.0, "With --early_stopping_patience: the eval-loss improvement that counts as one.")
    load_best_model_at_end: bool = _f(
        False, "Make the checkpoint with the lowest eval loss the final model. Evaluations must fall on "
        "checkpoints: --eval_strategy as the save schedule, --save_steps a multiple of --eval_steps.")
    sample_prompts: Optional[list[str]] = _f(
        None, "Prompts continued at each evaluation with the generation settings (seeded by --seed), logged to "
        "TensorBoard as text; the last ones go in the model card. Default: the opening words of the first "
        "eval documents.")
    sample_max_new_tokens: int = _f(12, "New tokens per sample generation at each evaluation (0: no samples).")

    # --- optimisation (the same meaning on both backends)
    num_train_epochs: float = _f(3.0, "Passes over the training data.")
    max_steps: int = _f(-1, "If > 0: total optimizer steps, overriding num_train_epochs.")
    learning_rate: Optional[float] = _f(
        None, f"Peak AdamW learning rate. Default: {FINETUNE_LEARNING_RATE} (the guide's) for a pretrained "
        f"model ({LORA_LEARNING_RATE} with --lora_r), {FROM_SCRATCH_LEARNING_RATE} for the built-in model "
        "trained from scratch.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    lr_scheduler_type: SchedulerType = _f(
        "linear", "Learning-rate schedule: 'linear' or 'cosine' decay after warmup, or 'constant' (no warmup, as "
        "the Trainer's).")
    warmup_steps: int = _f(0, "Steps of linear warmup from 0 to the peak learning rate.")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of total steps (used when warmup_steps is 0).")
    per_device_train_batch_size: int = _f(8, "Training blocks per device (per replica) per step.")
    per_device_eval_batch_size: int = _f(8, "Evaluation blocks per device per step.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches summed before each optimizer step.")

    # --- speed and scale
    fp16: bool = _f(False, "Mixed precision with float16 (GPU).")
    bf16: bool = _f(False, "Mixed precision with bfloat16.")
    jit_compile: bool = _f(
        True, "TensorFlow: compile the train and eval steps with XLA (about 2x the tokens/s on CPU, same results "
        "within float rounding; off for several CPU replicas, where TF has no XLA collectives); --no_jit_compile "
        "runs them as plain tf.functions.")
    torch_compile: bool = _f(False, "PyTorch: compile the model with torch.compile (TrainingArguments.torch_compile): "
                                    "faster steps on GPUs after a compilation of a minute or so.")
    dataloader_num_workers: int = _f(0, "PyTorch: worker processes loading batches (0: in the training process). "
                                        "Batches are collated from prepared blocks, so 0-2 is usually enough.")
    tf_strategy: TfStrategy = _f("auto", "TensorFlow distribution strategy (tf, and keras on TensorFlow: "
                                         "one_device or mirrored). auto: multi_worker when TF_CONFIG names several "
                                         "workers, mirrored on several GPUs, else one_device.")
    fsdp: str = _f("", "PyTorch: FSDP options passed to TrainingArguments, e.g. 'full_shard auto_wrap'.")
    deepspeed: Optional[str] = _f(None, "PyTorch: DeepSpeed config file passed to TrainingArguments.")
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in the backward pass instead of keeping them: less memory, about a third "
        "more time. PyTorch only (transformers' TF models do not implement it).")

    # --- LoRA (parameter-efficient fine-tuning, PEFT's format on every backend)
    lora_r: int = _f(0, "LoRA rank: train rank-r updates of --lora_target_modules with every other weight frozen "
                        "(0: full fine-tuning). Writes the adapter to output_dir/adapter (PEFT's format) and the "
                        "merged model to output_dir.")
    lora_alpha: float = _f(16.0, "LoRA scaling: the update is multiplied by lora_alpha / lora_r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA branch's input.")
    lora_target_modules: Optional[list[str]] = _f(
        None, "Layer names to adapt (e.g. q_proj v_proj), or all-linear. Default: PEFT's for the model family "
        "(c_attn for GPT-2; q_proj v_proj for OPT, Mistral, Llama, Qwen2, GPT-J).")

    # --- hub
    push_to_hub: bool = _f(False, "Upload the model to the Hub (token from HF_TOKEN or `hf auth login`).")
    hub_model_id: Optional[str] = _f(None, "Hub repository for --push_to_hub, e.g. 'user/my-model'.")
    hub_strategy: HubStrategy = _f(
        "every_save", "When --push_to_hub uploads, as the Trainer's: 'end' (once, at the end), 'every_save' (also "
        "each checkpoint's model, in the background), 'checkpoint' (and the newest checkpoint in full under "
        "last-checkpoint/, to resume from), 'all_checkpoints' (and every checkpoint under its own name).")
    hub_private_repo: bool = _f(False, "Create the Hub repository as private (no effect on an existing one).")

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # a config file or library call may give one name
            self.report_to = [self.report_to]
        if isinstance(self.sample_prompts, str):
            self.sample_prompts = [self.sample_prompts]
        self._check_numbers()
        check_choices(self)
        self._check_report_to()
        self._check_conflicts()
        self._check_eval_schedule()

    def _check_report_to(self) -> None:
        unknown = [name for name in self.report_to if name not in REPORT_TO_NAMES]
        if unknown:
            raise ConfigError(f"--report_to {unknown[0]!r} is not one of: {', '.join(REPORT_TO_NAMES)}")
        if len(self.report_to) > 1 and ("none" in self.report_to or "all" in self.report_to):
            raise ConfigError("--report_to none (or all) goes alone; drop the other names")

    def _check_eval_schedule(self) -> None:
        """Early stopping and the best model need evaluations; the best model needs them at checkpoints (the
        Trainer's own rules, so both backends refuse the same flags in one line)."""
        kind, every = self.eval_schedule
        if self.eval_strategy == "no" and self.eval_steps:
            raise ConfigError("--eval_steps given with --eval_strategy no; drop one")
        if kind == "no" and (self.early_stopping_patience or self.load_best_model_at_end):
            raise ConfigError("--early_stopping_patience and --load_best_model_at_end need evaluations; drop "
                              "--eval_strategy no")
        if self.load_best_model_at_end:
            if (kind == "steps") != (self.save_steps is not None):
                raise ConfigError(f"--load_best_model_at_end needs evaluations at checkpoints: checkpoints are "
                                  f"{'every --save_steps' if self.save_steps else 'each epoch'} and evaluations "
                                  f"{'every --eval_steps' if kind == 'steps' else 'each epoch'}; use the same "
                                  "schedule for both")
            if kind == "steps" and self.save_steps % every:
                raise ConfigError(f"--load_best_model_at_end needs --save_steps ({self.save_steps}) to be a "
                                  f"multiple of --eval_steps ({every})")

    def _check_numbers(self) -> None:
        positive = {
            "num_train_epochs": self.num_train_epochs,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "block_size": self.block_size,
            "logging_steps": self.logging_steps,
            "eval_samples": self.eval_samples,
        }
        if self.learning_rate is not None:
            positive["learning_rate"] = self.learning_rate
        for name, value in positive.items():
            if value is None or value <= 0:
                raise ConfigError(f"--{name} must be positive, got {value}")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        for name in ("save_steps", "save_total_limit", "preprocessing_num_workers", "max_train_samples",
                     "max_eval_samples", "eval_steps", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be positive, got {value}")
        if self.early_stopping_threshold < 0 or self.sample_max_new_tokens < 0:
            raise ConfigError("--early_stopping_threshold and --sample_max_new_tokens must be >= 0")
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"--test_size must be between 0 and 1 (exclusive), got {self.test_size}")
        if self.weight_decay < 0 or not 0.0 <= self.warmup_ratio < 1.0 or self.warmup_steps < 0:
            raise ConfigError("--weight_decay and --warmup_steps must be >= 0 and --warmup_ratio in [0, 1)")
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_r must be >= 0, --lora_alpha positive and --lora_dropout in [0, 1); got "
                              f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")

    def _check_conflicts(self) -> None:
        """Conflicting flags: say which two, and what to drop."""
        if self.dataset_name and self.train_file:
            raise ConfigError("--dataset_name and --train_file both given; use one data source")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 both given; choose one precision")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ConfigError("--overwrite_output_dir and --resume_from_checkpoint both given; "
                              "drop one (overwrite starts fresh, resume continues)")
        if self.streaming and self.max_steps <= 0:
            raise ConfigError("--streaming needs --max_steps (a stream has no known length)")
        if self.streaming and self.max_eval_samples is not None and not self.validation_file:
            raise ConfigError("--max_eval_samples with --streaming: the eval split is the first --eval_samples "
                              "rows of the stream; set --eval_samples instead, or give a --validation_file")
        if self.streaming and self.keep_remainder:
            raise ConfigError("--keep_remainder is not supported with --streaming; drop one")
        if bool(self.prompt_column) != bool(self.completion_column):
            raise ConfigError("--prompt_column and --completion_column go together; give both")
        if self.prompt_column and self.text_column:
            raise ConfigError("--text_column and --prompt_column both given; use --text_column for plain text or "
                              "--prompt_column/--completion_column for prompt/completion data")
        if self.keep_remainder and self.packing in ("bfd", "none"):
            raise ConfigError(f"--keep_remainder is for --packing wrapped (bfd and none pad every row already); "
                              f"drop it or --packing {self.packing}")
        if self.lora_target_modules and not self.lora_r:
            raise ConfigError("--lora_target_modules given without --lora_r; add --lora_r 8 (for example) or drop it")
        if self.hub_model_id and not self.push_to_hub:
            raise ConfigError("--hub_model_id given without --push_to_hub; add --push_to_hub or drop it")
        if not self.push_to_hub and (self.hub_private_repo or self.hub_strategy != "every_save"):
            raise ConfigError("--hub_strategy or --hub_private_repo given without --push_to_hub; add --push_to_hub "
                              "or drop them")
        if self.output_dir and os.path.isfile(self.output_dir):
            raise ConfigError(f"--output_dir {self.output_dir!r} is a file; give a directory path")

    # --- derived values
    @property
    def eval_schedule(self) -> tuple[str, Optional[int]]:
        """("steps", N), ("epoch", None) or ("no", None): when training evaluates (see --eval_strategy)."""
        kind = self.eval_strategy or ("steps" if self.eval_steps or self.save_steps else "epoch")
        if kind != "steps":
            return kind, None
        return kind, self.eval_steps or self.save_steps or self.logging_steps

    def reports(self, name: str) -> bool:
        """Whether --report_to asks for ``name`` ("all" asks for every installed one)."""
        return name in self.report_to or "all" in self.report_to

    @property
    def uses_builtin_model(self) -> bool:
        return self.model_name_or_path is None

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.uses_builtin_model:
            return FROM_SCRATCH_LEARNING_RATE
        return LORA_LEARNING_RATE if self.lora_r else FINETUNE_LEARNING_RATE

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """``TrainConfig.from_preset("guide", output_dir="out")``, the same as ``TrainConfig(preset="guide", ...)``."""
        return cls(**{**overrides, "preset": name})
