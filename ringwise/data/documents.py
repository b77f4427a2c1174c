"""Documents in a pretrained model's own tokens, packed into sequences with their boundaries.

Sources: plain text files (each file one document), folders (every file below, sorted) and
JSONL files (`.jsonl`: each line's "text" field one document). Tokenized with the model's
tokenizer in batches, without its special tokens, and cached in ringwise's cache folder
(`cache_root()/tokens`: $RINGWISE_CACHE, else $XDG_CACHE_HOME/ringwise, else ~/.cache/ringwise;
never in the user's data folder), an entry per file keyed by its absolute path, size and mtime and
by the tokenizer, so a second run, and every rank of a run, reads ids instead of tokenizing again.

Packing: the documents, each followed by EOS, form one stream cut into windows of seq_len + 1
tokens (inputs and next-token labels, as PackedTextDataset). Each window carries its document
boundaries as `cu_seqlens` (attention stays inside each document: ring_attention's packed
documents) and `doc_offset`, the context each token sees (its position inside its document,
counted from the window's start at most: what perplexity by position is bucketed by); a label
that would cross into the next document is IGNORE_INDEX.
The last windows are held out for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..model import IGNORE_INDEX
from .text import text_files

LEGACY_CACHE_DIR = ".ringwise-tokens"  # where earlier versions cached beside the data: never read as text


def cache_root() -> Path:
    """ringwise's cache folder: $RINGWISE_CACHE, else $XDG_CACHE_HOME/ringwise, else ~/.cache/ringwise."""
    if os.environ.get("RINGWISE_CACHE"):
        return Path(os.environ["RINGWISE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ringwise"


def read_documents(path: Path) -> list[str]:
    """One file's documents: its "text" fields (JSONL) or its whole text."""
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{n}: a JSONL line needs a "text" string field')
        docs.append(record["text"])
    return docs


def tokenizer_key(tokenizer) -> str:
    """What makes two tokenizers give the same ids: its name, vocabulary and class."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{len(vocab)}-{digest}"


def _cache_path(path: Path, key: str) -> Path:
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{key}".encode()).hexdigest()[:20]
    return cache_root() / "tokens" / f"{path.name}.{tag}.pt"


def tokenize_file(path: Path, tokenizer, key: str, batch: int = 256) -> list[torch.Tensor]:
    """The file's documents as int32 id tensors, from the cache when it is there (written whole or not at all)."""
    cache = _cache_path(path, key)
    if cache.exists():
        return torch.load(cache, weights_only=True)["documents"]
    texts = read_documents(path)
    docs = []
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            docs.append(torch.tensor(ids, dtype=torch.int32))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # ranks tokenizing at once never share one
        torch.save({"documents": docs}, tmp)
        tmp.replace(cache)
    except OSError:  # a cache folder that cannot be written: tokenize again next time
        pass
    return docs


def tokenize_documents(paths, tokenizer) -> list[torch.Tensor]:
    key = tokenizer_key(tokenizer)
    return [d for f in text_files(paths, skip=LEGACY_CACHE_DIR) for d in tokenize_file(f, tokenizer, key) if d.numel()]


class PackedDocuments(torch.utils.data.Dataset):
    """Windows of seq_len tokens over the EOS-separated documents (see the module docstring)."""

    def __init__(self, documents: list[torch.Tensor], seq_len: int, eos_id: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        pieces, starts, pos = [], [], 0
        for d in documents:
            pieces += [d.to(torch.int64), torch.tensor([eos_id])]
            starts.append(pos)
            pos += d.numel() + 1
        self.seq_len = seq_len
        self.tokens = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        start = torch.zeros(self.tokens.numel(), dtype=torch.bool)
        start[torch.tensor(starts, dtype=torch.long)] = True
        self.doc_start = start
        # each token's offset inside its document: position - the start of its document
        index = torch.arange(self.tokens.numel())
        self.offset = index - torch.cummax(torch.where(start, index, torch.zeros_like(index)), 0).values
        self.n_windows = max(0, (self.tokens.numel() - 1) // seq_len)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} of {self.n_windows}")
        s, L = i * self.seq_len, self.seq_len
        ids, labels = self.tokens[s : s + L], self.tokens[s + 1 : s + L + 1].clone()
        starts = self.doc_start[s : s + L + 1]
        labels[starts[1:]] = IGNORE_INDEX  # the next token starts another document
        inner = (torch.nonzero(starts[1:L]).flatten() + 1).tolist()
        return {
            "input_ids": ids,
            "labels": labels,
            "cu_seqlens": [0, *inner, L],
            "doc_offset": torch.minimum(self.offset[s : s + L], torch.arange(L)),
            "answer_span": (0, 0),
        }


def split(n: int, eval_fraction: float) -> tuple[range, range]:
    """(training windows, held-out windows): the last round(n * eval_fraction) windows, at least one."""
    held = min(n - 1, max(1, round(n * eval_fraction))) if n > 1 else 0
    return range(0, n - held), range(n - held, n)
