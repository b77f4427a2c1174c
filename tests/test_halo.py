"""Short causal convolutions on a sharded sequence (ringwise.attention.halo): each segment's halo from the
rank that holds its predecessor, zeros before the sequence and before a document; the convolution and its
gradients (input, weight, bias) equal to one process on the whole sequence in float64, W = 1..4,
contiguous and zigzag, packed documents; the striped layout and halos longer than a segment refused."""

import itertools

import pytest
import torch
from helpers import assemble, packed

import ringwise
from ringwise.attention.halo import (
    causal_conv1d,
    delta_rule,
    halos,
    last_tokens,
    linear_scan,
    sharded_decay_scan,
    sharded_scan,
    sharded_state_scan,
)

S, B, C, K = 48, 2, 6, 4


def reference_conv(x, w, b, cu_seqlens=None):
    """The whole sequence in one process, document by document (each zero-padded on its left)."""
    bounds = cu_seqlens or [0, x.shape[1]]
    outs = []
    for a, e in zip(bounds, bounds[1:]):
        seg = torch.nn.functional.pad(x[:, a:e].transpose(1, 2), (K - 1, 0))
        outs.append(torch.nn.functional.conv1d(seg, w[:, None, :], b, groups=C).transpose(1, 2))
    return torch.cat(outs, dim=1)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, dout = (torch.randn(B, S, C, generator=g, dtype=torch.float64) for _ in range(2))
    return (
        x,
        torch.randn(C, K, generator=g, dtype=torch.float64),
        torch.randn(C, generator=g, dtype=torch.float64),
        dout,
    )


def conv_run(case):
    """On each rank: the sharded convolution and its gradients (weight and bias: this rank's share)."""
    x, w, b, dout = inputs(case["seed"])
    layout = case["layout"]
    xl = ringwise.shard(x, 1, layout).requires_grad_()
    wl, bl = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = causal_conv1d(xl, wl, bl, layout=layout, cu_seqlens=case.get("docs"))
    out.backward(ringwise.shard(dout, 1, layout))
    return dict(out=out.detach(), dx=xl.grad, dw=wl.grad, db=bl.grad)


GRID = [
    dict(world=W, layout=layout, seed=i, docs=docs)
    for i, (W, layout, docs) in enumerate(
        itertools.product([1, 2, 3, 4], ["contiguous", "zigzag"], [None, packed([5, 1, 2, 19, 21])])
    )
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: f"W{c['world']}-{c['layout']}" + ("-docs" if c["docs"] else ""))
def test_sharded_conv_matches_one_process(grid_results, case):
    results = grid_results(conv_run, GRID, case)
    x, w, b, dout = (t.requires_grad_() if i < 3 else t for i, t in enumerate(inputs(case["seed"])))
    want = reference_conv(x, w, b, case.get("docs"))
    dx, dw, db = torch.autograd.grad(want, (x, w, b), dout)
    got = assemble([r["out"] for r in results], case["layout"], 1)
    assert (got - want.detach()).abs().max() < 1e-12
    assert (assemble([r["dx"] for r in results], case["layout"], 1) - dx).abs().max() < 1e-12
    assert (sum(r["dw"] for r in results) - dw).abs().max() < 1e-12
    assert (sum(r["db"] for r in results) - db).abs().max() < 1e-12


def _halo_of_positions(layout):
    """On each rank: the halos of a sequence whose values are their global positions (+1, so 0 means a zero)."""
    x = (torch.arange(S, dtype=torch.float64) + 1)[None, :, None]
    return [h[0, :, 0].tolist() for h in halos(ringwise.shard(x, 1, layout), 3, layout, cu_seqlens=[0, 20, S])]


def test_each_segment_gets_its_predecessors(cluster):
    """Zigzag over 3 ranks (chunks of 8: rank r holds chunks r and 5 - r): each chunk's halo is the 3 positions
    before it, zeros before position 0 and before the document starting at 20 (inside chunk 2)."""
    got = cluster(3).run(_halo_of_positions, "zigzag")
    # chunk starts 0, 8, 16, 24, 32, 40 (+1 for the values); the document at 20 starts inside chunk 2
    assert got == [[[0, 0, 0], [38, 39, 40]], [[6, 7, 8], [30, 31, 32]], [[14, 15, 16], [22, 23, 24]]]


def _refused(layout, width):
    try:
        halos(ringwise.shard(torch.zeros(1, S, 2), 1, layout), width, layout)
    except ValueError as e:
        return str(e)
    return "no error"


def test_striped_and_long_halos_are_refused_alike(cluster):
    said = cluster(2).run(_refused, "striped", 3)
    assert said[0] == said[1] and "the striped layout spreads them over every rank" in said[0]
    said = cluster(4).run(_refused, "zigzag", 7)
    assert said[0] == said[1] and "a halo of 7 tokens is longer than a segment (6 tokens)" in said[0]


# ---------------------------------------------------------------- linear recurrences


def scan_inputs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    a = torch.rand(B, S, 3, C, generator=g, dtype=torch.float64) * 0.4 + 0.6  # decays, per head and channel
    b, dout = (torch.randn(B, S, 3, C, generator=g, dtype=torch.float64) for _ in range(2))
    return a, b, dout


def reference_scan(a, b, cu_seqlens=None):
    """The sequential scan over the whole sequence, the state reset at each document's start."""
    if cu_seqlens is not None:
        keep = torch.ones(S, dtype=torch.float64)
        keep[torch.tensor(cu_seqlens[:-1])] = 0
        a = a * keep[None, :, None, None]
    return linear_scan(a, b)


def scan_run(case):
    a, b, dout = scan_inputs(case["seed"])
    layout = case["layout"]
    al, bl = (ringwise.shard(t, 1, layout).requires_grad_() for t in (a, b))
    h, final = sharded_scan(al, bl, layout=layout, cu_seqlens=case.get("docs"))
    h.backward(ringwise.shard(dout, 1, layout))
    return dict(h=h.detach(), final=final.detach(), da=al.grad, db=bl.grad)


@pytest.mark.parametrize("case", GRID, ids=lambda c: f"W{c['world']}-{c['layout']}" + ("-docs" if c["docs"] else ""))
def test_sharded_scan_matches_the_sequential_scan(grid_results, case):
    """States and gradients (decays and inputs) of the sharded scan equal the sequential scan of one process
    on the whole sequence (float64, to round-off: the same algebra, another order of additions)."""
    results = grid_results(scan_run, GRID, case)
    a, b, dout = scan_inputs(case["seed"])
    a.requires_grad_(), b.requires_grad_()
    want = reference_scan(a, b, case.get("docs"))
    da, db = torch.autograd.grad(want, (a, b), dout)
    lay = case["layout"]
    assert (assemble([r["h"] for r in results], lay, 1) - want.detach()).abs().max() < 1e-11
    assert (assemble([r["da"] for r in results], lay, 1) - da).abs().max() < 1e-10
    assert (assemble([r["db"] for r in results], lay, 1) - db).abs().max() < 1e-11
    for r in results:  # every rank holds the state after the sequence's last token
        assert (r["final"] - want[:, -1].detach()).abs().max() < 1e-11


def _differing_lengths():
    """Rank 1 passes a shard one token longer: refused on both ranks alike, before any tail is sent."""
    import torch.distributed as dist

    x = torch.zeros(1, 8 + dist.get_rank(), 2)
    try:
        causal_conv1d(x, torch.ones(2, K), layout="contiguous")
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_that_differ_are_refused_alike(cluster):
    said = cluster(2).run(_differing_lengths)
    assert said[0] == said[1] and "every rank must pass the same shapes and options" in said[0], said


# ---------------------------------------------------------------- the delta rule's matrix state across ranks

DK, DV, HV = 8, 6, 3  # odd value heads, dk != dv


def delta_inputs(seed, dtype=torch.float64, shape=(HV, DK, DV)):
    """shape: (heads, dk, dv)."""
    g = torch.Generator().manual_seed(seed)
    hv, dk, dv = shape
    q, k = (torch.randn(B, S, hv, dk, generator=g, dtype=torch.float64) for _ in range(2))
    k = torch.nn.functional.normalize(k, dim=-1)  # as the models' kernels l2-normalise keys: a stable recurrence
    v, dout = (torch.randn(B, S, hv, dv, generator=g, dtype=torch.float64) for _ in range(2))
    decay = -torch.rand(B, S, hv, generator=g, dtype=torch.float64)  # log of a decay in (1/e, 1]
    beta = torch.rand(B, S, hv, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, decay, beta, dout)]


def _transformers_kernel(q, k, v, initial_state, g, beta):
    """transformers' torch_chunk_gated_delta_rule (Qwen3-Next), in the signature sharded_state_scan calls."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    return torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, chunk_size=8, initial_state=initial_state, output_final_state=True
    )


def _delta_kernel(name):
    return delta_rule if name == "reference" else _transformers_kernel


def delta_run(case):
    """On each rank: the sharded delta rule's outputs and the gradients of its shard's inputs."""
    *xs, dout = delta_inputs(case["seed"], getattr(torch, case["dtype"]), case.get("shape", (HV, DK, DV)))
    layout = case["layout"]
    q, k, v, decay, beta = (ringwise.shard(t, 1, layout).requires_grad_() for t in xs)
    out, final = sharded_state_scan(
        _delta_kernel(case["kernel"]), q, k, v, dict(g=decay, beta=beta), layout=layout, cu_seqlens=case.get("docs")
    )
    out.backward(ringwise.shard(dout, 1, layout))
    return dict(out=out.detach(), final=final.detach(), grads=[t.grad for t in (q, k, v, decay, beta)])


def by_documents(kernel, xs, cu_seqlens):
    """One process on the whole sequence, each document from a zero state: (outputs, the last one's final state)."""
    bounds = cu_seqlens or [0, S]
    outs, final = [], None
    for a, e in zip(bounds, bounds[1:]):
        parts = [None if x is None else x[:, a:e] for x in xs[:3]]
        out, final = kernel(*parts, initial_state=None, **{n: x[:, a:e] for n, x in xs[3].items()})
        outs.append(out)
    return torch.cat(outs, dim=1), final


DELTA_GRID = [
    dict(world=W, layout=layout, seed=10 + i, kernel="reference", dtype="float64")
    for i, (W, layout) in enumerate(itertools.product([1, 2, 3, 4], ["contiguous", "zigzag"]))
] + [
    dict(world=3, layout="zigzag", seed=30, kernel="transformers", dtype="float32"),
    # packed documents: a document start inside a segment cuts its chain, one at a segment's start resets it
    dict(world=3, layout="zigzag", seed=33, kernel="reference", dtype="float64", docs=packed([5, 1, 2, 19, 21])),
    dict(world=4, layout="contiguous", seed=34, kernel="reference", dtype="float64", docs=packed([12, 12, 3, 21])),
    dict(world=2, layout="zigzag", seed=35, kernel="transformers", dtype="float32", docs=packed([7, 30, 11])),
    # real shapes: Qwen3-Next's linear-attention heads are 128 wide (dk = dv = 128); an odd head count
    dict(world=3, layout="zigzag", seed=31, kernel="reference", dtype="float64", shape=(3, 128, 128)),
    dict(world=2, layout="contiguous", seed=32, kernel="transformers", dtype="float32", shape=(5, 128, 64)),
]


@pytest.mark.parametrize(
    "case",
    DELTA_GRID,
    ids=lambda c: (
        f"W{c['world']}-{c['layout']}-{c['kernel']}-{c['dtype']}"
        + ("-{}x{}x{}".format(*c["shape"]) if "shape" in c else "")
        + ("-docs" if "docs" in c else "")
    ),
)
def test_sharded_delta_rule_matches_one_process(grid_results, case):
    """The gated delta rule's outputs and every input gradient (q, k, v, decays, betas), sharded with its matrix
    state carried across ranks, equal one process on the whole sequence: the reference kernel in float64 to
    round-off; transformers' chunked float32 kernel within 2x its own error against float64 (+ float32 eps)."""
    if case["kernel"] == "transformers":
        pytest.importorskip("transformers")
    results = grid_results(delta_run, DELTA_GRID, case)
    lay = case["layout"]
    got_out = assemble([r["out"] for r in results], lay, 1)
    got_grads = [assemble([r["grads"][j] for r in results], lay, 1) for j in range(5)]

    def one_process(kernel, dtype):
        *xs, dout = delta_inputs(case["seed"], dtype, case.get("shape", (HV, DK, DV)))
        xs = [t.requires_grad_() for t in xs]
        out, final = by_documents(kernel, [*xs[:3], dict(g=xs[3], beta=xs[4])], case.get("docs"))
        return out.detach(), torch.autograd.grad(out, xs, dout), final.detach()

    want_out, want_grads, want_final = one_process(delta_rule, torch.float64)
    for r in results:  # every rank holds the state after the sequence's last token
        assert (r["final"].double() - want_final).abs().max() < (1e-11 if case["dtype"] == "float64" else 1e-4)
    if case["dtype"] == "float64":
        assert (got_out - want_out).abs().max() < 1e-11
        for got, want in zip(got_grads, want_grads):
            assert (got - want).abs().max() < 1e-10 * max(1.0, want.abs().max().item())
        return
    own_out, own_grads, _ = one_process(_delta_kernel(case["kernel"]), torch.float32)
    from helpers import EPS, assert_within_budget, max_err

    # the transformers kernel scales queries by dk^-0.5: the float64 truth of the same layer
    scale = case.get("shape", (HV, DK, DV))[1] ** -0.5
    want_out = want_out * scale
    want_grads = [g * scale for g in want_grads]  # the output is linear in q: every gradient scales with it
    assert_within_budget("out", max_err(got_out, want_out), max_err(own_out, want_out), EPS["float32"], ceiling=1e-4)
    for name, got, own, want in zip(("dq", "dk", "dv", "dg", "dbeta"), got_grads, own_grads, want_grads):
        size = max(1.0, want.abs().max().item())
        assert_within_budget(name, max_err(got, want), max_err(own, want), EPS["float32"] * size, ceiling=1e-4 * size)


# ---------------------------------------------------------------- a decaying state through a model's kernel

P, N = 4, 5  # head width and state size (Mamba2's head_dim and ssm_state_size), odd head count HV


def ssd_kernel(x, initial_state, g, b, c):
    """Mamba2's state-space recurrence token by token (the reference of sharded_decay_scan's kernel): a (P, N)
    state per head decaying by exp(g) per token, h_t = exp(g_t) h + x_t b_t^T, out_t = h_t c_t."""
    h = x.new_zeros(x.shape[0], x.shape[2], P, N) if initial_state is None else initial_state
    outs = []
    for t in range(x.shape[1]):
        h = g[:, t].exp()[..., None, None] * h + x[:, t, :, :, None] * b[:, t, :, None, :]
        outs.append(torch.einsum("bhpn,bhn->bhp", h, c[:, t]))
    return torch.stack(outs, dim=1), h


def decay_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    x, dout = (torch.randn(B, S, HV, P, generator=gen, dtype=torch.float64) for _ in range(2))
    b, c = (torch.randn(B, S, HV, N, generator=gen, dtype=torch.float64) for _ in range(2))
    g = -torch.rand(B, S, HV, generator=gen, dtype=torch.float64)
    return x, g, b, c, dout


def decay_run(case):
    *xs, dout = decay_inputs(case["seed"])
    layout = case["layout"]
    x, g, b, c = (ringwise.shard(t, 1, layout).requires_grad_() for t in xs)
    out, final = sharded_decay_scan(ssd_kernel, x, dict(g=g, b=b, c=c), layout=layout, cu_seqlens=case.get("docs"))
    out.backward(ringwise.shard(dout, 1, layout))
    return dict(out=out.detach(), final=final.detach(), grads=[t.grad for t in (x, g, b, c)])


DECAY_GRID = [
    dict(world=W, layout=layout, seed=50 + i, docs=docs)
    for i, (W, layout, docs) in enumerate(
        itertools.product([1, 2, 3, 4], ["contiguous", "zigzag"], [None, packed([5, 1, 2, 19, 21])])
    )
]


@pytest.mark.parametrize(
    "case", DECAY_GRID, ids=lambda c: f"W{c['world']}-{c['layout']}" + ("-docs" if c["docs"] else "")
)
def test_sharded_decay_scan_matches_one_process(grid_results, case):
    """A decaying (P x N per head) state carried across ranks through a kernel: outputs, every input gradient and
    the final state (on every rank) equal one process document by document, float64 to round-off."""
    results = grid_results(decay_run, DECAY_GRID, case)
    lay = case["layout"]
    *xs, dout = decay_inputs(case["seed"])
    xs = [t.requires_grad_() for t in xs]
    want, final = by_documents(
        lambda x, _k, _v, initial_state, **kw: ssd_kernel(x, initial_state, **kw),
        [xs[0], None, None, dict(g=xs[1], b=xs[2], c=xs[3])],
        case.get("docs"),
    )
    grads = torch.autograd.grad(want, xs, dout)
    assert (assemble([r["out"] for r in results], lay, 1) - want.detach()).abs().max() < 1e-11
    for j, g in enumerate(grads):
        assert (assemble([r["grads"][j] for r in results], lay, 1) - g).abs().max() < 1e-10 * max(1, g.abs().max())
    for r in results:
        assert (r["final"] - final.detach()).abs().max() < 1e-11


def _last_tokens(layout, width):
    x = torch.arange(2 * 24 * 3, dtype=torch.float64).view(2, 24, 3)
    return last_tokens(ringwise.shard(x, 1, layout), width, layout=layout), x[:, -width:]


@pytest.mark.parametrize("world, layout", [(1, "zigzag"), (2, "zigzag"), (3, "contiguous"), (4, "zigzag")])
def test_last_tokens_are_the_sequences_last_on_every_rank(cluster, world, layout):
    """A short convolution's state after a sharded prefill: the global sequence's last tokens, on every rank."""
    for got, want in cluster(world).run(_last_tokens, layout, 3):
        assert torch.equal(got, want)


def _scan_comms(kind):
    """Forward and backward collectives of one sharded scan on this rank, beside one plain differentiable
    all-gather's backward (what a gather's gradient costs on this backend)."""
    import torch.distributed.nn.functional as dnn

    from ringwise.testing.comms import count_comms

    if kind == "delta":
        *xs, dout = delta_inputs(10)
        q, k, v, decay, beta = (ringwise.shard(x, 1, "zigzag").requires_grad_() for x in xs)
        with count_comms() as fwd:
            out, _ = sharded_state_scan(delta_rule, q, k, v, dict(g=decay, beta=beta), layout="zigzag")
    else:
        *xs, dout = decay_inputs(50)
        x, g, b, c = (ringwise.shard(t, 1, "zigzag").requires_grad_() for t in xs)
        with count_comms() as fwd:
            out, _ = sharded_decay_scan(ssd_kernel, x, dict(g=g, b=b, c=c), layout="zigzag")
    with count_comms() as bwd:
        out.backward(ringwise.shard(dout, 1, "zigzag"))
    one = torch.ones(3, requires_grad=True)
    gathered = dnn.all_gather(one)
    with count_comms() as plain:
        sum(t.sum() for t in gathered).backward()
    return dict(fwd.counts), dict(bwd.counts), dict(plain.counts)


@pytest.mark.parametrize("kind", ["delta", "decay"])
def test_one_summary_gather_per_scan_and_direction(cluster, kind):
    """A scan's communication: one object gather (the ranks' agreement) and one all-gather of the segments'
    summaries forward, that gather's gradient alone backward, whatever W."""
    for fwd, bwd, plain in cluster(3).run(_scan_comms, kind):
        assert fwd == {"all_gather_object": 1, "all_gather": 1}, fwd
        assert bwd == plain and bwd, (bwd, plain)
