"""ringwise bench hybrid compares like with like: its head-parallel all-to-all layer and its state-scan layer give
one process's outputs (so the times and bytes it prints are of correct layers), and the bytes it reports are the
sizes the scan's summaries and the all-to-all's pieces really have."""

import pytest

pytest.importorskip("transformers")

from helpers import assemble, max_err  # noqa: E402

from ringwise.bench import hybrid  # noqa: E402

S, H, D = 64, 4, 16


def _layers():
    """On each rank: the bench's two sharded layers (forward) and the bytes this rank sent for each."""
    import torch.distributed as dist

    from ringwise.attention import halo

    W, sent = dist.get_world_size(), {"scan": 0, "a2a": 0}
    kernel = hybrid._kernel()
    gather, swap = halo._all_gather, hybrid._swap

    def counted_gather(x, group, W):
        sent["scan"] += (W - 1) * x.numel() * x.element_size()  # a ring all-gather sends the others' copies
        return gather(x, group, W)

    def counted_swap(x, split_dim, cat_dim):
        sent["a2a"] += x.numel() * x.element_size() * (W - 1) // W  # all but its own piece
        return swap(x, split_dim, cat_dim)

    halo._all_gather, hybrid._swap = counted_gather, counted_swap
    try:
        out = {}
        for layout in ("contiguous", "zigzag"):
            *leaves, _ = hybrid._inputs(S, H, D, layout)
            out[layout] = halo.sharded_state_scan(kernel, *leaves[:3], dict(g=leaves[3], beta=leaves[4]), layout)[0]
            if layout == "contiguous":
                sent["scan"] = 0  # the bench's scan runs zigzag
        *leaves, _ = hybrid._inputs(S, H, D, "contiguous")
        whole = [hybrid._swap(x, 2, 1) for x in leaves]
        out["a2a"] = hybrid._swap(kernel(*whole[:3], None, whole[3], whole[4])[0], 1, 2)
    finally:
        halo._all_gather, hybrid._swap = gather, swap
    return out, sent


@pytest.fixture(scope="module")
def ranks(cluster):
    return cluster(2).run(_layers)


def test_both_sharded_layers_equal_one_process(ranks):
    q, k, v, g, beta, _ = hybrid._inputs(S, H, D)
    want = hybrid._kernel()(q, k, v, None, g, beta)[0]
    for name, layout in (("contiguous", "contiguous"), ("zigzag", "zigzag"), ("a2a", "contiguous")):
        got = assemble([out[name] for out, _ in ranks], layout, 1)
        assert max_err(got, want) < 1e-5, name


def test_reported_bytes_are_what_the_layers_send(ranks):
    """The bench's byte columns (forward + backward: twice the forward's) against the sizes each rank sent in a
    forward; the scan's do not depend on the sequence length."""
    for _, sent in ranks:
        assert hybrid.scan_bytes(2, H, D) == 2 * sent["scan"]
        assert hybrid.all_to_all_bytes(2, S, H, D) == 2 * sent["a2a"]
    assert hybrid.all_to_all_bytes(2, 4 * S, H, D) == 4 * hybrid.all_to_all_bytes(2, S, H, D)
