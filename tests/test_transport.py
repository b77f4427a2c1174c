"""The host-staged transport: same results, same hops as the direct one, on real gloo rings.

On a GPU it carries CUDA tensors through pinned host buffers (tests/test_cuda.py runs it
there); forced with RINGWISE_TRANSPORT=host it stages CPU tensors the same way, which is
what these CPU tests exercise.
"""

import os

import pytest
import torch
from helpers import DTYPES, check_against_reference, count_comms, make_inputs, packed, run_attention

from ringwise.attention import comm
from ringwise.attention.comm import resolve_transport


def ring_case(case):
    return run_attention(case, *make_inputs(case))


def ring_case_over(transport, case):
    """ring_case with $RINGWISE_TRANSPORT set on this rank; also the bytes staged per pass."""
    saved = os.environ.get(comm.TRANSPORT_ENV)
    os.environ[comm.TRANSPORT_ENV] = transport
    try:
        with count_comms() as c:
            res = ring_case(case)
    finally:
        if saved is None:
            del os.environ[comm.TRANSPORT_ENV]
        else:
            os.environ[comm.TRANSPORT_ENV] = saved
    res["staged"] = dict(c.staged)
    return res


CASES = [
    dict(
        world=2,
        layout="zigzag",
        causal=True,
        dtype="float32",
        batch=1,
        heads=4,
        kv_heads=2,
        head_dim=16,
        seq=48,
        seed=31,
        cu_seqlens=packed([7, 1, 16, 24]),
    ),
    dict(
        world=3,
        layout="striped",
        causal=True,
        dtype="bfloat16",
        batch=2,
        heads=2,
        kv_heads=1,
        head_dim=8,
        seq=36,
        seed=32,
    ),
    dict(
        world=3,
        layout="contiguous",
        causal=False,
        dtype="float64",
        batch=1,
        heads=2,
        kv_heads=2,
        head_dim=8,
        seq=30,
        seed=33,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c['world']}-{c['layout']}-{c['dtype']}")
def test_host_transport_matches_direct(cluster, case):
    W = case["world"]
    direct = cluster(W).run(ring_case_over, "direct", case)
    host = cluster(W).run(ring_case_over, "host", case)
    auto = cluster(W).run(ring_case_over, "auto", case)  # CPU tensors: sent as they are
    check_against_reference(case, host)
    el = torch.tensor([], dtype=DTYPES[case["dtype"]]).element_size()
    acc = 8 if case["dtype"] == "float64" else 4
    kv_block = case["batch"] * (case["seq"] // W) * case["kv_heads"] * case["head_dim"]  # elements of k (or v)
    # forward: W-1 kv hops of (k, v); backward: W-1 kv hops and W dkv hops of (2, *k.shape) in acc dtype
    want = (W - 1) * 2 * kv_block * el + (W - 1) * 2 * kv_block * el + W * 2 * kv_block * acc
    for d, h, a in zip(direct, host, auto):
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert torch.equal(d[name], h[name]), name  # same bytes moved, same arithmetic
            assert torch.equal(d[name], a[name]), name
        assert a["staged"] == {}
        assert h["fwd_hops"] == d["fwd_hops"] == {"kv": W - 1}
        assert h["bwd_hops"] == d["bwd_hops"] == {"kv": W - 1, "dkv": W}
        assert d["staged"] == {}
        assert h["staged"] == {"to_host": want, "to_device": want}


def test_transport_choice(monkeypatch):
    monkeypatch.delenv(comm.TRANSPORT_ENV, raising=False)
    assert resolve_transport(None) == "auto"
    monkeypatch.setenv(comm.TRANSPORT_ENV, "host")
    assert resolve_transport(None) == "host"
    assert resolve_transport("direct") == "direct"  # the argument wins
    monkeypatch.setenv(comm.TRANSPORT_ENV, "pinned")
    with pytest.raises(ValueError, match=r"\$RINGWISE_TRANSPORT='pinned' is unknown; use one of auto, direct, host"):
        resolve_transport(None)
    with pytest.raises(ValueError, match=r"^transport='nccl' is unknown"):
        resolve_transport("nccl")


@pytest.mark.parametrize(
    "backend,staged",
    [
        ("gloo", True),
        ("nccl", False),
        ("cpu:gloo,cuda:nccl", False),
        ("cpu:gloo,cuda:gloo", True),
    ],
)
def test_auto_stages_cuda_tensors_only_over_gloo(monkeypatch, backend, staged):
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: backend)
    assert comm._cuda_on_gloo(None) is staged
