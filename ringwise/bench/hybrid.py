"""A delta-rule layer (Qwen3-Next's gated DeltaNet) over W ranks: ringwise's state scan against the head-parallel
all-to-all (Megatron's and PyTorch's open gated-delta context parallel) and against one process.

The same global sequence and layer (transformers' chunked kernel, forward + backward, float32): one process with
W x T threads runs it on the whole sequence; W ranks (T threads each) run it sharded, either with
`halo.sharded_state_scan` (each rank its tokens, one all-gather of the segments' (dk x (dv + dk)) summaries per
layer, zigzag) or head-parallel (an all-to-all turns token shards into head shards over the whole sequence, the
kernel runs there, a second brings the outputs back; contiguous, heads divisible by W). Bytes each rank sends for
one layer, forward + backward, from the shapes (the scan's are constant in the sequence; the all-to-all's grow with
it). Then the scan's per-rank peak memory at a fixed local length as W grows: flat means memory depends on the
shard alone.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from tqdm import tqdm

import ringwise
from ringwise.attention.halo import sharded_state_scan
from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import PeakMemory

from . import draw, write_results
from .flags import hybrid_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time

QUICK = dict(hybrid_seq_len=1024, hybrid_head_dim=64, hybrid_repeats=1, hybrid_local_len=256)
BYTES = 4  # float32


def _kernel():
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    except ImportError as e:
        raise ValueError(
            f"the hybrid bench runs transformers' gated delta rule kernel: install transformers ({e})"
        ) from e

    def kernel(q, k, v, initial_state, g, beta):
        return torch_chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )

    return kernel


def _inputs(seq, heads, d, layout=None):
    """q, k, v, log decays, betas and the output gradient of one layer's global sequence (this rank's shard when a
    layout is given)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq, heads, d, generator=g) for _ in range(4))
    decay = -torch.rand(1, seq, heads, generator=g)
    beta = torch.rand(1, seq, heads, generator=g)
    xs = [q, k, v, decay, beta, dout]
    return [ringwise.shard(x, 1, layout) for x in xs] if layout else xs


def _step(layer, xs):
    """forward+backward of layer(q, k, v, g, beta) on fresh leaves."""
    *leaves, dout = xs

    def step():
        q, k, v, g, beta = (x.detach().requires_grad_() for x in leaves)
        layer(q, k, v, g, beta).backward(dout)

    return step


def _one_process(seq, heads, d, repeats):
    kernel = _kernel()
    step = _step(lambda q, k, v, g, beta: kernel(q, k, v, None, g, beta)[0], _inputs(seq, heads, d))
    with PeakMemory() as mem:
        seconds = median_time(step, repeats)
    return seconds, mem.peak_bytes


def _scan(seq, heads, d, repeats):
    kernel = _kernel()

    def layer(q, k, v, g, beta):
        return sharded_state_scan(kernel, q, k, v, dict(g=g, beta=beta), layout="zigzag")[0]

    step = _step(layer, _inputs(seq, heads, d, "zigzag"))
    with PeakMemory() as mem:
        seconds = median_time(step, repeats)
    return seconds, mem.peak_bytes


def _swap(x, split_dim, cat_dim):
    """One differentiable all-to-all: x's `split_dim` cut in W pieces, one to each rank; the pieces received joined
    along `cat_dim` in rank order."""
    import torch.distributed.nn.functional as dnn

    W = dist.get_world_size()
    pieces = [p.contiguous() for p in x.chunk(W, dim=split_dim)]
    received = [torch.empty_like(p) for p in pieces]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = dnn.all_to_all(received, pieces)  # type: ignore[no-untyped-call]
    return torch.cat(out, dim=cat_dim)


def _all_to_all(seq, heads, d, repeats):
    kernel = _kernel()

    def layer(q, k, v, g, beta):
        whole = [_swap(x, 2, 1) for x in (q, k, v, g, beta)]  # tokens -> heads: the whole sequence, heads / W
        out, _ = kernel(*whole[:3], None, whole[3], whole[4])
        return _swap(out, 1, 2)  # heads -> tokens

    step = _step(layer, _inputs(seq, heads, d, "contiguous"))
    with PeakMemory() as mem:
        seconds = median_time(step, repeats)
    return seconds, mem.peak_bytes


def scan_bytes(W, heads, d, layout="zigzag"):
    """Bytes a rank sends for one layer's state scan, forward + backward: its segments' summaries (dk x (dv + dk) a
    head) to each of the W - 1 others (ring all-gather), and their gradients back (reduce-scatter)."""
    segments = 2 if layout == "zigzag" else 1
    return 2 * (W - 1) * segments * heads * d * 2 * d * BYTES


def all_to_all_bytes(W, seq, heads, d):
    """Bytes a rank sends for one head-parallel layer, forward + backward: (W - 1) / W of its tokens' q, k, v, decay
    and beta, and of its heads' outputs; the backward sends the same amounts of gradients."""
    per_token = heads * (3 * d + 2) + heads * d
    return 2 * (W - 1) * (seq // W) * per_token * BYTES // W


def run(args) -> dict:
    S, H, d, T, repeats = (
        args.hybrid_seq_len,
        args.hybrid_heads,
        args.hybrid_head_dim,
        args.hybrid_threads_per_rank,
        args.hybrid_repeats,
    )
    bad = [W for W in args.hybrid_worlds if H % W or S % (2 * W)]
    if bad:
        raise ValueError(
            f"--hybrid-worlds {bad}: W must divide --hybrid-heads {H} (the all-to-all's head shards) and "
            f"--hybrid-seq-len {S} must split in 2W (zigzag)"
        )
    _kernel()  # refuse without transformers before any rank starts
    rows, memory = [], []
    with tqdm(total=3 * len(args.hybrid_worlds) + len(args.hybrid_memory_worlds), desc="hybrid bench") as bar:
        for W in args.hybrid_worlds:
            with LocalCluster(1, threads_per_rank=W * T, track_memory=True) as one:
                t, peak = one.run(_one_process, S, H, d, repeats, timeout=3600)[0]
            rows.append(dict(impl="one process", world=W, seconds=t, peak_mib=peak / 2**20, sent_mib=0.0))
            bar.update()
            with LocalCluster(W, threads_per_rank=T, track_memory=True) as cluster:
                for impl, fn, sent in (
                    ("ring state scan", _scan, scan_bytes(W, H, d)),
                    ("head all-to-all", _all_to_all, all_to_all_bytes(W, S, H, d)),
                ):
                    bar.set_postfix_str(f"{impl} W={W}")
                    out = cluster.run(fn, S, H, d, repeats, timeout=3600)
                    rows.append(
                        dict(
                            impl=impl,
                            world=W,
                            seconds=out[0][0],
                            peak_mib=max(p for _, p in out) / 2**20,
                            sent_mib=sent / 2**20,
                        )
                    )
                    bar.update()
        for W in args.hybrid_memory_worlds:
            local = args.hybrid_local_len
            with LocalCluster(W, threads_per_rank=T, track_memory=True) as cluster:
                out = cluster.run(_scan, local * W, H, d, 1, timeout=3600)
            memory.append(dict(world=W, seq=local * W, peak_mib=max(p for _, p in out) / 2**20))
            bar.update()
    for r in rows:
        base = next(o for o in rows if o["impl"] == "one process" and o["world"] == r["world"])
        r["one_process_over_this"] = base["seconds"] / r["seconds"]
    lines = [
        f"A gated delta rule layer (transformers' chunked kernel), global sequence {S}, {H} heads, dk = dv = {d}, "
        f"float32, forward+backward; W ranks x {T} thread(s) against one process with W x {T} threads, median of "
        f"{repeats}. Bytes each rank sends for the layer (forward + backward), from the shapes.",
        "",
        "| approach | W | seconds | one process / this | peak MiB per rank | MiB sent per rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['world']} | {r['seconds']:.3f} | {r['one_process_over_this']:.2f} | "
            f"{r['peak_mib']:.1f} | {r['sent_mib']:.2f} |"
        )
    lines += [
        "",
        f"The state scan's per-rank peak memory at {args.hybrid_local_len} tokens a rank (global = W x that):",
        "",
        "| W | global tokens | peak MiB per rank |",
        "|---|---|---|",
    ]
    lines += [f"| {m['world']} | {m['seq']} | {m['peak_mib']:.1f} |" for m in memory]
    md = "\n".join(lines) + "\n"
    out = write_results(
        args.out,
        "hybrid",
        dict(
            args={k: v for k, v in vars(args).items() if k.startswith("hybrid") or k in ("out", "quick")},
            rows=rows,
            memory=memory,
        ),
        md,
    )
    labels = [f"W={W}" for W in args.hybrid_worlds]
    draw(
        "bars",
        labels,
        {impl: [r["sent_mib"] for r in rows if r["impl"] == impl] for impl in ("ring state scan", "head all-to-all")},
        out / "hybrid.png",
        ylabel="MiB sent per rank, one layer fwd+bwd",
        title=f"Gated delta rule across ranks, S={S}",
    )
    print(md)
    return dict(rows=rows, memory=memory)
