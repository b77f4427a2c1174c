"""Every argument problem of ring_attention, on ONE rank only, stops every rank with the same
clear ValueError within seconds (found inside the collective check, never before it)."""

import re

import pytest
import torch
import torch.distributed as dist

import ringwise

GOOD = dict(causal=True, layout="zigzag")


def _t(*shape):
    return torch.randn(*shape)


def good_args():
    return _t(1, 4, 2, 8), _t(1, 4, 2, 8), _t(1, 4, 2, 8), dict(GOOD)


def bad_kv_heads():
    q, _, _, kw = good_args()
    return q, _t(1, 4, 0, 8), _t(1, 4, 0, 8), kw


def bad_head_dim():
    _, _, _, kw = good_args()
    return _t(1, 4, 2, 0), _t(1, 4, 2, 0), _t(1, 4, 2, 0), kw


def bad_both_docs():
    q, k, v, kw = good_args()
    total = 4 * dist.get_world_size()
    return q, k, v, dict(kw, cu_seqlens=[0, total], document_ids=torch.zeros(total, dtype=torch.long))


PROBLEMS = [  # (the bad rank's arguments, options added to them, what every rank's error must say)
    (bad_kv_heads, {}, "k/v heads \\(kv_heads\\) is 0"),
    (bad_head_dim, {}, "head_dim is 0"),
    (bad_both_docs, {}, "pass cu_seqlens or document_ids, not both"),
    (good_args, dict(backend="cuda_flash"), "backend='cuda_flash' runs on cuda tensors"),
    (good_args, dict(backend="nope"), "backend='nope' is unknown"),
    (good_args, dict(softmax_scale="0.1"), "softmax_scale must be a real number"),
    (good_args, dict(window=-1), "window must be an int >= 0"),
    (good_args, dict(window=2, causal=False), "window=2 on full attention needs its reach after the query too"),
    (good_args, dict(sinks=torch.zeros(3)), "sinks must be a 1-D tensor of one logit per query head \\(2\\)"),
    (good_args, dict(softcap=0.0), "softcap must be a finite number > 0"),
    (good_args, dict(softcap=5.0, backend="aten_cpu"), "softcap is computed by the reference kernel only"),
    (good_args, dict(cu_seqlens=[0, 3]), "cu_seqlens must start at 0 and end at the global sequence length"),
    (good_args, dict(document_ids=torch.tensor([0, 1, 0])), "document_ids"),
    (good_args, dict(transport="pigeon"), "transport='pigeon' is unknown"),
    # values the op's schema cannot even carry: refused from the front door, in the same verdict
    (good_args, dict(cu_seqlens=torch.tensor([0, 8j])), "cu_seqlens must be a 1-D integer tensor"),
    (good_args, dict(document_ids=[[0], [0, 1]]), "document_ids must be a 1-D integer tensor"),
    (good_args, dict(causal=torch.ones(3)), "causal must be True or False"),
]
IDS = [
    p[0].__name__.removeprefix("bad_") if p[0] is not good_args else "_".join(p[1]) + f"{i}"
    for i, p in enumerate(PROBLEMS)
]


def one_bad_rank(make_bad, extra, bad_rank):
    """bad_rank passes broken arguments, the others good ones; each returns its error message."""
    if dist.get_rank() == bad_rank:
        q, k, v, kw = make_bad()
        kw.update(extra)
    else:
        q, k, v, kw = good_args()
    try:
        ringwise.ring_attention(q, k, v, **kw)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("make_bad,extra,match", PROBLEMS, ids=IDS)
def test_problem_on_one_rank_stops_every_rank(cluster, W, make_bad, extra, match):
    bad_rank = W - 1
    messages = cluster(W).run(one_bad_rank, make_bad, extra, bad_rank, timeout=20)
    assert messages[0] is not None and len(set(messages)) == 1, messages  # the same error everywhere
    assert f"rank {bad_rank}: " in messages[0]
    assert re.search(match, messages[0]), messages[0]


@pytest.mark.parametrize("make_bad,extra,match", PROBLEMS, ids=IDS)
def test_problem_single_process(make_bad, extra, match):
    """No process group: the same checks raise the same messages, never another exception type."""
    if make_bad is bad_both_docs:  # it reads the world size, which needs a process group
        q, k, v, kw = good_args()
        kw.update(cu_seqlens=[0, 4], document_ids=torch.zeros(4, dtype=torch.long))
    else:
        q, k, v, kw = make_bad()
    kw.update(extra)
    with pytest.raises(ValueError) as info:
        ringwise.ring_attention(q, k, v, **kw)
    assert re.search(match, str(info.value)), str(info.value)


def test_transport_differing_between_ranks_stops_every_rank(cluster):
    """One rank staging hops through host memory while the others send directly would pair
    different messages: refused on every rank, naming the transport."""
    messages = cluster(2).run(one_bad_rank, good_args, dict(transport="host"), 1, timeout=20)
    assert messages[0] is not None and len(set(messages)) == 1, messages
    assert "transport: rank 0 auto vs rank 1 host" in messages[0], messages[0]
