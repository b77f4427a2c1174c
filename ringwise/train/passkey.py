"""Passkey retrieval in a pretrained model's own tokens, through the ring (ringwise finetune's evaluation).

A document of exactly L tokens: filler sentences, a passkey sentence ("The pass key is 71432.
Remember it. 71432 is the pass key.") at a depth in [0, 1] of the filler, and at the end the
question "What is the pass key? The pass key is" followed by the key's tokens. The model reads the
whole document sharded over the ring (its length is not limited by one device); a document counts
as answered when the greedy prediction of every key token, teacher-forced, is right. Accuracy per
(depth, length) cell over --eval-per-cell documents (keys drawn from a seeded generator, the same on
every rank). The classic test of what a longer context bought (Mohtashami & Jaggi, 2023).
"""

from __future__ import annotations

import random

import torch

from ..model import IGNORE_INDEX

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"


def passkey_document(tokenizer, length: int, depth: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of `length` tokens; labels hold the key's next-token targets only."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question, answer = enc(QUESTION), enc(f" {key}")
    room = length - len(needle) - len(question) - len(answer)
    if room < 1:
        raise ValueError(
            f"a passkey document of {length} tokens has no room for filler (needs "
            f"{len(needle) + len(question) + len(answer) + 1} at least)"
        )
    filler_unit = enc(FILLER)
    filler = (filler_unit * (room // len(filler_unit) + 1))[:room]
    cut = round(depth * room)
    ids = filler[:cut] + needle + filler[cut:] + question + answer
    labels = [IGNORE_INDEX] * length
    start = length - len(answer)
    for i in range(start, length):
        labels[i - 1] = ids[i]  # the token before each answer token predicts it
    return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def passkey_accuracy(
    run, tokenizer, lengths, depths, per_cell: int, seed: int = 0, document=passkey_document
) -> list[list[float]]:
    """acc[depth][length]: the share of documents whose every key token the model predicts (greedy).
    document(tokenizer, length, depth, key) -> (input_ids, labels) makes each one."""
    rng = random.Random(seed)
    seqshard = run.seqshard
    acc = []
    was_training = run.model.training
    run.model.eval()
    try:
        for depth in depths:
            row = []
            for L in lengths:
                pos = seqshard.positions(L, device=run.device)
                answered = 0
                for _ in range(per_cell):
                    ids, labels = document(tokenizer, L, depth, str(rng.randint(10000, 99999)))
                    ids, labels = (seqshard.shard(t[None]).to(run.device) for t in (ids, labels))
                    predicted, keep = run.model.predict(ids, pos, labels, [0, L])
                    wrong = seqshard.all_reduce((predicted != labels[keep]).sum())  # the whole document's
                    answered += int(wrong.item() == 0)
                row.append(answered / per_cell)
            acc.append(row)
    finally:
        run.model.train(was_training)
    return acc
