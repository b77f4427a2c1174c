"""The line retrieval task (Ring Attention paper, section 5.4) and its evaluation.

Many ``line <id>: REGISTER_CONTENT is <number>`` lines, then a question naming one line
(the needle, placed at a chosen depth) and its number as the answer. Shorter formats say
the same with far fewer tokens; the ``registers`` format with recurring ids (``id_pool``)
is what a tiny model learns on a CPU in minutes (see BENCHMARKS.md, "The demo").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..model import IGNORE_INDEX
from .sampling import _rng, collate
from .text import ByteTokenizer


@dataclass(frozen=True)
class RetrievalFormat:
    """Text templates of the retrieval task; ``{id}`` and ``{value}`` are filled in.

    One template set per format keeps a single code path for the paper's wording and
    the compact one.  Each line must have the same length for every id/value of the
    configured digit counts (true for any template, since ids and values have fixed
    width), which is what lets the dataset fill ``seq_len`` exactly.
    """

    line: str
    question: str
    answer: str = "{value}"


RETRIEVAL_FORMATS: dict[str, RetrievalFormat] = {
    # LongChat / Ring Attention paper wording (section 5.4).
    "paper": RetrievalFormat(
        line="line {id}: REGISTER_CONTENT is {value}\n",
        question="Tell me what is the REGISTER_CONTENT in line {id}? ",
    ),
    # Same task, ~3x fewer tokens per line: learnable by a tiny model on a CPU.
    "compact": RetrievalFormat(line="{id}:{value}\n", question="?{id}="),
    # Value then key with nothing between.
    "pairs": RetrievalFormat(line="{value}{id}\n", question="?{id}"),
    # Register file: key then value, one digit each by default; with ``id_pool`` the
    # registers recur and every recurrence is itself a retrieval (the demo's task).
    "registers": RetrievalFormat(line="{id}{value}\n", question="?{id}"),
}

DEFAULT_DIGITS = {"paper": (5, 5), "compact": (4, 4), "pairs": (4, 4), "registers": (1, 1)}


class RetrievalDataset(torch.utils.data.Dataset):
    """Synthetic line-retrieval examples of exactly ``seq_len`` tokens.

    Layout: ``BOS, line_0 ... line_{n-1}, question(needle id), answer, PAD...``.  As
    many lines as fit are used (``n_lines``, the same for every index); the answer sits
    at the very end so the whole document is context, and the few leftover positions
    (fewer than one line) are PAD after it.  Ids are distinct random ``id_digits``-digit
    integers, values random ``value_digits``-digit integers; the needle is line
    ``depth * (n_lines - 1)`` rounded half up, so depth 0 is the first line and 1 the last.

    Args:
        seq_len: tokens per example.
        seed: with the index, the only source of randomness (see module docstring).
        depth: needle depth in [0, 1]; ``None`` draws it uniformly per example.
        fmt: ``"compact"`` (``<id>:<value>\\n`` lines, ``?<id>=`` question), ``"paper"`` (the
            paper's wording), ``"pairs"`` (``<value><id>``), ``"registers"`` (``<id><value>``,
            one digit each: the demo's task, with ``id_pool``) or a ``RetrievalFormat``.
        id_digits, value_digits: widths; default 4/4 for compact, 5/5 for paper.
            Longer contexts need more id digits (ids must be distinct).
        loss_on: ``"answer"`` puts labels only on the answer tokens; ``"recall"`` also on
            the value of every line whose id already occurred earlier in the example (each
            such line is a retrieval question too: dense targets for training); ``"all"``
            on every real next token (PAD targets are always ignored).
        id_pool: if given, haystack lines draw their ids *with replacement* from a pool of
            this many ids (each id keeps one value, so a repeated line is identical) and the
            needle's id occurs in the needle line only.  Lets short ids fill long contexts,
            and with ``loss_on="recall"`` gives many retrieval targets per example.  At a
            fixed depth the documents of different depths differ only in the needle line
            and the line it replaced.
        decoys: with ``id_pool``, this many other ids also occur exactly once, at random
            lines, so the needle is not the only line seen once: answering then needs the
            question's id, not "the line that does not repeat" (an evaluation control).
        questions: question/answer pairs at the end (default 1, the paper's task). More
            pairs give training many retrieval targets per sequence (associative-recall
            style); the last pair is always the needle at ``depth``, the others ask about
            random lines.
        id_chars: if given, each id is one character of this string (single-token keys,
            as in associative recall) instead of an ``id_digits``-digit number.
        length: ``len(self)``; indices are unbounded in principle, any
            ``0 <= index < length`` is a fresh example.  Default 2**31.
    """

    def __init__(
        self,
        seq_len: int,
        seed: int = 0,
        depth: float | None = None,
        fmt: str | RetrievalFormat = "compact",
        id_digits: int | None = None,
        value_digits: int | None = None,
        loss_on: str = "answer",
        length: int = 2**31,
        questions: int = 1,
        id_chars: str | None = None,
        id_pool: int | None = None,
        decoys: int = 0,
    ):
        if isinstance(fmt, str):
            if fmt not in RETRIEVAL_FORMATS:
                raise ValueError(f"fmt must be one of {sorted(RETRIEVAL_FORMATS)} or a RetrievalFormat, got {fmt!r}")
            default_digits = DEFAULT_DIGITS[fmt]
            fmt = RETRIEVAL_FORMATS[fmt]
        else:
            default_digits = DEFAULT_DIGITS["paper"]
        self.fmt = fmt
        self.id_digits = default_digits[0] if id_digits is None else int(id_digits)
        self.value_digits = default_digits[1] if value_digits is None else int(value_digits)
        if self.id_digits < 1 or self.value_digits < 1:
            raise ValueError(f"id_digits and value_digits must be >= 1, got {self.id_digits}, {self.value_digits}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1] or None, got {depth}")
        if loss_on not in ("answer", "recall", "all"):
            raise ValueError(f"loss_on must be 'answer', 'recall' or 'all', got {loss_on!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if questions < 1:
            raise ValueError(f"questions must be >= 1, got {questions}")
        self.questions = int(questions)
        if id_chars is not None and (len(set(id_chars)) != len(id_chars) or not id_chars or not id_chars.isascii()):
            raise ValueError("id_chars must be a non-empty string of distinct ASCII characters")
        self.id_chars = id_chars
        self.seq_len = int(seq_len)
        self.seed = seed
        self.depth = depth
        self.loss_on = loss_on
        self.length = int(length)
        self.tokenizer = ByteTokenizer()

        # Fixed widths make every line, question and answer a fixed number of bytes.
        some_id, some_value = 10 ** (self.id_digits - 1), 10 ** (self.value_digits - 1)
        if self.id_chars:
            some_id = self.id_chars[0]
        self.line_len = len(self._line(some_id, some_value))
        self.question_len = len(fmt.question.format(id=some_id).encode())
        self.answer_len = len(fmt.answer.format(value=some_value).encode())
        room = self.seq_len - 1 - self.questions * (self.question_len + self.answer_len)  # 1 for BOS
        self.n_lines = room // self.line_len if room > 0 else 0
        if self.n_lines < 1:
            need = 1 + self.line_len + self.questions * (self.question_len + self.answer_len)
            raise ValueError(
                f"seq_len={self.seq_len} is too short for one line plus question and answer; need >= {need}"
            )
        n_ids = len(self.id_chars) if self.id_chars else 9 * 10 ** (self.id_digits - 1)
        if id_pool is not None and (
            not isinstance(id_pool, int) or isinstance(id_pool, bool) or not 2 <= id_pool <= n_ids
        ):
            raise ValueError(f"id_pool must be an int between 2 and the {n_ids} distinct ids, got {id_pool!r}")
        self.id_pool = id_pool
        if not isinstance(decoys, int) or decoys < 0:
            raise ValueError(f"decoys must be an int >= 0, got {decoys!r}")
        if decoys and (id_pool is None or decoys > id_pool - 2 or decoys >= self.n_lines):
            raise ValueError(
                f"decoys={decoys} needs id_pool with at least decoys + 2 ids (the needle, the decoys "
                f"and one recurring id) and fewer decoys than the {self.n_lines} lines"
            )
        self.decoys = decoys
        if loss_on == "recall":
            if id_pool is None:
                raise ValueError("loss_on='recall' labels lines whose id recurs; without id_pool no id recurs")
            if fmt.line.index("{value}") < fmt.line.index("{id}"):
                raise ValueError(
                    "loss_on='recall' needs a line format with the id before the value "
                    "(the value is only predictable once its id has been read)"
                )
        if self.id_pool is None and self.n_lines > n_ids:
            raise ValueError(
                f"seq_len={self.seq_len} holds {self.n_lines} lines but only {n_ids} distinct ids exist; "
                + ("use more id_chars" if self.id_chars else "raise id_digits")
                + ", or let ids recur (id_pool)"
            )

    def _line(self, id_: int | str, value: int) -> bytes:
        return self.fmt.line.format(id=id_, value=value).encode()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for RetrievalDataset of length {self.length}")
        rng = _rng("retrieval", self.seed, int(index))
        lo_id, lo_val = 10 ** (self.id_digits - 1), 10 ** (self.value_digits - 1)
        id_space: Sequence[int | str] = self.id_chars or range(lo_id, 10 * lo_id)  # ids: numbers or characters
        if self.id_pool is None:
            ids = rng.sample(id_space, self.n_lines)
            values = [rng.randrange(lo_val, 10 * lo_val) for _ in range(self.n_lines)]
        else:  # pool[0]: the needle; pool[1:1+decoys]: once each; the haystack repeats the rest
            pool = rng.sample(id_space, self.id_pool)
            value_of = {i: rng.randrange(lo_val, 10 * lo_val) for i in pool}
            ids = [rng.choice(pool[1 + self.decoys :]) for _ in range(self.n_lines)]
            decoy_lines = rng.sample(range(self.n_lines), self.decoys + 1) if self.decoys else []
        # Draw the needle last: for a fixed depth the document does not depend on depth,
        # so a grid over depths compares the same documents.
        if self.depth is None:
            needle = rng.randrange(self.n_lines)
        else:
            needle = math.floor(self.depth * (self.n_lines - 1) + 0.5)  # round half up
        if self.id_pool is not None:
            for decoy, line in zip(pool[1 : 1 + self.decoys], [n for n in decoy_lines if n != needle]):
                ids[line] = decoy
            ids[needle] = pool[0]
            values = [value_of[i] for i in ids]

        asked = [rng.randrange(self.n_lines) for _ in range(self.questions - 1)] + [needle]
        doc = b"".join(self._line(i, v) for i, v in zip(ids, values))
        pairs = [
            (self.fmt.question.format(id=ids[a]).encode(), self.fmt.answer.format(value=values[a]).encode())
            for a in asked
        ]
        answer = pairs[-1][1]
        text = torch.frombuffer(bytearray(doc + b"".join(q + a for q, a in pairs)), dtype=torch.uint8)

        input_ids = torch.full((self.seq_len,), ByteTokenizer.PAD, dtype=torch.long)
        input_ids[0] = ByteTokenizer.BOS
        input_ids[1 : 1 + len(text)] = text
        end = 1 + len(text)
        start = end - len(answer)

        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        if self.loss_on in ("answer", "recall"):
            a_end = end
            for _, a in reversed(pairs):  # every answer, walking back from the end
                labels[a_end - len(a) - 1 : a_end - 1] = input_ids[a_end - len(a) : a_end]
                a_end -= len(a) + self.question_len
        else:
            labels[: end - 1] = input_ids[1:end]
        if self.loss_on == "recall":  # the value of every line whose id occurred before
            value_at = len(self.fmt.line.split("{value}")[0].format(id=ids[0]).encode())
            seen = set()
            for n, (i, v) in enumerate(zip(ids, values)):
                if i in seen:
                    at = 1 + n * self.line_len + value_at
                    width = len(str(v))
                    labels[at - 1 : at - 1 + width] = input_ids[at : at + width]
                seen.add(i)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "answer_span": (start, end),
            "depth": needle / (self.n_lines - 1) if self.n_lines > 1 else 0.0,
            "needle_line": needle,
        }


def retrieval_eval_grid(
    context_lengths: Sequence[int],
    depths: Sequence[float],
    n_per_cell: int,
    seed: int = 1_000_003,
    **dataset_kwargs,
) -> dict[tuple[int, float], list[dict]]:
    """Deterministic examples for the needle-in-a-haystack accuracy heatmap.

    Returns ``{(context_length, depth): [n_per_cell examples]}`` in grid order.  Cell
    examples are indices ``0..n-1`` of ``RetrievalDataset(context_length, seed, depth,
    **dataset_kwargs)``; at a given length all depths share the same documents, only the
    needle moves.  Use a seed different from training's (the default is deliberately
    odd) so evaluation never replays training documents.
    """
    grid = {}
    for length in context_lengths:
        for depth in depths:
            ds = RetrievalDataset(length, seed=seed, depth=depth, **dataset_kwargs)
            grid[(int(length), float(depth))] = [ds[i] for i in range(n_per_cell)]
    return grid


@torch.no_grad()
def retrieval_accuracy(
    model, lengths: Sequence[int], depths: Sequence[float], per_cell: int, *, device=None, **task
) -> list[list[float]]:
    """Accuracy[depth][length] of a sequence-parallel model on the evaluation grid.

    An answer counts only if every one of its tokens is the greedy prediction (`model.predict`).
    Each rank holds one shard of every sequence, cut as the model's ring (`model.ring`, a
    SeqShard) cuts it; hits are summed over the ring's groups on `device` tensors, so this runs
    under gloo and NCCL alike."""
    grid = retrieval_eval_grid(lengths, depths, per_cell, **task)
    seqshard = model.ring
    was_training = model.training
    model.eval()
    acc = {}
    for (L, depth), examples in grid.items():
        batch = collate(examples)  # labels are already next-token targets: sharded as they are
        ids, labels = (seqshard.shard(batch[k]).to(device) for k in ("input_ids", "labels"))
        pred, mask = model.predict(ids, seqshard.positions(L, device=device), labels)
        hits = torch.zeros(labels.shape, dtype=torch.bool, device=device)
        hits[mask] = pred == labels[mask]
        counts = seqshard.all_reduce(torch.stack([(hits & mask).sum(1), mask.sum(1)]).double())
        acc[(L, depth)] = (counts[0] == counts[1]).double().mean().item()
    model.train(was_training)
    return [[acc[(L, d)] for L in lengths] for d in depths]
