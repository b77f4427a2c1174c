"""The sequence-sharded KV cache: the prompt stays where the ring layout put it, each new token goes
to the least-loaded rank (computed alike on every rank), storage grows by doubling, and decoding
over it equals attention over the whole cache (float64 reference)."""

import pytest
import torch
import torch.distributed as dist
from helpers import CEILINGS, EPS, assert_within_budget, max_err, reference_attention

import ringwise
from ringwise.attention.kvcache import KVCache, prompt_loads
from ringwise.attention.layout import global_indices, split_unit


@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_token_is_kept_once_and_loads_even_out(layout, world):
    unit = split_unit(layout, world)
    real = 11
    padded = -(-real // unit) * unit
    loads = prompt_loads(layout, world, padded, real)
    assert sum(loads) == real
    k = torch.randn(1, padded, 2, 4)
    caches = [KVCache(1, r, world) for r in range(world)]
    for r, c in enumerate(caches):
        c.set_prompt(loads, real)
        idx = global_indices(layout, r, world, padded)
        c.store_prefill(0, k[:, idx], k[:, idx] + 1, idx)
    owners = []
    extra = torch.randn(1, 40, 2, 4)
    for t in range(40):
        owner = {c.owner() for c in caches}
        assert len(owner) == 1, "ranks disagree on the owner"
        owners.append(owner.pop())
        kept = [c.store_token(0, extra[:, t : t + 1], extra[:, t : t + 1] + 1, real + t) for c in caches]
        assert kept == [r == owners[-1] for r in range(world)]
        for c in caches:
            c.advance()
    # least loaded first, then round-robin: loads never differ by more than one, once even
    final = [c.view(0)[0].shape[1] for c in caches]
    assert sum(final) == real + 40 and max(final) - min(final) <= 1
    assert len(set(owners[-world:])) == world and owners[-2 * world : -world] == owners[-world:]  # round-robin
    everything = torch.cat([k[:, :real], extra], 1)
    for c in caches:  # each rank's keys are the global keys at its positions, values likewise
        kk, vv, pos = c.view(0)
        assert torch.equal(kk, everything[:, pos]) and torch.equal(vv, everything[:, pos] + 1)
    assert sorted(torch.cat([c.view(0)[2] for c in caches]).tolist()) == list(range(real + 40))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_claimed_steps_match_token_by_token_storage(world):
    """claim + store_owned (a step of several tokens, as transformers' cache layers store them) keeps
    the same tokens on the same ranks as store_token + advance one token at a time."""
    loads, real = [3, 0, 2][:world] if world == 3 else ([5] if world == 1 else [2, 3]), 5
    steps = [1, 3, 1, 2, 1]
    new = torch.randn(1, sum(steps), 2, 4)
    by_step, by_token = ([KVCache(2, r, world) for r in range(world)] for _ in range(2))
    for c in by_step + by_token:
        c.set_prompt(loads, real)
    start = 0
    for n in steps:
        claims = [c.claim(n) for c in by_step]
        assert all(torch.equal(p, claims[0][0]) and o == claims[0][1] for p, o in claims), "ranks disagree"
        positions, owners = claims[0]
        assert positions.tolist() == list(range(real + start, real + start + n))
        for c in by_step:
            for layer in range(2):
                c.store_owned(layer, new[:, start : start + n], new[:, start : start + n] * 2, positions, owners)
        start += n
    for t in range(sum(steps)):
        for c in by_token:
            for layer in range(2):
                c.store_token(layer, new[:, t : t + 1], new[:, t : t + 1] * 2, real + t)
            c.advance()
    for a, b in zip(by_step, by_token):
        assert a.loads == b.loads and a.next_position == b.next_position == real + sum(steps)
        for layer in range(2):
            for x, y in zip(a.view(layer), b.view(layer)):
                assert (x is None and y is None) or torch.equal(x, y)


def test_storage_grows_by_doubling():
    c = KVCache(1, 0, 1)
    c.set_prompt([0], 0)
    moves, ptr = 0, None
    for t in range(1000):
        c.store_token(0, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), t)
        c.advance()
        if c.layers[0].k.data_ptr() != ptr:
            moves, ptr = moves + 1, c.layers[0].k.data_ptr()
    assert moves <= 8, moves  # 16, 32, ..., 1024: not one copy of the cache per token
    assert c.nbytes() == 2 * 1000 * 2 * 8 * 4 and c.reserved_bytes() >= c.nbytes()


def test_refuses_inconsistent_input():
    c = KVCache(1, 0, 2)
    with pytest.raises(ValueError, match="do not add up"):
        c.set_prompt([3, 3], 7)
    c.set_prompt([1, 0], 1)
    c.store_prefill(0, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="one dtype"):
        c.store_prefill(0, torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="rank 2"):
        KVCache(1, 2, 2)


def decode_over_cache(layout, real, steps):
    """A prompt's K/V stored from its ring shards, then `steps` new tokens decoded over the cache."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    unit = split_unit(layout, world)
    padded = -(-real // unit) * unit
    k = torch.randn(1, padded, 2, 8, generator=g, dtype=torch.float64).float()
    v = torch.randn(1, padded, 2, 8, generator=g, dtype=torch.float64).float()
    cache = KVCache(1, rank, world)
    cache.set_prompt(prompt_loads(layout, world, padded, real), real)
    idx = global_indices(layout, rank, world, padded)
    cache.store_prefill(0, k[:, idx], v[:, idx], idx)
    outs = []
    for t in range(steps):
        q = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64).float()
        nk, nv = (
            torch.randn(1, 1, 2, 8, generator=g, dtype=torch.float64).float(),
            torch.randn(1, 1, 2, 8, generator=g, dtype=torch.float64).float(),
        )
        cache.store_token(0, nk, nv, real + t)
        cache.advance()
        kk, vv, pos = cache.view(0)
        outs.append(ringwise.decode_attention(q, kk, vv, key_positions=pos, query_positions=torch.tensor([real + t])))
    return torch.cat(outs, 1), cache.nbytes()


@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_decoding_over_the_sharded_cache_is_exact(cluster, layout, world):
    real, steps = 13, 5
    results = cluster(world).run(decode_over_cache, layout, real, steps)
    g = torch.Generator().manual_seed(3)
    unit = split_unit(layout, world)
    padded = -(-real // unit) * unit
    k = torch.randn(1, padded, 2, 8, generator=g, dtype=torch.float64)[:, :real]
    v = torch.randn(1, padded, 2, 8, generator=g, dtype=torch.float64)[:, :real]
    refs, kerns = [], []
    for _ in range(steps):
        q = torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64)
        k = torch.cat([k, torch.randn(1, 1, 2, 8, generator=g, dtype=torch.float64)], 1)
        v = torch.cat([v, torch.randn(1, 1, 2, 8, generator=g, dtype=torch.float64)], 1)
        refs.append(reference_attention(q, k, v)[0])
        kerns.append(ringwise.decode_attention(q.float(), k.float(), v.float()))
    ref, kern = torch.cat(refs, 1), torch.cat(kerns, 1)
    for out, _ in results:
        assert torch.equal(out, results[0][0])
    assert_within_budget(
        "out", max_err(results[0][0], ref), max_err(kern, ref), EPS["float32"], ceiling=CEILINGS["float32"]
    )
    per_token = 2 * 2 * 8 * 4  # k and v, 2 kv heads x 8 dims, float32
    assert sum(b for _, b in results) == (real + steps) * per_token  # each token held once: memory is a share
