"""The harness itself: the oracle, the one budget rule, the batched-grid runner."""

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CEILINGS,
    assert_within_budget,
    document_mask,
    expected_hops,
    max_err,
    packed,
    reference_attention,
    run_each,
    schedule_from_mask,
    visible_mask,
)


def test_budget_is_two_kernel_errors_plus_eps_and_capped():
    assert_within_budget("out", 2.9e-6, 1e-6, 1e-6, ceiling=1e-4)
    with pytest.raises(AssertionError, match=r"out: error 3.1e-06 > 2 x kernel error 1e-06"):
        assert_within_budget("out", 3.1e-6, 1e-6, 1e-6, ceiling=1e-4)
    # a broken kernel (huge error) cannot widen the budget past the ceiling
    with pytest.raises(AssertionError, match="> the ceiling"):
        assert_within_budget("dq", 0.5, 1.0, 1e-6, ceiling=CEILINGS["float32"])
    with pytest.raises(AssertionError):  # NaN never passes
        assert_within_budget("dq", float("nan"), 1e-6, 1e-6, ceiling=1.0)
    with pytest.raises(TypeError):  # the ceiling is not optional
        assert_within_budget("dq", 0.0, 0.0, 1e-6)
    assert CEILINGS["float64"] < CEILINGS["float32"] < CEILINGS["float16"] < CEILINGS["bfloat16"]


def test_reference_matches_sdpa_and_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 11, 4, 8, generator=g),
        torch.randn(2, 11, 2, 8, generator=g),
        torch.randn(2, 11, 2, 8, generator=g),
    )
    mask = visible_mask(11, True, 3, packed([4, 7]))
    out, lse = reference_attention(q, k, v, mask=mask)
    sdpa = F.scaled_dot_product_attention(
        *(x.double().transpose(1, 2) for x in (q, k, v)), attn_mask=mask, enable_gqa=True
    ).transpose(1, 2)
    assert max_err(out, sdpa) < 1e-12
    # causal= and a mask are and-ed; a document mask is the same as visible_mask's documents
    out2, lse2 = reference_attention(q, k, v, causal=True, mask=visible_mask(11, False, 3, packed([4, 7])))
    assert max_err(out, out2) == 0 and max_err(lse, lse2) == 0
    assert torch.equal(document_mask(packed([4, 7]), 11), visible_mask(11, False, None, packed([4, 7])))


def test_reference_sinks_and_softcap():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 5, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = reference_attention(q, k, v, causal=True, sinks=sinks, softcap=2.0)
    s = 2.0 * torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.5 / 2.0)
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    full = torch.cat([s, sinks[None, :, None, None].expand(1, 2, 5, 1)], -1)  # the sink: a key with value 0
    assert max_err(lse, torch.logsumexp(full, -1)) < 1e-12
    assert max_err(out, torch.einsum("bhqk,bkhd->bqhd", torch.softmax(full, -1)[..., :5], v)) < 1e-12
    # a row that sees nothing: lse -inf, out 0
    out, lse = reference_attention(q, k, v, mask=torch.zeros(5, 5, dtype=torch.bool))
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_expected_hops_from_a_mask():
    W, S = 4, 16
    assert expected_hops(schedule_from_mask("zigzag", W, S, visible_mask(S)), W) == ({"kv": 3}, {"kv": 3, "dkv": 4})
    assert expected_hops((0,), W) == ({}, {})
    assert expected_hops((0, 1, 3), W) == ({"kv": 2}, {"kv": 2, "dkv": 2})  # direct sends: no relay home


def _fails_on_two(case):
    if case == 2:
        raise ValueError("two")
    return case * 10


def test_run_each_stops_at_the_first_failing_case():
    assert run_each(_fails_on_two, [0, 1, 3]) == [0, 10, 30]
    assert run_each(_fails_on_two, [1, 2, 3]) == [10]  # 2 and 3 are rerun one job each by grid_results
