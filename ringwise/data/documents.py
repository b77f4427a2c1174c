"""Documents in a pretrained model's own tokens, packed into sequences with their boundaries.

Sources: plain text files (each file one document), folders (every file below, sorted) and
JSONL files (`.jsonl`: one document a line: a "text" string, trained on whole; a "messages" list,
rendered by the tokenizer's chat template and trained on the assistant's turns only; or a "prompt"
and a "completion", trained on the completion only; or, for a vision-language model, a "messages" list
with an "images" list: image-text examples, read with the model's own processor (`image_document`), each
one sequence of its own (`ImageTextExamples`), never packed or cached). A token that is context only (its label is
ignored) is kept as -(id + 1) in the document's tensor (`trained_split` reads both back). Tokenized with the model's
tokenizer in batches, without its special tokens, and cached in ringwise's cache folder
(`cache_root()/tokens`: $RINGWISE_CACHE, else $XDG_CACHE_HOME/ringwise, else ~/.cache/ringwise;
never in the user's data folder), an entry per file keyed by its absolute path, size and mtime and
by the tokenizer, so a second run, and every rank of a run, reads ids instead of tokenizing again.

Packing: the documents, each followed by EOS, form one stream cut into windows of seq_len + 1
tokens (inputs and next-token labels, as PackedTextDataset). Each window carries its document
boundaries as `cu_seqlens` (attention stays inside each document: ring_attention's packed
documents) and `doc_offset`, the context each token sees (its position inside its document,
counted from the window's start at most: what perplexity by position is bucketed by); a label
that would cross into the next document is IGNORE_INDEX, and so is a context-only token's. Windows
with no label left (only context) are skipped. The last windows are held out for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import cast

import torch

from ..model import IGNORE_INDEX
from .text import text_files

LEGACY_CACHE_DIR = ".ringwise-tokens"  # where earlier versions cached beside the data: never read as text


def cache_root() -> Path:
    """ringwise's cache folder: $RINGWISE_CACHE, else $XDG_CACHE_HOME/ringwise, else ~/.cache/ringwise."""
    if os.environ.get("RINGWISE_CACHE"):
        return Path(os.environ["RINGWISE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ringwise"


Record = str | dict  # a document before tokenizing: its text, or a JSONL line's "messages" / "prompt" record


def is_image_record(record: object) -> bool:
    return isinstance(record, dict) and "images" in record


def _image_record(record: dict, where: str, base: Path) -> dict:
    """An image-text line: "messages" whose contents are strings or lists of parts ({"type": "text", "text": ...}
    or {"type": "image"}, transformers' chat-template form) and "images", one path per image part in order,
    relative to the JSONL file's folder."""
    images, messages = record.get("images"), record.get("messages")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images) or not isinstance(messages, list):
        raise ValueError(f'{where}: an image-text line needs a "messages" list and an "images" list of paths')
    parts = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for c in content:
                if not isinstance(c, dict) or c.get("type") not in ("text", "image"):
                    raise ValueError(
                        f'{where}: a content part is {{"type": "text", "text": ...}} or {{"type": "image"}}'
                    )
                if c["type"] == "text" and not isinstance(c.get("text"), str):
                    raise ValueError(f'{where}: a "text" content part needs a "text" string')
                parts += c["type"] == "image"
        elif not isinstance(content, str):
            raise ValueError(f'{where}: each of "messages" needs a "role" and a "content" string or list of parts')
    if parts != len(images):
        raise ValueError(f'{where}: {parts} {{"type": "image"}} part(s) in "messages" but {len(images)} "images"')
    return {"messages": messages, "images": [str(base / i) for i in images]}


def _record(record: object, where: str, base: Path = Path(".")) -> Record:
    """A JSONL line as a document: its text, or the record itself for a chat or a prompt/completion."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and "images" in record:
        return _image_record(record, where, base)
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in record["messages"]):
            raise ValueError(f'{where}: each of "messages" needs a "role" and a "content" string')
        return {"messages": record["messages"]}
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return {"prompt": record["prompt"], "completion": record["completion"]}
    raise ValueError(
        f'{where}: a JSONL line needs a "text" string field, a "messages" list, or "prompt" and "completion" strings'
    )


def read_documents(path: Path) -> list[Record]:
    """One file's documents: its JSONL lines (`_record`) or its whole text."""
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
        docs.append(_record(record, f"{path}:{n}", path.parent))
    return docs


def with_context(ids: list[int], trained: list[bool]) -> torch.Tensor:
    """A document's tensor: trained tokens as their ids, context-only ones as -(id + 1)."""
    t = torch.tensor(ids, dtype=torch.int32)
    return torch.where(torch.tensor(trained, dtype=torch.bool), t, -t - 1)


def trained_split(doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, trained) of a document's tensor (`with_context`)."""
    trained = doc >= 0
    return torch.where(trained, doc, -doc - 1), trained


def _template_ids(tokenizer, messages: list, opened: bool) -> list[int]:
    """The chat template's ids for these messages (opened: with the assistant's next turn begun)."""
    if not messages:
        return []
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=opened, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(i) for i in ids]


def chat_document(tokenizer, messages: list, where: str) -> torch.Tensor:
    """A conversation through the chat template, trained on the assistant's turns: each one's tokens are
    what rendering the conversation up to it adds to the rendering up to its turn's opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f'{where}: a "messages" line needs the model\'s chat template, and its tokenizer has none')
    full = _template_ids(tokenizer, messages, opened=False)
    trained = [False] * len(full)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before, upto = _template_ids(tokenizer, messages[:i], True), _template_ids(tokenizer, messages[: i + 1], False)
        if upto[: len(before)] != before or full[: len(upto)] != upto:
            raise ValueError(
                f"{where}: the chat template does not render the conversation as a prefix of itself, so "
                "ringwise cannot tell the assistant's tokens"
            )
        trained[len(before) : len(upto)] = [True] * (len(upto) - len(before))
    return with_context(full, trained)


def is_processor(tokenizer) -> bool:
    """Whether this is a vision-language model's processor (AutoProcessor's, with an image processor)."""
    return getattr(tokenizer, "image_processor", None) is not None


def _load_image(path: str, where: str):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001  (any reason PIL cannot read it: missing, truncated, not an image)
        raise ValueError(f"{where}: the image {path} cannot be read ({type(e).__name__}: {e})") from None


def _processed(processor, messages: list, images: list, opened: bool) -> dict:
    """The processor's inputs of these messages (their images, expanded into image tokens by the processor)."""
    text = processor.apply_chat_template(messages, add_generation_prompt=opened, tokenize=False)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def _image_parts(messages: list) -> int:
    return sum(c.get("type") == "image" for m in messages if isinstance(m.get("content"), list) for c in m["content"])


def image_document(processor, messages: list, paths: list, where: str) -> dict:
    """An image-text example through the processor (its chat template, image tokens, pixel values), trained on
    the assistant's turns (the tokens each adds to the rendering up to its turn's opening, as chat_document):
    {"ids": with_context ids, and the processor's image inputs (pixel_values, token types, image grids)}."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{where}: an image-text line needs the processor's chat template, and it has none")
    images = [_load_image(p, where) for p in paths]
    full = _processed(processor, messages, images, opened=False)
    ids = [int(i) for i in full.pop("input_ids")[0]]
    full.pop("attention_mask", None)
    trained = [False] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before_images = images[: _image_parts(messages[:i])]
        upto_images = images[: _image_parts(messages[: i + 1])]
        before = [int(t) for t in _processed(processor, messages[:i], before_images, True)["input_ids"][0]]
        upto = [int(t) for t in _processed(processor, messages[: i + 1], upto_images, False)["input_ids"][0]]
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(
                f"{where}: the chat template does not render the conversation as a prefix of itself, so "
                "ringwise cannot tell the assistant's tokens"
            )
        trained[len(before) : len(upto)] = [True] * (len(upto) - len(before))
    return {"ids": with_context(ids, trained), **{k: v for k, v in full.items() if torch.is_tensor(v)}}


def _tokenize(tokenizer, records: list[Record], where: str) -> list:
    """Texts in batches (without special tokens); chats and prompt/completion records one by one; image-text
    records through a vision-language model's processor (only there: `tokenizer` is then the processor)."""
    processor = is_processor(tokenizer)
    for i, r in enumerate(records):
        if is_image_record(r) and not processor:
            raise ValueError(
                f'{where} (document {i + 1}): an image-text line ("images") needs a vision-language --model with '
                "its processor; this model is text-only"
            )
        if processor and not is_image_record(r):
            raise ValueError(
                f"{where} (document {i + 1}): a vision-language --model trains on image-text lines only "
                '("messages" with "images"); text documents for it are not supported yet'
            )
    if processor:
        images = [cast(dict, r) for r in records]
        return [
            image_document(tokenizer, r["messages"], r["images"], f"{where} (document {i + 1})")
            for i, r in enumerate(images)
        ]
    docs: list[torch.Tensor | None] = [None] * len(records)
    texts = [(i, r) for i, r in enumerate(records) if isinstance(r, str)]
    for b in range(0, len(texts), 256):
        part = texts[b : b + 256]
        for (i, _), ids in zip(part, tokenizer([t for _, t in part], add_special_tokens=False)["input_ids"]):
            docs[i] = torch.tensor(ids, dtype=torch.int32)
    for i, r in enumerate(records):
        if isinstance(r, dict) and "messages" in r:
            docs[i] = chat_document(tokenizer, r["messages"], f"{where} (document {i + 1})")
        elif isinstance(r, dict):
            prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
            docs[i] = with_context(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    return [d for d in docs if d is not None]


def tokenizer_key(tokenizer) -> str:
    """What makes two tokenizers give the same ids: its name, vocabulary, chat template and class."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    template = getattr(tokenizer, "chat_template", None)
    digest = hashlib.sha256(json.dumps([sorted(vocab.items()), str(template)]).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{len(vocab)}-{digest}"


def _cache_path(path: Path, key: str) -> Path:
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{key}".encode()).hexdigest()[:20]
    return cache_root() / "tokens" / f"{path.name}.{tag}.pt"


def tokenize_file(path: Path, tokenizer, key: str) -> list[torch.Tensor]:
    """The file's documents as int32 id tensors, from the cache when it is there (written whole or not at all)."""
    cache = _cache_path(path, key)
    if cache.exists():
        return torch.load(cache, weights_only=True)["documents"]
    records = read_documents(path)
    docs = _tokenize(tokenizer, records, str(path))
    if any(is_image_record(r) for r in records):  # pixels are large, and the images are files of their own
        return docs  # never cached: processed again each run (and by each rank)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # ranks tokenizing at once never share one
        torch.save({"documents": docs}, tmp)
        tmp.replace(cache)
    except OSError:  # a cache folder that cannot be written: tokenize again next time
        pass
    return docs


def tokenize_documents(paths, tokenizer) -> list:
    """Every file's documents: id tensors, or a processor's image-text examples (dicts: `image_document`)."""
    key = tokenizer_key(tokenizer)
    docs = [d for f in text_files(paths, skip=LEGACY_CACHE_DIR) for d in tokenize_file(f, tokenizer, key)]
    return [d for d in docs if isinstance(d, dict) or d.numel()]


class PackedDocuments(torch.utils.data.Dataset):
    """Windows of seq_len tokens over the EOS-separated documents (see the module docstring)."""

    def __init__(self, documents: list[torch.Tensor], seq_len: int, eos_id: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        pieces, trains, starts, pos = [], [], [], 0
        for d in documents:
            ids, trained = trained_split(d.to(torch.int64))
            # the EOS after a document is trained where its last token is (text, a reply that ends it)
            ends = bool(trained[-1]) if len(trained) else True
            pieces += [ids, torch.tensor([eos_id])]
            trains += [trained, torch.tensor([ends])]
            starts.append(pos)
            pos += d.numel() + 1
        self.seq_len = seq_len
        self.tokens = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
        self.trained = torch.cat(trains) if trains else torch.empty(0, dtype=torch.bool)
        start = torch.zeros(self.tokens.numel(), dtype=torch.bool)
        start[torch.tensor(starts, dtype=torch.long)] = True
        self.doc_start = start
        # each token's offset inside its document: position - the start of its document
        index = torch.arange(self.tokens.numel())
        self.offset = index - torch.cummax(torch.where(start, index, torch.zeros_like(index)), 0).values
        n = max(0, (self.tokens.numel() - 1) // seq_len)
        # windows with a label to learn: one of only context (a long prompt or user turn) trains nothing
        learned = (self.trained & ~self.doc_start)[1 : n * seq_len + 1].view(n, seq_len).any(1)
        self.windows = torch.nonzero(learned).flatten().tolist()
        self.n_windows = len(self.windows)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} of {self.n_windows}")
        s, L = self.windows[i] * self.seq_len, self.seq_len
        ids, labels = self.tokens[s : s + L], self.tokens[s + 1 : s + L + 1].clone()
        starts = self.doc_start[s : s + L + 1]
        labels[starts[1:]] = IGNORE_INDEX  # the next token starts another document
        labels[~self.trained[s + 1 : s + L + 1]] = IGNORE_INDEX  # context only (a prompt, a user's turn)
        inner = (torch.nonzero(starts[1:L]).flatten() + 1).tolist()
        return {
            "input_ids": ids,
            "labels": labels,
            "cu_seqlens": [0, *inner, L],
            "doc_offset": torch.minimum(self.offset[s : s + L], torch.arange(L)),
            "answer_span": (0, 0),
        }


class ImageTextExamples(torch.utils.data.Dataset):
    """Image-text examples (`image_document`), one a sequence of seq_len tokens: the example's tokens, then
    pad_id up to seq_len (labels ignored: causal attention keeps the example from seeing them); its labels the
    next tokens where trained, and EOS after its last token where that one is trained. An example longer than
    seq_len is refused, never cut (a cut could split an image's tokens from its pixels)."""

    def __init__(self, examples: list[dict], seq_len: int, eos_id: int, pad_id: int):
        for i, ex in enumerate(examples):
            n = ex["ids"].numel()
            if n > seq_len:
                raise ValueError(
                    f"image-text example {i + 1} is {n} tokens (its image tokens included), longer than --seq-len "
                    f"{seq_len}: raise --seq-len, or give smaller images (the processor's image size) or a shorter "
                    "example; ringwise never cuts an example"
                )
        self.examples, self.seq_len, self.eos_id, self.pad_id = examples, seq_len, eos_id, pad_id
        self.n_windows = len(examples)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n_windows:
            raise IndexError(f"example {i} of {self.n_windows}")
        ex, L = self.examples[i], self.seq_len
        ids, trained = trained_split(ex["ids"].to(torch.int64))
        n = ids.numel()
        targets = torch.cat([ids[1:], torch.tensor([self.eos_id])])
        learn = torch.cat([trained[1:], trained[-1:]])
        input_ids = torch.full((L,), self.pad_id, dtype=torch.int64)
        input_ids[:n] = ids
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.int64)
        labels[:n] = torch.where(learn, targets, torch.full_like(targets, IGNORE_INDEX))
        images = {}
        for k, v in ex.items():
            if k == "ids":
                continue
            if v.dim() == 2 and v.shape == (1, n):  # per-token (token types): padded with zeros (text)
                v = torch.cat([v, v.new_zeros(1, L - n)], 1)
            images[k] = v
        return {"input_ids": input_ids, "labels": labels, "images": images, "answer_span": (0, 0)}


def split(n: int, eval_fraction: float) -> tuple[range, range]:
    """(training windows, held-out windows): the last round(n * eval_fraction) windows, at least one."""
    held = min(n - 1, max(1, round(n * eval_fraction))) if n > 1 else 0
    return range(0, n - held), range(n - held, n)
