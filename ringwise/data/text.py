"""Text for training: a byte-level tokenizer and plain UTF-8 files packed into windows."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterable

import torch


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


def text_files(paths, skip: str | None = None) -> list[Path]:
    """The files that `paths` (files or folders, searched recursively) stand for, sorted; inside a
    folder, files under a sub-folder named `skip` (a cache kept beside the data) are left out.

    Refuses a missing path, a folder without files, and a file that is not UTF-8 text
    (a NUL byte or invalid UTF-8 in its first 64 KiB), naming it: training on the
    replacement characters of a binary file is silently wrong."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and skip not in f.relative_to(p).parts)
            if not found:
                raise ValueError(f"{p} is a folder with no files in it")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        try:  # incremental: a character cut at the 64 KiB mark is not an error
            if b"\0" in head:
                raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 1 << 16)
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); give text files") from None
    return files


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
        self.files = files = text_files(paths)

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
