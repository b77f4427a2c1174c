"""`ringwise finetune --model PATH --text FILES`: context extension of a pretrained transformers
model on your text, on the training job's machinery (ringwise.train.pretrained)."""

from __future__ import annotations

from .train import run


def add_arguments(parser) -> None:
    from ..train.config import add_finetune_arguments

    add_finetune_arguments(parser)


def main(args) -> int:
    return run(args, "finetune")
