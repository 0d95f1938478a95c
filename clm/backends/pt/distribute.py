"""Process topology under torchrun / accelerate: the Trainer's TrainingArguments start the process group."""

from __future__ import annotations

import os
from typing import Optional

from transformers import TrainingArguments


def is_main_process(args: Optional[TrainingArguments]) -> bool:
    return args.process_index == 0 if args else int(os.environ.get("RANK", "0")) == 0


def world_size(args: Optional[TrainingArguments]) -> int:
    return args.world_size if args else int(os.environ.get("WORLD_SIZE", "1"))


def leave_together() -> None:
    """A process that exits while its gloo/NCCL group is alive can abort in the group's destructor
    ("terminate called without an active exception"), failing a finished torchrun job: leave together."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
