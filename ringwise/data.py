"""Data for the sequence-parallel training job.

Three sources of examples, all yielding the same dict format so the training loop does
not care which one it reads:

* ``RetrievalDataset``: the synthetic long-context *line retrieval* task of the Ring
  Attention paper's evaluation (section 5.4, Fig. 3): many ``line <id>: REGISTER_CONTENT
  is <number>`` lines, then a question naming one line (the needle, placed at a chosen
  depth) and its number as the answer.  Shorter formats say the same with far fewer tokens;
  the ``registers`` format with recurring ids (``id_pool``) is what a tiny model learns on a
  CPU in minutes (see BENCHMARKS.md, "The demo", for why).
* ``PackedTextDataset``: plain UTF-8 text files, packed into fixed-length windows.
* Helpers: ``sample_indices`` (which dataset indices form the global batch at a step),
  ``collate``, ``retrieval_eval_grid`` and ``answer_correct`` for the accuracy heatmap.

Every example is a pure function of ``(seed, index)``: nothing depends on worker count,
world size or the order in which examples are asked for, so a resumed or re-sharded run
sees exactly the same data.

Example dict (``seq_len`` tokens)::

    input_ids   LongTensor[seq_len]
    labels      LongTensor[seq_len]   labels[t] = token to predict at position t
                                      (input_ids shifted left by one); IGNORE_INDEX = -100
                                      where there is no loss
    answer_span (start, end)          positions of the answer in input_ids, end exclusive;
                                      (0, 0) when the example has no answer
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "RetrievalFormat",
    "RETRIEVAL_FORMATS",
    "RetrievalDataset",
    "retrieval_eval_grid",
    "answer_correct",
    "PackedTextDataset",
    "sample_indices",
    "collate",
]

IGNORE_INDEX = -100
"""Label value that the loss ignores (``torch.nn.functional.cross_entropy`` default)."""


def _rng(*parts) -> random.Random:
    """A ``random.Random`` keyed by ``parts``.

    Seeding with a string hashes it with SHA-512 (Python's seed version 2), so the
    stream is stable across processes, platforms and Python's hash randomisation, and
    distinct keys such as (seed, index) never collide the way ``seed * K + index`` can.
    """
    return random.Random("ringwise/" + "/".join(str(p) for p in parts))


# --------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then PAD, BOS, EOS.

    No vocabulary file, no training, every string round-trips, and a digit is one
    token, which keeps the retrieval task's token counts exact and predictable.

    ``num_tokens`` (259) is the number of ids the tokenizer can produce;
    ``vocab_size`` is that count rounded up to ``pad_to_multiple_of`` (default 8, giving
    264) and is what an embedding / output layer should be sized with: tensor-core
    friendly, and the extra rows are simply never targets.
    """

    PAD = 256
    BOS = 257
    EOS = 258

    def __init__(self, pad_to_multiple_of: int = 8):
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of

    pad_id = property(lambda self: self.PAD)
    bos_id = property(lambda self: self.BOS)
    eos_id = property(lambda self: self.EOS)

    @property
    def num_tokens(self) -> int:
        """Ids actually produced: 256 bytes + 3 specials = 259."""
        return 259

    @property
    def vocab_size(self) -> int:
        """Embedding size to use: ``num_tokens`` rounded up to ``pad_to_multiple_of``."""
        m = self.pad_to_multiple_of
        return -(-self.num_tokens // m) * m

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def encode_tensor(self, text: str | bytes) -> torch.Tensor:
        """Encode to a uint8 tensor without a Python list (fast path for big corpora)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Bytes back to text; special and out-of-range ids are skipped, bad UTF-8 replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------- line retrieval


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
            raise ValueError(f"seq_len={self.seq_len} is too short for one line plus question and answer; need >= {need}")
        n_ids = len(self.id_chars) if self.id_chars else 9 * 10 ** (self.id_digits - 1)
        if id_pool is not None and (not isinstance(id_pool, int) or isinstance(id_pool, bool)
                                    or not 2 <= id_pool <= n_ids):
            raise ValueError(f"id_pool must be an int between 2 and the {n_ids} distinct ids, got {id_pool!r}")
        self.id_pool = id_pool
        if not isinstance(decoys, int) or decoys < 0:
            raise ValueError(f"decoys must be an int >= 0, got {decoys!r}")
        if decoys and (id_pool is None or decoys > id_pool - 2 or decoys >= self.n_lines):
            raise ValueError(f"decoys={decoys} needs id_pool with at least decoys + 2 ids (the needle, the decoys "
                             f"and one recurring id) and fewer decoys than the {self.n_lines} lines")
        self.decoys = decoys
        if loss_on == "recall":
            if id_pool is None:
                raise ValueError("loss_on='recall' labels lines whose id recurs; without id_pool no id recurs")
            if fmt.line.index("{value}") < fmt.line.index("{id}"):
                raise ValueError("loss_on='recall' needs a line format with the id before the value "
                                 "(the value is only predictable once its id has been read)")
        if self.id_pool is None and self.n_lines > n_ids:
            raise ValueError(
                f"seq_len={self.seq_len} holds {self.n_lines} lines but only {n_ids} distinct ids exist; "
                + ("use more id_chars" if self.id_chars else "raise id_digits") + ", or let ids recur (id_pool)"
            )

    def _line(self, id_: int, value: int) -> bytes:
        return self.fmt.line.format(id=id_, value=value).encode()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for RetrievalDataset of length {self.length}")
        rng = _rng("retrieval", self.seed, int(index))
        lo_id, lo_val = 10 ** (self.id_digits - 1), 10 ** (self.value_digits - 1)
        id_space = self.id_chars or range(lo_id, 10 * lo_id)
        if self.id_pool is None:
            ids = rng.sample(id_space, self.n_lines)
            values = [rng.randrange(lo_val, 10 * lo_val) for _ in range(self.n_lines)]
        else:  # pool[0]: the needle; pool[1:1+decoys]: once each; the haystack repeats the rest
            pool = rng.sample(id_space, self.id_pool)
            value_of = {i: rng.randrange(lo_val, 10 * lo_val) for i in pool}
            ids = [rng.choice(pool[1 + self.decoys:]) for _ in range(self.n_lines)]
            decoy_lines = rng.sample(range(self.n_lines), self.decoys + 1) if self.decoys else []
        # Draw the needle last: for a fixed depth the document does not depend on depth,
        # so a grid over depths compares the same documents.
        if self.depth is None:
            needle = rng.randrange(self.n_lines)
        else:
            needle = math.floor(self.depth * (self.n_lines - 1) + 0.5)  # round half up
        if self.id_pool is not None:
            for decoy, line in zip(pool[1:1 + self.decoys], [n for n in decoy_lines if n != needle]):
                ids[line] = decoy
            ids[needle] = pool[0]
            values = [value_of[i] for i in ids]

        asked = [rng.randrange(self.n_lines) for _ in range(self.questions - 1)] + [needle]
        doc = b"".join(self._line(i, v) for i, v in zip(ids, values))
        pairs = [(self.fmt.question.format(id=ids[a]).encode(), self.fmt.answer.format(value=values[a]).encode())
                 for a in asked]
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


def answer_correct(pred_ids: torch.Tensor, example: dict) -> bool:
    """True if the model's greedy predictions reproduce the whole answer.

    ``pred_ids`` is argmax over the vocabulary at every position, shape ``[seq_len]``
    (``[seq_len, vocab]`` logits are argmaxed here).  Position ``t`` predicts token
    ``t + 1``, so the answer ``input_ids[start:end]`` must equal
    ``pred_ids[start-1:end-1]``.  With teacher forcing, all answer tokens right is
    exactly the condition for greedy decoding to emit the answer.
    """
    if pred_ids.dim() == 2:
        pred_ids = pred_ids.argmax(dim=-1)
    start, end = (int(x) for x in example["answer_span"])
    if end <= start:
        raise ValueError("example has no answer span")
    target = example["input_ids"][start:end]
    return bool(torch.equal(pred_ids[start - 1 : end - 1].to(target.device).long(), target.long()))


# ------------------------------------------------------------------------ text corpora


class PackedTextDataset(torch.utils.data.Dataset):
    """Plain UTF-8 text files packed into one token stream and cut into windows.

    Each file is one document and ends with EOS.  Window ``i`` is tokens
    ``[i*seq_len, i*seq_len + seq_len + 1)``: its first ``seq_len`` tokens are the
    inputs and its last ``seq_len`` the labels, so consecutive windows share one token
    and every token of the stream (but the first) is a label exactly once.  A trailing
    partial window is dropped.  The stream is kept as uint16 (2 bytes per token).

    ``paths`` may be one path or a list; a directory stands for all files below it,
    sorted.  The tokenizer needs ``encode(text)`` and ``eos_id`` (default ByteTokenizer).
    """

    def __init__(self, paths, seq_len: int, tokenizer=None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = int(seq_len)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        if isinstance(paths, (str, Path)):
            paths = [paths]
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
            elif p.is_file():
                files.append(p)
            else:
                raise FileNotFoundError(f"PackedTextDataset: no such file or directory: {p}")
        if not files:
            raise ValueError(f"PackedTextDataset: no text files found in {list(map(str, paths))}")
        self.files = files

        vocab = getattr(self.tokenizer, "vocab_size", None)
        dtype = torch.uint16 if vocab is not None and vocab <= 2**16 else torch.int32
        eos = torch.tensor([self.tokenizer.eos_id], dtype=dtype)
        pieces = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            if hasattr(self.tokenizer, "encode_tensor"):
                pieces.append(self.tokenizer.encode_tensor(text).to(dtype))
            else:
                pieces.append(torch.tensor(self.tokenizer.encode(text), dtype=dtype))
            pieces.append(eos)
        self.tokens = torch.cat(pieces)
        n = self.tokens.numel()
        if n < self.seq_len + 1:
            raise ValueError(
                f"PackedTextDataset: the files hold {n} tokens (EOS included) but one window "
                f"needs seq_len + 1 = {self.seq_len + 1}; add text or lower seq_len"
            )
        self.n_windows = (n - 1) // self.seq_len

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n_windows:
            raise IndexError(f"index {index} out of range for PackedTextDataset of length {self.n_windows}")
        s = index * self.seq_len
        window = self.tokens[s : s + self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:], "answer_span": (0, 0)}


# ------------------------------------------------------------------- batching, resume

_PERM_LIMIT = 1 << 22  # above this, an O(1)-memory affine permutation replaces randperm


@lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_rng("perm", seed, epoch).getrandbits(63))
    return torch.randperm(n, generator=g)


def _epoch_affine(n: int, seed: int, epoch: int) -> tuple[int, int]:
    rng = _rng("affine", seed, epoch)
    while True:
        a = rng.randrange(1, n) if n > 1 else 1
        if math.gcd(a, n) == 1:
            return a, rng.randrange(n)


def sample_indices(step: int, global_batch: int, dataset_len: int | None, seed: int = 0) -> list[int]:
    """Dataset indices of the global batch at training ``step``, a pure function of its args.

    Samples are consumed as one stream, ``global_batch`` per step; stream position ``p``
    belongs to epoch ``p // dataset_len`` and maps through that epoch's seeded shuffle,
    so each epoch is a permutation of the dataset and resuming at step k replays exactly
    the batches an uninterrupted run would have seen (a batch may straddle two epochs).
    Datasets larger than 2**22 use a seeded affine permutation ``(a*p + b) mod n``
    instead of materialising one.  ``dataset_len=None`` means an unbounded i.i.d.
    dataset (e.g. ``RetrievalDataset``) and returns the stream positions themselves.

    Split the returned list across data-parallel replicas as you like; sequence-parallel
    ranks of one replica must all use the same indices.
    """
    if step < 0 or global_batch < 1:
        raise ValueError(f"need step >= 0 and global_batch >= 1, got step={step}, global_batch={global_batch}")
    positions = range(step * global_batch, (step + 1) * global_batch)
    if dataset_len is None:
        return list(positions)
    if dataset_len < 1:
        raise ValueError(f"dataset_len must be >= 1 or None, got {dataset_len}")
    out = []
    for p in positions:
        epoch, i = divmod(p, dataset_len)
        if dataset_len <= _PERM_LIMIT:
            out.append(int(_epoch_perm(dataset_len, seed, epoch)[i]))
        else:
            a, b = _epoch_affine(dataset_len, seed, epoch)
            out.append((a * i + b) % dataset_len)
    return out


def collate(examples: Sequence[dict]) -> dict:
    """Stack example dicts into a batch: tensors -> ``[batch, ...]``, numbers and tuples of
    numbers (``answer_span``, ``depth``) -> tensors, anything else -> list."""
    if not examples:
        raise ValueError("collate needs at least one example")
    batch = {}
    for key in examples[0]:
        vals = [ex[key] for ex in examples]
        if isinstance(vals[0], torch.Tensor):
            batch[key] = torch.stack(vals)
        elif isinstance(vals[0], (int, float, tuple, list)):
            batch[key] = torch.tensor(vals)
        else:
            batch[key] = vals
    return batch
