"""SeqShard against the layout functions it wraps and against sharding written out by hand,
on real gloo rings (W = 1, 2, 3) and a 2 x 2 Ulysses x ring mesh."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from helpers import max_err, reference_attention

import ringwise
from ringwise.attention import layout as L
from ringwise.attention.layout import global_indices, split_unit
from ringwise.attention.seqshard import IGNORE_INDEX, SeqShard

SEQ, ODD = 12, 13  # ODD needs padding on every ring but a contiguous or striped one of 1
DOCS = [0, 5, 9, 12]


def _randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ids(seed, *shape):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def expected_targets(labels, bounds):
    """Next-token targets written out per document: -100 at each document's last token."""
    out = torch.full_like(labels, IGNORE_INDEX)
    for a, b in zip(bounds, bounds[1:]):
        for t in range(a, b - 1):
            out[:, t] = labels[:, t + 1]
    return out


def assemble(parts, layout, dim=1):
    """The global tensor from the ring ranks' shards, placed by global_indices (no communication)."""
    W, n = len(parts), parts[0].shape[dim] * len(parts)
    out = torch.empty(parts[0].shape[:dim] + (n,) + parts[0].shape[dim + 1 :], dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out.index_copy_(dim, global_indices(layout, r, W, n), p)
    return out


# ------------------------------------------------------------------ one process, no process group


def test_one_process_without_process_group():
    assert not dist.is_initialized()
    s = SeqShard("zigzag")
    x = _randn(0, 2, SEQ, 3)
    assert s.world == 1 and s.unit == 2 and s.pad_len(ODD) == 1 and s.pad_len(SEQ) == 0
    assert torch.equal(s.shard(x), x) and torch.equal(s.unshard(x), x)
    assert torch.equal(s.positions(SEQ), torch.arange(SEQ))
    with pytest.raises(ValueError, match="multiple of 2"):
        s.shard(_randn(1, 2, ODD, 3))
    assert s.ring_kwargs() == dict(layout="zigzag", group=None, ulysses_group=None)
    assert ringwise.SeqShard is SeqShard


def test_shard_batch_by_hand():
    """Targets are the next token, -100 at the end of each document (here 0-2 and 2-5)."""
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    got = SeqShard("contiguous").shard_batch(ids, cu_seqlens=[0, 2, 5])
    assert got["labels"].tolist() == [[11, -100, 13, 14, -100]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 4]] and got["cu_seqlens"] == [0, 2, 5]
    padded = SeqShard("zigzag").shard_batch(ids, torch.tensor([[0, 1, 2, 3, 4]]), pad=True, pad_id=7)
    assert padded["input_ids"].tolist() == [[10, 11, 12, 13, 14, 7]]
    assert padded["labels"].tolist() == [[1, 2, 3, 4, -100, -100]] and "cu_seqlens" not in padded


def test_refusals():
    with pytest.raises(ValueError, match="layout='diagonal'"):
        SeqShard("diagonal")
    s = SeqShard("contiguous")
    with pytest.raises(ValueError, match="end at the sequence length 5"):
        s.shard_batch(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=[0, 4])
    with pytest.raises(ValueError, match="strictly increasing"):
        s.shard_batch(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=[0, 3, 3, 5])
    with pytest.raises(ValueError, match="labels shape"):
        s.shard_batch(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_imports_nothing_above_attention():
    code = (
        "import sys, ringwise.attention.seqshard; "
        "print(sorted(m for m in sys.modules if m.startswith('ringwise.') and not m.startswith('ringwise.attention')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ rings of W = 1, 2, 3


def layout_job():
    """Per layout: SeqShard's results next to the layout functions' on this rank."""
    x, y = _randn(0, 2, SEQ, 3), _randn(1, 2, ODD, 3)
    out = {}
    for layout in ringwise.LAYOUTS:
        s = SeqShard(layout)
        padded, n_pad = s.pad(y, 1, value=-1.0)
        out[layout] = dict(
            world=s.world,
            unit=s.unit,
            shard=s.shard(x),
            ref_shard=L.shard(x, 1, layout),
            shard_dim2=s.shard(x.transpose(1, 2), dim=2),
            positions=s.positions(SEQ),
            ref_positions=L.positions(SEQ, layout),
            whole=s.unshard(s.shard(x)),
            whole_dim2=s.unshard(s.shard(x.transpose(1, 2), dim=2), dim=2),
            pad_len=s.pad_len(ODD),
            padded=padded,
            n_pad=n_pad,
            whole_padded=s.unshard(s.shard(y, pad=True)),
        )
    return out


@pytest.mark.parametrize("W", [1, 2, 3])
def test_matches_layout_functions(cluster, W):
    results = cluster(W).run(layout_job, timeout=60)
    x, y = _randn(0, 2, SEQ, 3), _randn(1, 2, ODD, 3)
    for layout in ringwise.LAYOUTS:
        unit = split_unit(layout, W)
        for r, res in enumerate(results):
            got = res[layout]
            idx = global_indices(layout, r, W, SEQ)
            assert got["world"] == W and got["unit"] == unit
            assert torch.equal(got["shard"], x[:, idx]) and torch.equal(got["shard"], got["ref_shard"])
            assert torch.equal(got["shard_dim2"], x.transpose(1, 2)[:, :, idx])
            assert torch.equal(got["positions"], idx) and torch.equal(got["ref_positions"], idx)
            assert torch.equal(got["whole"], x) and torch.equal(got["whole_dim2"], x.transpose(1, 2))
            n_pad = (-ODD) % unit
            assert got["pad_len"] == n_pad == got["n_pad"]
            assert got["padded"].shape[1] == ODD + n_pad and torch.equal(got["padded"][:, :ODD], y)
            assert (got["padded"][:, ODD:] == -1.0).all()
            assert torch.equal(got["whole_padded"][:, :ODD], y) and (got["whole_padded"][:, ODD:] == 0).all()
        assert torch.equal(assemble([res[layout]["shard"] for res in results], layout), x)


def shard_batch_job():
    from ringwise.integrations.transformers import shard_batch as hf_shard_batch

    ids, labels, odd = _ids(2, 2, SEQ), _ids(3, 2, SEQ), _ids(4, 2, ODD)
    out = {}
    for layout in ringwise.LAYOUTS:
        s = SeqShard(layout)
        out[layout] = dict(
            docs=s.shard_batch(ids, labels, cu_seqlens=torch.tensor(DOCS)),
            plain=s.shard_batch(ids),
            padded=s.shard_batch(odd, cu_seqlens=[0, 7, ODD], pad=True, pad_id=99),
        )
    # the integration's, on the same ring (the process default is whatever an earlier test set)
    out["hf"] = hf_shard_batch(ids, labels, cu_seqlens=DOCS, shard=SeqShard("zigzag"))
    return out


@pytest.mark.parametrize("W", [2, 3])
def test_shard_batch_shifts_on_the_global_sequence(cluster, W):
    results = cluster(W).run(shard_batch_job, timeout=60)
    ids, labels, odd = _ids(2, 2, SEQ), _ids(3, 2, SEQ), _ids(4, 2, ODD)
    for layout in ringwise.LAYOUTS:

        def whole(kind, key):
            return assemble([res[layout][kind][key] for res in results], layout)

        assert torch.equal(whole("docs", "input_ids"), ids)
        assert torch.equal(whole("docs", "labels"), expected_targets(labels, DOCS))
        assert (whole("docs", "labels")[:, [4, 8, 11]] == IGNORE_INDEX).all()  # each document's last token
        assert torch.equal(whole("plain", "labels"), expected_targets(ids, [0, SEQ]))
        for r, res in enumerate(results):
            assert torch.equal(res[layout]["docs"]["position_ids"], global_indices(layout, r, W, SEQ).expand(2, -1))
            assert res[layout]["docs"]["cu_seqlens"] == DOCS and "cu_seqlens" not in res[layout]["plain"]
        n = ODD + (-ODD) % split_unit(layout, W)
        assert all(res[layout]["padded"]["cu_seqlens"] == [0, 7, ODD, n] for res in results)
        want = torch.full((2, n), IGNORE_INDEX)
        want[:, :ODD] = expected_targets(odd, [0, 7, ODD])
        assert torch.equal(whole("padded", "labels"), want)
        assert (
            torch.equal(whole("padded", "input_ids")[:, :ODD], odd)
            and (whole("padded", "input_ids")[:, ODD:] == 99).all()
        )
    for res in results:  # the same batch as the transformers integration's shard_batch (zigzag)
        for key in ("input_ids", "position_ids", "labels"):
            assert torch.equal(res["zigzag"]["docs"][key], res["hf"][key]), key
        assert res["hf"]["ringwise_cu_seqlens"] == DOCS


# ------------------------------------------------------------------ Ulysses x ring, 2 x 2

_MESH = []


def mesh_job(layout, S=16):
    """SeqShard over (ulysses_group, ring group) of mesh_groups(2, 2), next to layout.shard."""
    from ringwise.attention.ulysses import mesh_groups

    if not _MESH:
        _MESH.extend(mesh_groups(2, 2))
    ug, rg = _MESH
    s = SeqShard(layout, rg, ug)
    x, y = _randn(0, 2, S, 3), _randn(1, 2, ODD, 3)
    q, k, v = _randn(5, 1, S, 4, 8), _randn(6, 1, S, 2, 8), _randn(7, 1, S, 2, 8)
    out = ringwise.ring_attention(s.shard(q), s.shard(k), s.shard(v), causal=True, **s.ring_kwargs())
    return dict(
        world=s.world,
        ring_size=s.ring_size,
        ulysses_size=s.ulysses_size,
        unit=s.unit,
        shard=s.shard(x),
        ref_shard=L.shard(x, 1, layout, rg, ulysses_group=ug),
        positions=s.positions(S),
        whole=s.unshard(s.shard(x)),
        whole_padded=s.unshard(s.shard(y, pad=True)),
        pad_len=s.pad_len(ODD),
        count=s.all_reduce(torch.ones(1)),
        batch=s.shard_batch(_ids(2, 2, S), cu_seqlens=[0, 5, S]),
        attention=s.unshard(out),
    )


@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
def test_ulysses_by_ring_mesh(cluster, layout):
    S = 16
    results = cluster(4).run(mesh_job, layout, timeout=120)
    x, y, ids = _randn(0, 2, S, 3), _randn(1, 2, ODD, 3), _ids(2, 2, S)
    targets = expected_targets(ids, [0, 5, S])
    ref, _ = reference_attention(_randn(5, 1, S, 4, 8), _randn(6, 1, S, 2, 8), _randn(7, 1, S, 2, 8), causal=True)
    pieces = []
    for g, res in enumerate(results):  # global rank g: ring rank g // 2, ulysses rank g % 2
        idx = global_indices(layout, g // 2, 2, S, g % 2, 2)
        pieces.append(idx)
        assert (res["world"], res["ring_size"], res["ulysses_size"]) == (4, 2, 2)
        assert res["unit"] == split_unit(layout, 2, 2) and res["pad_len"] == (-ODD) % res["unit"]
        assert torch.equal(res["shard"], res["ref_shard"]) and torch.equal(res["shard"], x[:, idx])
        assert torch.equal(res["positions"], idx) and torch.equal(res["whole"], x)
        assert torch.equal(res["whole_padded"][:, :ODD], y) and (res["whole_padded"][:, ODD:] == 0).all()
        assert res["count"].item() == 4  # summed over both groups: every piece counted once
        assert torch.equal(res["batch"]["labels"], targets[:, idx])
        assert torch.equal(res["batch"]["position_ids"], idx.expand(2, -1))
        assert max_err(res["attention"], ref) < 1e-10
        if layout == "contiguous":  # written out: rank g holds tokens [4g, 4g + 4)
            assert idx.tolist() == list(range(4 * g, 4 * g + 4))
    assert sorted(torch.cat(pieces).tolist()) == list(range(S))  # the four pieces cut the sequence once
