"""The ring engine in one process: a fused tile whose result is not finite is recomputed on the
reference kernel, forward and backward alike; and the two dK/dV routes (relayed, direct) sum
the same shares. World size 1 (`Ring()`), or one rank of a loopback ring; no cluster."""

import pytest
import torch
from helpers import count_comms, max_err, reference_attention

import ringwise.attention.ring as ring_mod
from ringwise.attention.comm import Ring
from ringwise.attention.kernels import AtenCpuKernel, select_kernel
from ringwise.attention.layout import global_indices
from ringwise.attention.ring import Engine, ring_backward, ring_forward
from ringwise.attention.tiles import Mask, step_tiles
from ringwise.bench.compute import LoopbackRing, rank_inputs

L, WINDOW = 160, 70  # at W=1: causal squares, anti-causal squares (a flipped fused kernel) and a full tile


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _count_calls(monkeypatch, obj, name):
    """Replace obj.name by a wrapper that counts its calls; returns the counter (a list)."""
    calls, inner = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_non_finite_fused_tile_is_recomputed_on_the_reference_kernel(monkeypatch, direction):
    """The fused kernel returns a NaN/inf/-inf in lse (forward) or in one of dq, dk, dv
    (backward) on two tiles in three, of every kind; those tiles, and only those, rerun on
    the reference kernel, and the result is exact against float64 (the poison would be NaN)."""
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = _randn(g, 1, L, 4, 16), _randn(g, 1, L, 2, 16), _randn(g, 1, L, 2, 16), _randn(g, 1, L, 4, 16)
    scale = 16**-0.5
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(qr, kr, vr, True, mask=i - j <= WINDOW)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout)

    tiles = step_tiles("contiguous", 0, 0, 1, L, Mask(True, window=WINDOW))
    assert {(t.causal, t.anti) for t in tiles} == {(True, False), (False, True), (False, False)}
    kernel = select_kernel("auto", q.device, q.dtype, 16)
    assert isinstance(kernel, AtenCpuKernel)
    fused, calls, poisoned = getattr(kernel, direction), [], []

    def poisoning(*args):
        res = list(fused(*args))
        calls.append(1)
        if len(calls) % 3:
            which = 1 if direction == "forward" else len(poisoned) % 3  # lse; or dq, dk, dv in turn
            res[which] = res[which].clone(memory_format=torch.contiguous_format)
            res[which].view(-1)[len(poisoned)] = (float("nan"), float("inf"), float("-inf"))[len(poisoned) % 3]
            poisoned.append(which)
        return tuple(res)

    monkeypatch.setattr(kernel, direction, poisoning)  # Flipped(kernel) calls it too
    reruns = _count_calls(monkeypatch, ring_mod._REFERENCE, direction)
    ring = Ring()
    assert ring.world_size == 1
    engine = Engine(scale, "contiguous", ring, kernel, Mask(True, window=WINDOW))
    out, lse = ring_forward(q, k, v, engine)
    if direction == "forward":
        got, want = (out, lse), (ref_out, ref_lse)
    else:
        got = ring_backward(dout, q, k, v, out, lse, engine)
        want = ref_grads
    assert len(calls) == len(tiles) and len(poisoned) == 4 and len(reruns) == len(poisoned)
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-12


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float16_tiles_whose_fused_backward_overflows_rerun_on_the_reference_kernel(monkeypatch, causal):
    """Large dO and V in float16 (finite inputs, finite true gradients): the fused CPU backward
    holds dS = P (dP - D) in float16, which overflows, so its dq and dk come out non-finite.
    The ring reruns the tile on the reference kernel (float32 inside) and is as exact as a ring
    on the reference kernel alone: error <= 2 x that error + eps, against float64."""
    g = torch.Generator().manual_seed(1)
    a, d = 4.0, 16
    scale = 0.25 / a**2  # scores as with unit q, k; q and k a times larger shrink dq, dk by a
    q, k = _randn(g, 1, 32, 2, d, scale=a), _randn(g, 1, 32, 2, d, scale=a)
    v, dout = _randn(g, 1, 32, 2, d, scale=30.0), _randn(g, 1, 32, 2, d, scale=3000.0)
    q, k, v, dout = (x.half() for x in (q, k, v, dout))
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, _ = reference_attention(qr, kr, vr, causal, scale=scale)
    ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), dout.double())
    ring = Ring()

    def grads(backend):
        kernel = select_kernel(backend, q.device, q.dtype, d)
        engine = Engine(scale, "contiguous", ring, kernel, Mask(causal))
        out, lse = ring_forward(q, k, v, engine)
        return ring_backward(dout, q, k, v, out, lse, engine), out, lse

    budget, _, _ = grads("reference")
    reruns = _count_calls(monkeypatch, ring_mod._REFERENCE, "backward")
    got, out, lse = grads("auto")
    assert len(reruns) == len(step_tiles("contiguous", 0, 0, 1, 32, Mask(causal))) == 1
    alone = AtenCpuKernel().backward(*(x.transpose(1, 2) for x in (dout, q, k, v, out)), lse, causal, scale)
    assert not torch.isfinite(alone[0]).all() and not torch.isfinite(alone[1]).all(), (
        "the fused CPU kernel no longer overflows here: these inputs test nothing"
    )
    for name, x, y, r in zip(("dq", "dk", "dv"), got, budget, ref_grads):
        assert r.abs().max() < 60000 and torch.isfinite(x).all(), name
        assert max_err(x, r) <= 2 * max_err(y, r) + 1e-3, (name, max_err(x, r), max_err(y, r))


# ---------------------------------------------------------------- the two dK/dV routes


def _periodic(block, layout, world):
    """A global tensor whose shard is `block` on every rank."""
    whole = torch.empty(block.shape[0], block.shape[1] * world, *block.shape[2:], dtype=block.dtype)
    for r in range(world):
        whole[:, global_indices(layout, r, world, whole.shape[1])] = block
    return whole


@pytest.mark.parametrize(
    "world,layout,causal,window",
    [
        (1, "zigzag", True, None),
        (2, "zigzag", True, None),
        (3, "striped", False, None),
        (4, "contiguous", True, None),
        (4, "zigzag", True, 30),
        (4, "contiguous", True, 5),
    ],
)
def test_relayed_and_direct_routes_give_identical_gradients(monkeypatch, world, layout, causal, window):
    """One rank of a loopback ring (each hop hands back a copy of what it sends) with the same
    K/V on every shard: rank r's dK/dV is then the sum of its own shares over the ring steps,
    on either route, bit for bit (the same float additions in another order of operands);
    summed over ranks it is the whole sequence's dK/dV folded onto one shard. Relayed: one
    dkv hop per step; direct: one per step after the first."""
    Ls, d = 12, 16
    g = torch.Generator().manual_seed(world)
    q, dout = _randn(g, 2, Ls * world, 4, d), _randn(g, 2, Ls * world, 4, d)
    k, v = (_periodic(_randn(g, 2, Ls, 2, d), layout, world) for _ in range(2))
    i, j = torch.arange(Ls * world)[:, None], torch.arange(Ls * world)[None, :]
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, _ = reference_attention(qr, kr, vr, causal, mask=None if window is None else i - j <= window)
    _, ref_dk, ref_dv = torch.autograd.grad(ref_out, (qr, kr, vr), dout)
    kernel, scale = select_kernel("auto", q.device, q.dtype, d), d**-0.5
    schedule = Engine.schedule
    steps, relay = schedule(Engine(scale, layout, LoopbackRing(0, world), kernel, Mask(causal, window=window)), Ls)
    assert relay and len(steps) == (2 if window == 5 else world)  # a prefix of the ring, all of it or not
    totals = {}
    for r in range(world):
        q_r, k_r, v_r, dout_r = rank_inputs((q, k, v, dout), layout, r, world)
        engine = Engine(scale, layout, LoopbackRing(r, world), kernel, Mask(causal, window=window))
        out, lse = ring_forward(q_r, k_r, v_r, engine)
        routes = {}
        for route, relayed in (("relayed", True), ("direct", False)):
            with monkeypatch.context() as patch, count_comms() as c:  # the same steps, routed one way or the other
                patch.setattr(Engine, "schedule", lambda *a, relayed=relayed: (schedule(*a)[0], relayed))
                routes[route] = ring_backward(dout_r, q_r, k_r, v_r, out, lse, engine)
            m = len(steps) - 1
            assert dict(c.hops) == ({"kv": m, "dkv": m + relayed} if m else {}), route
        assert all(torch.equal(a, b) for a, b in zip(routes["relayed"], routes["direct"]))
        for name, x in zip(("dk", "dv"), routes["relayed"][1:]):
            totals[name] = totals.get(name, 0) + x
    for name, ref in (("dk", ref_dk), ("dv", ref_dv)):
        folded = sum(ref[:, global_indices(layout, r, world, Ls * world)] for r in range(world))
        assert max_err(totals[name], folded) < 1e-12, name
