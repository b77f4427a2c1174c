"""ringwise.decode_attention: new tokens against a sequence-sharded cache, exact against float64 on
the whole cache, bit-identical on every rank, one collective a call; uneven and empty shards,
random non-contiguous positions, Tq in {1, 3}, GQA, windows narrower than a shard, sinks,
softcap, fully masked rows and NaN."""

import time

import pytest
import torch
import torch.distributed as dist
from helpers import (
    ALL_GATHER_SINGLE,
    CEILINGS,
    DTYPES,
    EPS,
    assert_within_budget,
    count_comms,
    max_err,
    reference_attention,
)

import ringwise


def shard_sizes(case):
    """Keys per rank: uneven, and empty shards where the case asks (e.g. the first rank)."""
    W, S = case["world"], case["keys"]
    sizes = [S // W + (r < S % W) for r in range(W)]
    for r in case.get("empty", ()):
        sizes[(r + 1) % W] += sizes[r]
        sizes[r] = 0
    if case.get("uneven") and W > 1:
        move = sizes[0] // 2
        sizes[0] -= move
        sizes[-1] += move
    return sizes


def make_case(case):
    """Global float64 inputs (the same on every rank): q, the whole cache, its positions (random,
    non-contiguous, shuffled across shards), the new tokens' positions, sinks."""
    g = torch.Generator().manual_seed(case["seed"])
    B, Tq, H, Hk, D, S = case["batch"], case["tq"], case["heads"], case["kv_heads"], case["head_dim"], case["keys"]
    q = torch.randn(B, Tq, H, D, generator=g, dtype=torch.float64) * case.get("q_scale", 1.0)
    k = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, S, Hk, D, generator=g, dtype=torch.float64)
    key_pos = torch.randperm(4 * S, generator=g)[:S]  # unsorted, gaps: a cache filled out of order
    top = int(key_pos.max())
    query_pos = torch.tensor([top + 1 + 2 * i for i in range(Tq)])
    if case.get("masked_row"):  # the first new token sees no key at all (and no sink): out 0, lse -inf
        query_pos[0] = int(key_pos.min()) - 1
    if case.get("future_keys"):  # some cached keys lie after some new tokens
        query_pos = torch.sort(key_pos[torch.randperm(S, generator=g)[:Tq]]).values
    if case.get("nan"):
        q[0, -1, 0, 0] = float("nan")
    if case.get("nan_hidden_key"):  # a NaN key no new token can see changes nothing (the fused result is checked)
        query_pos = torch.tensor([top - 5 + 2 * i for i in range(Tq)])
        k[:, int(key_pos.argmax())] = float("nan")
    sinks = torch.randn(H, generator=g, dtype=torch.float64) if case.get("sinks") else None
    return q, k, v, key_pos, query_pos, sinks


def visible(key_pos, query_pos, window, chunk=None):
    d = query_pos[:, None] - key_pos[None, :]
    ok = d >= 0
    if chunk is not None:  # Llama 4's chunked layers: same chunk of `chunk` positions
        ok &= query_pos[:, None] // chunk == key_pos[None, :] // chunk
    return ok & (d <= window) if window is not None else ok


def kwargs(case, key_pos, query_pos, sinks, dtype):
    return dict(
        key_positions=key_pos,
        query_positions=query_pos,
        window=case.get("window"),
        chunk=case.get("chunk"),
        softcap=case.get("softcap"),
        sinks=None if sinks is None else sinks.to(dtype),
        return_lse=True,
    )


def decode_case(case):
    """On every rank: this rank's shard through decode_attention, twice (the second call counted)."""
    dtype = DTYPES[case["dtype"]]
    q, k, v, key_pos, query_pos, sinks = make_case(case)
    rank = dist.get_rank()
    sizes = shard_sizes(case)
    perm = torch.randperm(case["keys"], generator=torch.Generator().manual_seed(case["seed"] + 1))
    mine = perm[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
    args = (q.to(dtype), k[:, mine].to(dtype), v[:, mine].to(dtype))
    kw = kwargs(case, key_pos[mine], query_pos, sinks, dtype)
    ringwise.decode_attention(*args, **kw)
    with count_comms() as comms:
        out, lse = ringwise.decode_attention(*args, **kw)
    return dict(out=out, lse=lse, comms=dict(comms.counts), keys=len(mine))


BASE = dict(batch=2, tq=1, heads=4, kv_heads=2, head_dim=16, keys=37, dtype="float32", seed=0)
GRID = []
for W in (1, 2, 3, 4):
    for extra in (
        dict(),
        dict(tq=3),
        dict(uneven=True),
        dict(empty=(0,)),
        dict(window=5, tq=3),
        dict(sinks=True),
        dict(softcap=4.0, tq=3),
        dict(kv_heads=1),
        dict(masked_row=True, tq=3),
        dict(future_keys=True, tq=3),
        dict(nan=True, tq=3),
        dict(nan_hidden_key=True, tq=3),
        dict(dtype="bfloat16"),
        dict(dtype="float64"),
        dict(sinks=True, window=3, masked_row=True, tq=3),
        dict(chunk=40, future_keys=True, tq=3),  # chunks of 40 positions: keys in several, queries in some
    ):
        if W == 1 and "empty" in extra:
            continue
        GRID.append(dict(BASE, world=W, seed=len(GRID), **extra))
GRID.append(dict(BASE, world=4, seed=len(GRID), empty=(0, 2), keys=3))
for W in (2, 3):  # scores in the hundreds: see the budget in the test
    GRID.append(dict(BASE, world=W, seed=len(GRID), q_scale=30.0, tq=3))  # two of four ranks hold nothing
GRID.append(dict(BASE, world=3, seed=len(GRID), keys=2, window=1, tq=3))  # window narrower than a shard
# real models' heads (SmolLM2 9/3, 5/1, MHA 7/7) and head dims: payloads of odd length put every rank's
# header at an odd offset of the gathered buffer
for W in (2, 3):
    for heads, kv_heads, head_dim in ((9, 3, 64), (5, 1, 80), (7, 7, 96), (9, 3, 128)):
        GRID.append(dict(BASE, world=W, seed=len(GRID), batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim))
    GRID.append(dict(BASE, world=W, seed=len(GRID), batch=1, heads=9, kv_heads=3, head_dim=64, tq=3, window=7))


def case_id(c):
    skip = {"world", "seed", "dtype"}
    rest = "-".join(f"{k}{'' if v is True else v}" for k, v in c.items() if k not in skip and v != BASE.get(k))
    return f"W{c['world']}-{c['dtype']}" + (f"-{rest}" if rest else "")


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_decode_matches_reference_on_every_rank(grid_results, case):
    results = grid_results(decode_case, GRID, case)
    dtype = DTYPES[case["dtype"]]
    q, k, v, key_pos, query_pos, sinks = make_case(case)
    mask = visible(key_pos, query_pos, case.get("window"), case.get("chunk"))
    # a NaN query makes its own rows NaN and touches no other row (the reference helper would zero it)
    nan_rows = torch.isnan(q).any(-1)  # (b, tq, h)
    ref, ref_lse = reference_attention(q.nan_to_num(0.0), k, v, mask=mask, sinks=sinks, softcap=case.get("softcap"))
    # the kernel's own error: one process, the whole cache, the same dtype
    kern, kern_lse = ringwise.decode_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), **kwargs(case, key_pos, query_pos, sinks, dtype)
    )
    assert sum(r["keys"] for r in results) == case["keys"]
    for r in results:
        assert same_bits(r["out"], results[0]["out"]) and same_bits(r["lse"], results[0]["lse"]), "ranks disagree"
        assert r["comms"] == ({ALL_GATHER_SINGLE: 1} if case["world"] > 1 else {}), r["comms"]
    out, lse = results[0]["out"], results[0]["lse"]
    assert torch.equal(torch.isnan(out), nan_rows[..., None].expand_as(out)), "NaN lost, or where no input had one"
    assert torch.equal(torch.isnan(lse), nan_rows.transpose(1, 2))
    if case.get("masked_row") and sinks is None:  # a new token that sees no key: out 0, lse -inf
        assert (out[:, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()
    finite = ~nan_rows[..., None].expand_as(out)
    kern_e = max_err(kern.double()[finite], ref[finite])
    eps = EPS[case["dtype"]]
    if case.get("q_scale", 1.0) > 1:  # each shard's lse is rounded to float32 at its magnitude (hundreds here),
        # so the merge weights carry that much relative error: one float32 ulp of the largest lse, on both sides
        eps += 2 * torch.finfo(torch.float32).eps * float(ref_lse[torch.isfinite(ref_lse)].abs().max())
    assert_within_budget(
        "out", max_err(out.double()[finite], ref[finite]), kern_e, eps, ceiling=CEILINGS[case["dtype"]]
    )
    rows = ~nan_rows.transpose(1, 2)
    assert torch.equal(torch.isneginf(lse[rows]), torch.isneginf(ref_lse[rows]))
    seen = rows & torch.isfinite(ref_lse)
    assert_within_budget(
        "lse",
        max_err(lse.double()[seen], ref_lse[seen]),
        max_err(kern_lse.double()[seen], ref_lse[seen]),
        eps,
        ceiling=CEILINGS[case["dtype"]],
    )


def refusal_case(kind):
    """Rank 1 alone passes something wrong, on a group's first call (checked by one object gather
    before any data moves) and on a later one (the header of the data gather, then the worded check
    where the call's signature changed): every rank raises the same error."""
    from ringwise.attention.decode import AGREEMENTS

    rank = dist.get_rank()
    q = torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(0))
    k = v = torch.randn(1, 5, 2, 8, generator=torch.Generator().manual_seed(rank + 1))
    good = dict(key_positions=torch.arange(5) + 5 * rank, query_positions=torch.tensor([99]))
    bad_q, bad_k, bad_v, bad = q, k, v, dict(good)
    if kind == "q":
        bad_q = q + (rank == 1)
    elif kind == "positions" and rank == 1:
        bad["key_positions"] = good["key_positions"][:4]
    elif kind == "heads" and rank == 1:
        bad_k = bad_v = torch.randn(1, 5, 3, 8)
    elif kind == "shape" and rank == 1:  # another number of new tokens: another packed size
        bad_q, bad["query_positions"] = torch.randn(1, 2, 4, 8), torch.tensor([99, 100])
    elif kind == "window" and rank == 1:  # an invalid argument: no packed buffer of its own
        bad["window"] = -1
    errors = []
    for first_good in (False, True):
        AGREEMENTS.forget()  # the default group's next call checks in words
        if first_good:
            ringwise.decode_attention(q, k, v, **good)
        start = time.monotonic()
        with count_comms() as comms:
            try:
                ringwise.decode_attention(bad_q, bad_k, bad_v, **bad)
            except ValueError as e:
                errors.append((str(e), dict(comms.counts), time.monotonic() - start))
    AGREEMENTS.forget()  # the default group's next call checks in words
    return errors


REFUSALS = {  # kind -> (what the error says, whether a later call's header asks for the worded check)
    "q": ("q differs between ranks", False),
    "positions": ("same number of keys", False),
    "heads": ("kv_heads dividing", False),
    "shape": ("different signatures", True),
    "window": ("window must be", True),
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_a_problem_on_one_rank_is_raised_on_every_rank(cluster, kind):
    want, rechecked = REFUSALS[kind]
    results = cluster(3).run(refusal_case, kind)
    for errors in results:
        assert len(errors) == 2, errors
        assert all("rank 1" in msg and want in msg for msg, _, _ in errors), errors
        assert all(seconds < 5 for _, _, seconds in errors), errors  # promptly: no rank waits for the timeout
        assert errors[0][1] == {"all_gather_object": 1}, errors  # a first call: nothing but the verdict
        later = {ALL_GATHER_SINGLE: 1, **({"all_gather_object": 1} if rechecked else {})}
        assert errors[1][1] == later, errors  # later: the one data gather (and the worded check it asked for)
    assert len({tuple(m for m, _, _ in e) for e in results}) == 1, "ranks raised different errors"


def changed_call_case(_):
    """Every rank changes its call alike after the group's first call (another batch and number of new tokens):
    the group agrees on the new call and the result is exact; then one data gather a call again."""
    from ringwise.attention.decode import AGREEMENTS

    AGREEMENTS.forget()  # the default group's next call checks in words
    rank, W = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    k, v = (
        torch.randn(2, 12, 3, 64, generator=g, dtype=torch.float64),
        torch.randn(2, 12, 3, 64, generator=g, dtype=torch.float64),
    )
    mine = torch.arange(12)[rank::W]
    counts, outs = [], []
    for B, Tq in ((1, 1), (2, 3), (2, 3)):
        q = torch.randn(B, Tq, 9, 64, generator=g, dtype=torch.float64)
        with count_comms() as comms:
            outs.append(ringwise.decode_attention(q, k[:B, mine], v[:B, mine]))
        counts.append(dict(comms.counts))
        ref = reference_attention(q, k[:B], v[:B])[0]
        assert max_err(outs[-1], ref) < 1e-12
    return counts


def test_all_ranks_changing_their_call_alike_agree_again(cluster):
    for counts in cluster(2).run(changed_call_case, None):
        assert counts[0] == {"all_gather_object": 1, ALL_GATHER_SINGLE: 1}, counts  # the first call
        assert counts[1] == {ALL_GATHER_SINGLE: 2, "all_gather_object": 1}, counts  # marker, check, data
        assert counts[2] == {ALL_GATHER_SINGLE: 1}, counts


def test_refuses_bad_arguments_in_one_process():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="window needs query_positions"):
        ringwise.decode_attention(q, k, k, window=3)
    with pytest.raises(ValueError, match="query_positions must be"):
        ringwise.decode_attention(q, k, k, query_positions=torch.arange(3), key_positions=torch.arange(5))
    with pytest.raises(ValueError, match="same number of keys"):
        ringwise.decode_attention(q, k, k, query_positions=torch.arange(2), key_positions=torch.arange(4))
    with pytest.raises(ValueError, match="sinks must be"):
        ringwise.decode_attention(q, k, k, sinks=torch.zeros(3))
