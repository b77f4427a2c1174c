import math
import re

import pytest
import torch

from ringwise.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    PackedTextDataset,
    RetrievalDataset,
    collate,
    retrieval_eval_grid,
    sample_indices,
    text_files,
)

TOK = ByteTokenizer()
PATTERNS = {
    "compact": (r"(\d+):(\d+)\n", r"\?(\d+)=(\d+)$"),
    "paper": (
        r"line (\d+): REGISTER_CONTENT is (\d+)\n",
        r"Tell me what is the REGISTER_CONTENT in line (\d+)\? (\d+)$",
    ),
}


def parse(example, fmt):
    """Decode an example back to its (id, value) lines, question id and answer text."""
    ids = example["input_ids"]
    real = ids[ids != TOK.PAD]
    assert real[0] == TOK.BOS and (real[1:] < 256).all()
    text = TOK.decode(real)
    line_re, q_re = PATTERNS[fmt]
    lines = re.findall(line_re, text)
    m = re.search(q_re, text)
    assert m, text[-80:]
    return lines, m.group(1), m.group(2), text


# ------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials():
    for s in ["", "hello", "ünïcødé ✓ 中文 🚀", "line 1: x\n\ttab"]:
        ids = TOK.encode(s, bos=True, eos=True)
        assert ids[0] == TOK.BOS == 257 and ids[-1] == TOK.EOS == 258
        assert TOK.decode(ids) == s
        assert TOK.decode(torch.tensor(ids)) == s
        assert TOK.encode_tensor(s).tolist() == TOK.encode(s)
    assert TOK.PAD == 256 and TOK.num_tokens == 259
    assert TOK.vocab_size == 264 and TOK.vocab_size % 8 == 0
    assert ByteTokenizer(pad_to_multiple_of=1).vocab_size == 259
    assert TOK.decode([104, 256, 105, 999]) == "hi"  # specials and junk skipped
    assert TOK.decode([0xFF, 104]) == "\ufffdh"  # bad UTF-8 replaced


# ------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("fmt", ["compact", "paper"])
@pytest.mark.parametrize("seq_len", [64, 257, 1000])
def test_retrieval_layout_and_labels(fmt, seq_len):
    if fmt == "paper" and seq_len == 64:
        seq_len = 120
    ds = RetrievalDataset(seq_len, seed=7, fmt=fmt)
    for index in range(5):
        ex = ds[index]
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids.shape == labels.shape == (seq_len,)
        assert ids.dtype == labels.dtype == torch.long
        lines, qid, answer, _ = parse(ex, fmt)
        assert len(lines) == ds.n_lines >= 1
        assert len({i for i, _ in lines}) == len(lines)  # distinct ids
        assert all(len(i) == ds.id_digits and len(v) == ds.value_digits for i, v in lines)
        assert answer == dict(lines)[qid]
        assert ex["needle_line"] == [i for i, _ in lines].index(qid)
        # Answer at the end; fewer than one line's worth of PAD after it.
        start, end = ex["answer_span"]
        assert TOK.decode(ids[start:end]) == answer
        assert (ids[end:] == TOK.PAD).all() and seq_len - end < ds.line_len
        assert (ids[:end] != TOK.PAD).all()
        # Labels: exactly the answer digits, at the positions that predict them.
        mask = labels != IGNORE_INDEX
        assert mask.nonzero().flatten().tolist() == list(range(start - 1, end - 1))
        assert TOK.decode(labels[mask]) == answer
        assert torch.equal(labels[mask], ids[start:end])


def test_retrieval_deterministic_in_seed_and_index_only():
    a = RetrievalDataset(300, seed=3)
    b = RetrievalDataset(300, seed=3)
    order = [9, 2, 5, 2, 0]
    got_a = {i: a[i] for i in order}
    got_b = {i: b[i] for i in reversed(order)}  # other order, other instance
    for i in order:
        assert torch.equal(got_a[i]["input_ids"], got_b[i]["input_ids"])
        assert torch.equal(got_a[i]["labels"], got_b[i]["labels"])
        assert got_a[i]["answer_span"] == got_b[i]["answer_span"]
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])
    assert not torch.equal(a[0]["input_ids"], RetrievalDataset(300, seed=4)[0]["input_ids"])
    # Large indices work and the dataset is effectively unbounded.
    assert len(a) == 2**31
    assert a[2**31 - 1]["input_ids"].shape == (300,)
    with pytest.raises(IndexError):
        a[2**31]


@pytest.mark.parametrize("fmt", ["compact", "paper"])
def test_depth_places_needle(fmt):
    ds_len = 2000
    for depth in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]:
        ds = RetrievalDataset(ds_len, seed=1, depth=depth, fmt=fmt)
        n = ds.n_lines
        for index in range(3):
            ex = ds[index]
            lines, qid, _, text = parse(ex, fmt)
            k = [i for i, _ in lines].index(qid)
            assert abs(k / (n - 1) - depth) <= 0.5 / (n - 1) + 1e-9
            assert ex["depth"] == pytest.approx(k / (n - 1))
            # The needle line's characters sit at that fraction of the document.
            doc_len = n * ds.line_len
            pos = text.index(ds.fmt.line.format(id=qid, value=lines[k][1]))
            assert abs(pos / (doc_len - ds.line_len) - depth) <= 1.0 / (n - 1) + 1e-9
    assert RetrievalDataset(2000, seed=1, depth=0.0, fmt=fmt)[0]["needle_line"] == 0
    assert RetrievalDataset(2000, seed=1, depth=1.0, fmt=fmt)[0]["needle_line"] == n - 1


def test_random_depth_covers_document():
    ds = RetrievalDataset(400, seed=0)
    needles = [ds[i]["needle_line"] for i in range(200)]
    assert min(needles) <= 2 and max(needles) >= ds.n_lines - 3
    # At fixed depth the documents do not depend on depth: only the question moves.
    d0, d1 = RetrievalDataset(400, seed=0, depth=0.0)[5], RetrievalDataset(400, seed=0, depth=1.0)[5]
    doc = d0["answer_span"][0] - 20
    assert torch.equal(d0["input_ids"][:doc], d1["input_ids"][:doc])


def test_loss_on_all_and_digit_options():
    ds = RetrievalDataset(200, seed=2, loss_on="all", id_digits=3, value_digits=6)
    ex = ds[0]
    ids, labels = ex["input_ids"], ex["labels"]
    _, end = ex["answer_span"]
    assert torch.equal(labels[: end - 1], ids[1:end])
    assert (labels[end - 1 :] == IGNORE_INDEX).all()
    lines, _, answer, _ = parse(ex, "compact")
    assert len(lines[0][0]) == 3 and len(answer) == 6


@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_recurring_registers_and_recall_labels(depth):
    """id_pool: haystack ids repeat with one value each, the needle id occurs once; loss_on
    "recall" labels every repeated line's value and the answer, nothing else."""
    ds = RetrievalDataset(128, seed=3, fmt="registers", id_pool=5, loss_on="recall", depth=depth)
    assert (ds.id_digits, ds.value_digits, ds.line_len) == (1, 1, 3)
    for index in range(20):
        ex = ds[index]
        ids, labels = ex["input_ids"], ex["labels"]
        start, end = ex["answer_span"]
        text = TOK.decode(ids[1:end])
        body, question = text.rsplit("?", 1)
        lines = [(line[0], line[1]) for line in body.split("\n")[:-1]]
        assert len(lines) == ds.n_lines and len({i for i, _ in lines}) <= 5
        assert all(len({v for i2, v in lines if i2 == i}) == 1 for i, _ in lines)  # one value per id
        qid, answer = question[0], question[1:]
        assert [i for i, _ in lines].count(qid) == 1 and dict(lines)[qid] == answer
        k = [i for i, _ in lines].index(qid)
        assert ex["needle_line"] == k
        if depth is not None:
            assert k == math.floor(depth * (ds.n_lines - 1) + 0.5)
        expected, seen = {start - 1: int(ids[start])}, set()
        for n, (i, v) in enumerate(lines):
            if i in seen:  # position of the id digit predicts the value digit
                expected[1 + 3 * n] = ord(v)
            seen.add(i)
        got = {int(t): int(labels[t]) for t in (labels != IGNORE_INDEX).nonzero().flatten()}
        assert got == expected and len(expected) > 10
    # Evaluation form of the same task: only the answer is labelled.
    ex = RetrievalDataset(128, seed=3, fmt="registers", id_pool=5, depth=0.5)[0]
    assert (ex["labels"] != IGNORE_INDEX).sum() == 1
    with pytest.raises(ValueError, match="id_pool"):
        RetrievalDataset(128, fmt="registers", id_pool=10)  # only 9 one-digit ids
    with pytest.raises(ValueError, match="id_pool"):
        RetrievalDataset(128, fmt="registers", id_pool=1)
    with pytest.raises(ValueError, match="id_pool"):
        RetrievalDataset(128, fmt="registers", id_pool=2.5)
    with pytest.raises(ValueError, match="without id_pool"):
        RetrievalDataset(128, fmt="registers", loss_on="recall")  # nothing would recur
    with pytest.raises(ValueError, match="id before the value"):
        RetrievalDataset(128, fmt="pairs", id_digits=1, value_digits=1, id_pool=5, loss_on="recall")
    with pytest.raises(ValueError, match="or let ids recur"):
        RetrievalDataset(128, fmt="registers")  # 41 lines, 9 one-digit ids


@pytest.mark.parametrize("fmt,questions", [("registers", 3), ("compact", 1), ("paper", 2)])
def test_recall_labels_in_other_formats(fmt, questions):
    """Recall labels sit where the value's first digit is predicted, in any id-first format,
    and the extra questions keep their answer labels."""
    ds = RetrievalDataset(
        400, seed=5, fmt=fmt, id_digits=1, value_digits=2, id_pool=6, loss_on="recall", questions=questions
    )
    ex = ds[0]
    ids, labels = ex["input_ids"], ex["labels"]
    at = (labels != IGNORE_INDEX).nonzero().flatten()
    assert len(at) > 2 * questions
    assert torch.equal(labels[at], ids[at + 1])  # every label is the next token
    assert all(chr(int(ids[t + 1])).isdigit() for t in at)  # and a value digit
    end = ex["answer_span"][1]
    for q in range(questions):  # every question's two answer digits, walking back from the end
        a_end = end - q * (ds.question_len + 2)
        assert torch.equal(labels[a_end - 3 : a_end - 1], ids[a_end - 2 : a_end])


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_decoys_occur_once_and_needle_stays(depth):
    base = RetrievalDataset(128, seed=4, fmt="registers", id_pool=9, depth=depth)
    ds = RetrievalDataset(128, seed=4, fmt="registers", id_pool=9, depth=depth, decoys=4)
    for index in range(10):
        ex = ds[index]
        body, question = TOK.decode(ex["input_ids"][1 : ex["answer_span"][1]]).rsplit("?", 1)
        lines = [line[0] for line in body.split("\n")[:-1]]
        once = [i for i in set(lines) if lines.count(i) == 1]
        assert question[0] in once and len(once) == 5  # the needle and 4 decoys
        assert lines.index(question[0]) == ex["needle_line"] == base[index]["needle_line"]
    with pytest.raises(ValueError, match="decoys"):
        RetrievalDataset(128, fmt="registers", id_pool=9, decoys=8)  # no recurring id left
    with pytest.raises(ValueError, match="decoys"):
        RetrievalDataset(128, fmt="registers", decoys=1)  # needs id_pool


def test_retrieval_errors():
    with pytest.raises(ValueError, match="too short"):
        RetrievalDataset(10)
    with pytest.raises(ValueError, match="id_digits"):
        RetrievalDataset(5000, id_digits=2)
    with pytest.raises(ValueError, match="depth"):
        RetrievalDataset(100, depth=1.5)
    with pytest.raises(ValueError, match="fmt"):
        RetrievalDataset(100, fmt="verbose")
    with pytest.raises(ValueError, match="loss_on"):
        RetrievalDataset(100, loss_on="some")


def test_eval_grid():
    grid = retrieval_eval_grid([64, 128], [0.0, 0.5, 1.0], n_per_cell=2, seed=5)
    assert list(grid) == [(64, 0.0), (64, 0.5), (64, 1.0), (128, 0.0), (128, 0.5), (128, 1.0)]
    again = retrieval_eval_grid([64, 128], [0.0, 0.5, 1.0], n_per_cell=2, seed=5)
    for key, exs in grid.items():
        assert len(exs) == 2
        for ex, ex2 in zip(exs, again[key]):
            assert ex["input_ids"].shape == (key[0],)
            assert torch.equal(ex["input_ids"], ex2["input_ids"])


# ---------------------------------------------------------------------- packed text


def test_packed_text_windows_cover_stream(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 7, encoding="utf-8")
    (tmp_path / "b.txt").write_text("second document ✓", encoding="utf-8")
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    ds = PackedTextDataset(files, seq_len=16)
    stream = TOK.encode("héllo wörld\n" * 7, eos=True) + TOK.encode("second document ✓", eos=True)
    assert ds.tokens.dtype == torch.uint16
    assert ds.tokens.tolist() == stream
    assert len(ds) == (len(stream) - 1) // 16
    covered = []
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["input_ids"].shape == ex["labels"].shape == (16,)
        assert ex["input_ids"].dtype == torch.long
        assert torch.equal(ex["labels"][:-1], ex["input_ids"][1:])
        covered += ex["input_ids"].tolist()
    covered.append(int(ds[len(ds) - 1]["labels"][-1]))
    assert covered == stream[: len(covered)]
    assert len(stream) - len(covered) < 16
    # A directory stands for its files, sorted: same stream.
    assert PackedTextDataset(tmp_path, seq_len=16).tokens.tolist() == stream
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packed_text_errors(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny", encoding="utf-8")  # 4 bytes + EOS = 5 tokens
    assert len(PackedTextDataset(short, seq_len=4)) == 1
    # Windows overlap by one token, so every token but the first is a label once.
    assert len(PackedTextDataset(short, seq_len=2)) == 2
    assert [PackedTextDataset(short, seq_len=1)[i]["labels"].item() for i in range(4)] == TOK.encode("iny", eos=True)
    with pytest.raises(ValueError, match="5 tokens"):
        PackedTextDataset(short, seq_len=5)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PackedTextDataset([short, tmp_path / "missing.txt"], seq_len=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is a folder with no files"):
        PackedTextDataset(tmp_path / "empty", seq_len=2)
    (tmp_path / "model.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"model.bin is not UTF-8 text \(NUL byte at byte 0\)"):
        PackedTextDataset(tmp_path / "model.bin", seq_len=2)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        text_files([tmp_path / "latin1.txt"])
    cut = tmp_path / "cut.txt"  # a 2-byte character across the 64 KiB mark is fine
    cut.write_bytes(b"a" * (2**16 - 1) + "é".encode())
    assert text_files(cut) == [cut]


# ----------------------------------------------------------------- batching, resume


@pytest.mark.parametrize("n", [10, 37, 2**31])
def test_sample_indices_deterministic_and_epoch_permutation(n):
    batch = 4
    first = [sample_indices(s, batch, n, seed=11) for s in range(10)]
    again = [sample_indices(s, batch, n, seed=11) for s in reversed(range(10))][::-1]
    assert first == again  # resume at any step: same batches
    assert first != [sample_indices(s, batch, n, seed=12) for s in range(10)]
    flat = [i for b in first for i in b]
    assert all(0 <= i < n for i in flat)
    if n <= 37:
        steps = math.ceil(2 * n / batch) + 1
        flat = [i for s in range(steps) for i in sample_indices(s, batch, n, seed=11)]
        assert sorted(flat[:n]) == list(range(n))  # epoch 0 is a permutation
        assert sorted(flat[n : 2 * n]) == list(range(n))  # and so is epoch 1
        assert flat[:n] != flat[n : 2 * n]  # reshuffled per epoch
        assert flat[:n] != list(range(n))
    else:
        assert len(set(flat)) == len(flat)


def test_sample_indices_unbounded_and_errors():
    assert sample_indices(3, 4, None) == [12, 13, 14, 15]
    with pytest.raises(ValueError):
        sample_indices(-1, 4, 10)
    with pytest.raises(ValueError):
        sample_indices(0, 0, 10)


def test_collate():
    ds = RetrievalDataset(128, seed=0)
    batch = collate([ds[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 128)
    assert batch["answer_span"].shape == (3, 2) and batch["answer_span"].dtype == torch.long
    assert batch["depth"].shape == (3,)
    assert batch["answer_span"][1].tolist() == list(ds[1]["answer_span"])
    text = collate([{"input_ids": torch.zeros(4, dtype=torch.long), "answer_span": (0, 0), "name": "x"}] * 2)
    assert text["answer_span"].shape == (2, 2) and text["name"] == ["x", "x"]
