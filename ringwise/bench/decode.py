"""Per-token decode latency over a sequence-sharded KV cache, against one process.

One new token's attention (Llama-3-8B heads by default: 32 query / 8 kv heads, d = 128) over a
cache of S tokens: ringwise.decode_attention on W ranks, each holding S/W keys, against torch
SDPA over the whole cache in one process, at equal total threads (the process gets W x the
ranks' threads). The W-rank time is split into local attention, the one all-gather and the
merge. Side by side, the merge primitives at the same S and W: one all-gather of (out, lse)
(ringwise), three all-reduces (max, weighted sum, sum of weights: Tree Attention's), and
passing the K/V shards round the ring (the paper's code). The slowest rank counts. End to end:
ringwise.generate of a model preset (prompt through the ring, then decode steps), time to first
token and per-token step at each W against one process with all the threads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

import ringwise
from ringwise.attention.decode import local_attention
from ringwise.attention.kernels import acc_dtype, default_scale
from ringwise.attention.merge import merge_into
from ringwise.testing.cluster import LocalCluster
from ringwise.train.config import DTYPES

from . import draw, write_results
from .flags import decode_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time


def _inputs(keys, heads, kv_heads, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    k = torch.randn(1, keys, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(1, keys, kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v


def time_ranks(S, heads, kv_heads, head_dim, dtype, repeats):
    """On every rank of the cluster: the decode step and its parts, and the merge primitives."""
    rank, W = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[dtype]
    q, k, v = _inputs(S // W, heads, kv_heads, head_dim, dtype, seed=rank + 1)
    scale, dt = default_scale(head_dim), acc_dtype(dtype)
    out, lse = local_attention(q, k, v, scale, None, None)
    packed = torch.cat([torch.zeros(6, dtype=dt), out.reshape(-1), lse.reshape(-1)])
    parts = torch.empty(W * packed.numel(), dtype=dt)

    def merge():
        o, lse_ = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
        for p in parts.view(W, -1):
            merge_into(o, lse_, p[6 : 6 + out.numel()].view_as(out), p[6 + out.numel() :].view_as(lse))

    def tree():  # Tree Attention's three all-reduces on the same partials
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        w = torch.exp(lse - m)
        num, den = out * w[..., None], w.clone()
        dist.all_reduce(num)
        dist.all_reduce(den)

    def kv_ring():  # the paper's decoding: every shard's K/V passes round the ring, W - 1 hops
        send, recv = torch.cat([k, v]), torch.empty(2 * k.shape[0], *k.shape[1:], dtype=k.dtype)
        for _ in range(W - 1):
            ops = [dist.P2POp(dist.isend, send, (rank + 1) % W), dist.P2POp(dist.irecv, recv, (rank - 1) % W)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            send, recv = recv, send

    row = dict(
        total=median_time(lambda: ringwise.decode_attention(q, k, v), repeats),
        local=median_time(lambda: local_attention(q, k, v, scale, None, None), repeats),
    )
    if W > 1:
        # torch >= 2.13's name; all_gather_into_tensor, the older one, warns (FutureWarning) on every call there
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        row.update(
            gather=median_time(lambda: gather(parts, packed), repeats),
            merge=median_time(merge, repeats),
            tree_all_reduces=median_time(tree, repeats),
            kv_ring=median_time(kv_ring, max(1, repeats // 2)),
            gather_bytes=packed.numel() * packed.element_size(),
        )
    return row


def time_sdpa(S, heads, kv_heads, head_dim, dtype, repeats):
    """One process, the whole cache: torch SDPA (GQA native)."""
    q, k, v = _inputs(S, heads, kv_heads, head_dim, DTYPES[dtype], seed=1)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return median_time(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), repeats)


def time_generation(preset, prompt_len, new, seed=0):
    """On every rank: ringwise.generate (the model's ring prefill, then decode steps over the sharded
    cache) of `new` tokens from a random prompt; time to first token and the median decode step."""
    import time

    from ringwise.generate import generate
    from ringwise.model import Transformer, model_config

    torch.manual_seed(seed)
    model = Transformer(model_config(preset)).eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    stamps = [time.perf_counter()]
    generate(model, prompt, new, on_token=lambda step, token: stamps.append(time.perf_counter()))
    steps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))
    return dict(ttft=stamps[1] - stamps[0], step=steps[len(steps) // 2] if steps else None)


def end_to_end(args, worlds, T, bar) -> list[dict]:
    """ringwise.generate at each W (T/W threads a rank) against W = 1 (one process, T threads)."""
    rows = []
    for W in worlds:
        with LocalCluster(W, threads_per_rank=T // W) as cluster:
            for S in sorted(set(args.decode_e2e_prompts)):
                bar.set_postfix_str(f"generate W={W} S={S}")
                per_rank = cluster.run(time_generation, args.decode_e2e_model, S, args.decode_e2e_new, timeout=3600)
                rows.append(
                    dict(
                        world=W,
                        prompt=S,
                        new=args.decode_e2e_new,
                        ttft=max(r["ttft"] for r in per_rank),
                        step=max(r["step"] for r in per_rank),
                    )
                )
                bar.update()
    single = {r["prompt"]: r for r in rows if r["world"] == 1}
    for r in rows:
        one = single.get(r["prompt"])
        r["ttft_vs_one_process"] = one["ttft"] / r["ttft"] if one else None
        r["step_vs_one_process"] = one["step"] / r["step"] if one else None
    return rows


QUICK = dict(
    decode_seq_lens=[1024, 4096],
    decode_worlds=[1, 2],
    decode_repeats=2,
    decode_e2e_model="tiny",
    decode_e2e_prompts=[256],
    decode_e2e_new=3,
)


def run(args) -> dict:
    worlds, seqs = sorted(set(args.decode_worlds)), sorted(set(args.decode_seq_lens))
    H, Hk, d, T = args.decode_heads, args.decode_kv_heads, args.decode_head_dim, args.threads
    bad = [S for S in seqs for W in worlds if S % W] + ([] if H % Hk == 0 else [f"heads {H} % kv {Hk}"])
    if bad or min(worlds) < 1 or T < max(worlds):
        raise ValueError(
            f"--decode-seq-lens must divide by every world size, heads by kv heads, and --threads {T} "
            f"must give each rank a thread (worlds {worlds}): {bad}"
        )
    rows = []
    e2e_cases = len(set(args.decode_e2e_prompts)) * len(worlds)
    with tqdm(total=len(seqs) * (1 + len(worlds)) + e2e_cases, desc="decode bench", unit="case") as bar:
        with LocalCluster(1, threads_per_rank=T) as single:
            sdpa = {
                S: single.run(time_sdpa, S, H, Hk, d, args.decode_dtype, args.decode_repeats, timeout=3600)[0]
                for S in seqs
            }
        bar.update(len(seqs))
        for W in worlds:
            with LocalCluster(W, threads_per_rank=T // W) as cluster:
                for S in seqs:
                    bar.set_postfix_str(f"W={W} S={S}")
                    per_rank = cluster.run(
                        time_ranks, S, H, Hk, d, args.decode_dtype, args.decode_repeats, timeout=3600
                    )
                    row = {key: max(r[key] for r in per_rank) for key in per_rank[0]}  # the slowest rank
                    rows.append(dict(world=W, seq=S, sdpa=sdpa[S], sdpa_over_ring=sdpa[S] / row["total"], **row))
                    bar.update()
        e2e = end_to_end(args, worlds, T, bar) if 1 in worlds else []
    lines = [
        f"One new token against a cache of S tokens: {H} query / {Hk} kv heads x {d}, {args.decode_dtype}, "
        f"W ranks x {T}/W threads vs SDPA on the whole cache in one process with {T} threads; "
        f"median of {args.decode_repeats}, the slowest rank, seconds.",
        "",
        "| W | S | ringwise decode | local | all-gather | merge | one process SDPA | SDPA / ringwise | "
        "3 all-reduces | K/V round the ring | bytes gathered per rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ms = lambda x: "-" if x is None else f"{x * 1e3:.3f} ms"
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['seq']} | {ms(r['total'])} | {ms(r['local'])} | {ms(r.get('gather'))} | "
            f"{ms(r.get('merge'))} | {ms(r['sdpa'])} | {r['sdpa_over_ring']:.2f} | "
            f"{ms(r.get('tree_all_reduces'))} | {ms(r.get('kv_ring'))} | {r.get('gather_bytes', '-')} |"
        )
    if e2e:
        lines += [
            "",
            f"End to end, `ringwise.generate` of the `{args.decode_e2e_model}` preset (random weights, "
            f"batch 1): the ring prefill of the prompt, then {args.decode_e2e_new} tokens decoded over the "
            f"sharded cache; W ranks x {T}/W threads; W = 1 is one process with {T} threads.",
            "",
            "| W | prompt | time to first token | decode step (median) | TTFT: one process / W ranks | "
            "step: one process / W ranks |",
            "|---|---|---|---|---|---|",
        ]
        ratio = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        for r in e2e:
            lines.append(
                f"| {r['world']} | {r['prompt']} | {ms(r['ttft'])} | {ms(r['step'])} | "
                f"{ratio(r['ttft_vs_one_process'])} | {ratio(r['step_vs_one_process'])} |"
            )
    md = "\n".join(lines) + "\n"
    out = write_results(
        args.out,
        "decode",
        dict(
            args={k: v for k, v in vars(args).items() if k.startswith("decode") or k in ("out", "quick", "threads")},
            rows=rows,
            end_to_end=e2e,
        ),
        md,
    )
    xs = {f"ringwise W={W}": [r["seq"] for r in rows if r["world"] == W] for W in worlds}
    ys = {f"ringwise W={W}": [r["total"] * 1e3 for r in rows if r["world"] == W] for W in worlds}
    xs["one process SDPA"], ys["one process SDPA"] = seqs, [sdpa[S] * 1e3 for S in seqs]
    draw(
        "lines",
        xs,
        ys,
        out / "decode.png",
        xlabel="cache length S (tokens)",
        ylabel="ms per new token",
        title=f"Decode latency, {H}/{Hk} heads x {d}, {T} threads in all",
        logx=True,
        logy=True,
    )
    print(md)
    return dict(rows=rows, end_to_end=e2e)
