"""Single-process pieces: causal tiling, the lse merge, layouts, kernels."""

import itertools

import pytest
import torch
from helpers import max_err, reference_attention

import ringwise
from ringwise.attention.kernels import ReferenceKernel, select_kernel
from ringwise.attention.layout import global_indices, segments
from ringwise.attention.merge import merge_into
from ringwise.attention.tiles import Mask, step_tiles


@pytest.mark.parametrize(
    "layout,W,causal", list(itertools.product(ringwise.LAYOUTS, [1, 2, 3, 4, 5, 8], [False, True]))
)
def test_tiles_cover_exactly_the_mask(layout, W, causal):
    """Every visible (query, key) pair is computed exactly once; no invisible pair is."""
    L = 2 * 3  # even, so zigzag can split it
    S = L * W
    covered = torch.zeros(S, S, dtype=torch.int64)
    for r, src in itertools.product(range(W), range(W)):
        qpos, kpos = global_indices(layout, r, W, S), global_indices(layout, src, W, S)
        for t in step_tiles(layout, r, src, W, L, Mask(causal)):
            for i in range(t.q_len):
                for j in range(t.k_len):
                    if not t.causal or j <= i:
                        covered[qpos[t.q_start + i], kpos[t.k_start + j]] += 1
    want = torch.ones(S, S, dtype=torch.int64)
    if causal:
        want = want.tril()
    assert torch.equal(covered, want)


@pytest.mark.parametrize("W", [2, 3, 4, 8])
def test_balanced_layouts_share_causal_work(W):
    """Zigzag gives every rank the same causal work; contiguous does not."""
    L = 64

    def work(layout):
        return [sum(t.work for s in range(W) for t in step_tiles(layout, r, s, W, L, Mask(True))) for r in range(W)]

    assert len(set(work("zigzag"))) == 1
    striped = work("striped")
    assert max(striped) - min(striped) <= W * L  # at most one diagonal per step
    contiguous = work("contiguous")
    assert contiguous[-1] > 2 * contiguous[0]


def test_zigzag_steps_are_single_calls():
    """Off-diagonal zigzag steps fuse into one kernel call each."""
    for W in (2, 3, 4):
        for r, s in itertools.product(range(W), range(W)):
            tiles = step_tiles("zigzag", r, s, W, 16, Mask(True))
            assert len(tiles) == (3 if r == s else 1)  # own step: two diagonals and one full block


def test_merge_is_exact_and_inf_safe():
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 8, 4, dtype=torch.float64),
        torch.randn(1, 2, 10, 4, dtype=torch.float64),
        torch.randn(1, 2, 10, 4, dtype=torch.float64),
    )
    ref = ReferenceKernel()
    full_o, full_lse = ref.forward(q, k, v, False, 0.5)
    a_o, a_lse = ref.forward(q, k[:, :, :4], v[:, :, :4], False, 0.5)
    b_o, b_lse = ref.forward(q, k[:, :, 4:], v[:, :, 4:], False, 0.5)
    out, lse = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for o, part_lse in ((a_o, a_lse), (b_o, b_lse)):
        merge_into(out, lse, o, part_lse)
    assert max_err(out, full_o) < 1e-14 and max_err(lse, full_lse) < 1e-14
    # rows that saw nothing (lse = -inf on both sides) stay exactly 0
    out, lse = torch.zeros(1, 1, 3, 4), torch.full((1, 1, 3), float("-inf"))
    merge_into(out, lse, torch.zeros(1, 1, 3, 4), torch.full((1, 1, 3), float("-inf")))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_reference_kernel_empty_rows_are_zero():
    q = torch.randn(1, 1, 4, 8)
    band = (1, 3)  # row i sees keys i-3 .. i-1: row 0 sees none
    out, lse = ReferenceKernel().forward(q, q, q, False, 0.3, band=band)
    assert torch.equal(out[0, 0, 0], torch.zeros(8)) and torch.isneginf(lse[0, 0, 0])
    assert torch.isfinite(lse[0, 0, 1:]).all()
    dq, dk, dv = ReferenceKernel().backward(torch.ones_like(out), q, q, q, out, lse, False, 0.3, band=band)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_agree_with_reference(dtype, causal):
    """aten_cpu and the pure-PyTorch kernel give the same (out, lse, grads), GQA included."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, 33, 16, dtype=dtype)
    k, v = torch.randn(2, 2, 33, 16, dtype=dtype), torch.randn(2, 2, 33, 16, dtype=dtype)
    dout = torch.randn_like(q)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    aten = select_kernel("aten_cpu", q.device, dtype, 16)
    ref = ReferenceKernel(chunk=8)
    (o1, l1), (o2, l2) = aten.forward(q, k, v, causal, 0.25), ref.forward(q, k, v, causal, 0.25)
    assert max_err(o1, o2) < tol and max_err(l1, l2) < tol
    for g1, g2 in zip(
        aten.backward(dout, q, k, v, o1, l1, causal, 0.25), ref.backward(dout, q, k, v, o1, l1, causal, 0.25)
    ):
        assert max_err(g1, g2) < tol * 10


@pytest.mark.parametrize("backend", ["reference", "aten_cpu"])
def test_single_process_matches_reference(backend):
    """No process group: plain blockwise attention through the same call."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 40, 6, 8), torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8)
    out = ringwise.ring_attention(q, k, v, causal=True, backend=backend)
    ref, _ = reference_attention(q, k, v, causal=True)
    assert max_err(out, ref) < 1e-5


def test_segments_describe_positions():
    for layout, W in itertools.product(ringwise.LAYOUTS, [1, 2, 3, 4]):
        for r in range(W):
            pos = global_indices(layout, r, W, 4 * W)
            segs = segments(layout, r, W, 4)
            rebuilt = torch.cat([s.global_start + s.stride * torch.arange(s.length) for s in segs])
            assert torch.equal(pos, rebuilt)


def test_positions_and_shard_single_process():
    x = torch.arange(10).view(1, 10)
    assert torch.equal(ringwise.shard(x, 1), x)
    assert torch.equal(ringwise.positions(10), torch.arange(10))
    padded, n = ringwise.pad_to_multiple(x, 1)
    assert n == 0 and torch.equal(padded, x)


DOC_CASES = [  # document lengths, for a global length of 24 (W in 1, 2, 3, 4 with L = 24 / W)
    (24,),
    (1, 23),
    (5, 1, 1, 17),
    (3, 9, 1, 4, 7),
    (1,) * 24,
    (13, 11),
]


@pytest.mark.parametrize("layout,W,causal", list(itertools.product(ringwise.LAYOUTS, [1, 2, 3, 4], [False, True])))
@pytest.mark.parametrize("lengths", DOC_CASES)
def test_document_tiles_cover_exactly_the_document_mask(layout, W, causal, lengths):
    """Packed documents: every (query, key) pair in the same document (and causal) exactly once."""
    S = 24
    L = S // W
    if layout == "zigzag" and W > 1 and L % 2:
        pytest.skip("zigzag needs an even local length")
    docs = tuple(itertools.accumulate((0,) + lengths))
    doc_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    covered = torch.zeros(S, S, dtype=torch.int64)
    for r, src in itertools.product(range(W), range(W)):
        qpos, kpos = global_indices(layout, r, W, S), global_indices(layout, src, W, S)
        for t in step_tiles(layout, r, src, W, L, Mask(causal, docs)):
            for i in range(t.q_len):
                for j in range(t.k_len):
                    if not t.causal or j <= i:
                        covered[qpos[t.q_start + i], kpos[t.k_start + j]] += 1
    want = (doc_of[:, None] == doc_of[None, :]).long()
    if causal:
        want = want.tril()
    assert torch.equal(covered, want)


def test_merge_propagates_nan():
    """A NaN block (or accumulator) stays NaN; a -inf block adds nothing even to a -inf row."""
    out, lse = torch.zeros(1, 1, 2, 4), torch.tensor([[[0.5, float("-inf")]]])
    merge_into(out, lse, torch.full((1, 1, 2, 4), float("nan")), torch.full((1, 1, 2), float("nan")))
    assert torch.isnan(out).all() and torch.isnan(lse).all()


@pytest.mark.parametrize("n", list(range(1, 17)) + [33])
@pytest.mark.parametrize("poison", ["neg_inf_key", "nan_q", "nan_scale", "nan_v_masked"])
def test_non_finite_inputs_at_every_tile_size(n, poison):
    """One process, tiles of 1 to 16 rows (and 33): ring_attention with the default (fused)
    kernel gives the reference kernel's out and lse: lse = -inf and out = 0 for a row whose
    scores are all -inf, NaN for NaN inputs, and a NaN value hidden by the causal mask
    changes nothing."""
    torch.manual_seed(n)
    q, k, v = torch.randn(1, n, 2, 8), torch.randn(1, n, 1, 8), torch.randn(1, n, 1, 8)
    q[..., 0] = q[..., 0].abs() + 0.1
    scale = 0.3
    if poison == "neg_inf_key":
        k[:, 0, :, 0] = float("-inf")  # query 0 sees only key 0: no finite score
    elif poison == "nan_q":
        q[:, n // 2, 1, 3] = float("nan")
    elif poison == "nan_scale":
        scale = float("nan")
    else:
        v[:, n - 1, :, 2] = float("nan")  # only the last query sees the last key
    out, lse = ringwise.ring_attention(q, k, v, causal=True, softmax_scale=scale, return_lse=True)
    ref_o, ref_lse = ReferenceKernel().forward(*(x.transpose(1, 2).double() for x in (q, k, v)), True, scale)
    ref_o = ref_o.transpose(1, 2)
    for a, b in ((out, ref_o), (lse, ref_lse)):
        for pred in (torch.isnan, torch.isneginf, torch.isposinf):
            assert torch.equal(pred(a), pred(b)), (pred.__name__, a, b)
        fin = torch.isfinite(b)
        assert not fin.any() or max_err(a[fin], b[fin]) < 1e-5
    if poison == "neg_inf_key":
        assert torch.isneginf(lse[:, :, 0]).all() and (out[:, 0] == 0).all()
    elif poison == "nan_v_masked":
        assert torch.isnan(out[:, -1, :, 2]).all() and torch.isfinite(out[:, :-1]).all()
    else:
        assert torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_is_exact(dtype):
    """The ring's input check (one sum per tensor) says "finite" exactly when every element is:
    a non-finite element always shows, finite elements whose sum overflows do not fool it."""
    from ringwise.attention.ring import _finite

    big = torch.finfo(dtype).max
    x = torch.randn(3, 5, 4, 8).to(dtype)
    assert _finite(x) and _finite(x, x.transpose(1, 2))
    assert _finite(torch.full((64,), big, dtype=dtype))  # the sum overflows, the elements do not
    assert _finite(torch.full((8,), big, dtype=dtype), torch.full((8,), -big, dtype=dtype))
    for bad in (float("inf"), float("-inf"), float("nan")):
        y = x.clone()
        y[2, 4, 3, 7] = bad
        assert not _finite(y) and not _finite(x, y) and not _finite(y.transpose(1, 2))
    pair = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # the sum is NaN
    assert not _finite(pair[:1], pair[1:])
