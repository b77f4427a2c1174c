"""`ringwise demo`: one long sequence, W local processes, exact attention, measured.

Runs causal ring attention forward+backward across W gloo processes, then the same
sequence through single-process SDPA and a blockwise float64 reference, and prints
per-rank peak memory and time, the error against float64 and the speed ratio to SDPA.
A measurement, as the benchmarks are: it runs on the process harness (ringwise.testing) and
the benchmarks' timer (ringwise.bench.timing).
"""

from __future__ import annotations

import functools

import torch
from tqdm import tqdm

import ringwise
from ringwise.attention.kernels import ReferenceKernel, default_scale
from ringwise.attention.layout import global_indices, split_unit
from ringwise.bench.timing import median_time
from ringwise.testing.cluster import LocalCluster
from ringwise.testing.memory import PeakMemory, mib

from . import flag_problems, refused


def _inputs(args):
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, args.seq_len, args.heads, args.head_dim)
    return [torch.randn(shape, generator=g) for _ in range(4)]


def _warm_up(fn, *shape):
    """One small call first, so connection set-up and thread pools are not measured."""
    x = torch.randn(*shape, requires_grad=True)
    fn(x).sum().backward()


def ring_rank(args):
    _warm_up(
        lambda x: ringwise.ring_attention(x, x, x, causal=True, layout=args.layout),
        1,
        2 * 64,
        args.heads,
        args.head_dim,
    )
    inputs = [ringwise.shard(x, 1, args.layout) for x in _inputs(args)]

    return _measured(functools.partial(ringwise.ring_attention, causal=True, layout=args.layout), inputs, args.iters)


def _measured(attention, inputs, iters):
    """Forward+backward `iters` times; time (the slowest rank's) and peak memory of the last (steady state).

    Each run lives in its own call, so nothing of the previous one is resident when the
    next one starts measuring.
    """
    last: dict = {}

    def once():
        last.clear()  # the previous run's tensors go before this one is measured
        q, k, v = (x.clone().requires_grad_() for x in inputs[:3])
        with PeakMemory() as mem:
            out = attention(q, k, v)
            out.backward(inputs[3])
        last.update(peak=mem.peak_bytes, out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)

    seconds = median_time(once, 1, warmup=max(0, iters - 1))
    return dict(last, seconds=seconds)


def sdpa_single(args):
    _warm_up(
        lambda x: torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True),
        1,
        args.heads,
        128,
        args.head_dim,
    )
    inputs = [x.transpose(1, 2) for x in _inputs(args)]
    res = _measured(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), inputs, args.iters
    )
    return dict(seconds=res["seconds"], peak=res["peak"])


def reference_errors(args, ring_results):
    """Max |ring - float64| over the whole sequence, for out and the three gradients."""
    q, k, v, dout = (x.transpose(1, 2).double() for x in _inputs(args))
    kernel = ReferenceKernel(chunk=512)
    scale = default_scale(args.head_dim)
    out, lse = kernel.forward(q, k, v, True, scale)
    grads = kernel.backward(dout, q, k, v, out, lse, True, scale)
    refs = dict(out=out, dq=grads[0], dk=grads[1], dv=grads[2])
    W = len(ring_results)
    errors = {}
    for name, ref in refs.items():
        whole = torch.empty(1, args.seq_len, args.heads, args.head_dim)
        for r, res in enumerate(ring_results):
            whole[:, global_indices(args.layout, r, W, args.seq_len)] = res[name]
        errors[name] = (whole.double() - ref.transpose(1, 2)).abs().max().item()
    return errors


def add_arguments(p):
    p.add_argument("--world", type=int, default=4, help="local processes in the ring")
    p.add_argument("--seq-len", type=int, default=16384, help="global tokens of the sequence")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=ringwise.LAYOUTS)
    p.add_argument(
        "--threads", type=int, default=2, help="CPU threads in all, shared by the ranks (SDPA gets them all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=2, help="forward+backward runs; the last one is reported")


def problems(args) -> list[str]:
    """Every bad value among the flags, one line each."""
    found = [
        f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer"
        for name in ("world", "seq_len", "heads", "head_dim", "threads", "iters")
        if getattr(args, name) < 1
    ]
    if args.world >= 1 and args.seq_len >= 1 and args.seq_len % split_unit(args.layout, args.world):
        found.append(
            f"--seq-len {args.seq_len} must be a multiple of {split_unit(args.layout, args.world)} "
            f"for layout {args.layout!r} on {args.world} ranks"
        )
    return found


def run(args):
    W = args.world
    stages = tqdm(total=4, desc="demo", bar_format="{desc}: {n}/{total} {postfix}")
    stages.set_postfix_str(f"starting {W} processes (gloo)")
    with LocalCluster(W, threads_per_rank=max(1, args.threads // W), track_memory=True) as cluster:
        stages.update()
        stages.set_postfix_str(f"causal ring attention fwd+bwd, {args.seq_len} tokens over {W} ranks")
        results = cluster.run(ring_rank, args, timeout=3600)
    stages.update()
    stages.set_postfix_str("single-process SDPA on the whole sequence")
    with LocalCluster(1, threads_per_rank=args.threads, track_memory=True) as single:
        sdpa = single.run(sdpa_single, args, timeout=3600)[0]
    stages.update()
    stages.set_postfix_str("blockwise float64 reference")
    errors = reference_errors(args, results)
    stages.update()
    stages.close()

    ring_time = max(r["seconds"] for r in results)
    print(
        f"\nringwise demo: causal attention over {args.seq_len} tokens, {args.heads} heads x {args.head_dim}, "
        f"float32, {W} ranks ({args.layout}), forward+backward"
    )
    print(f"(iteration {args.iters} of {args.iters}; peak MiB = peak resident memory above the inputs)")
    print(f"{'rank':>6} {'tokens':>8} {'seconds':>9} {'peak MiB':>9}")
    for r, res in enumerate(results):
        print(f"{r:>6} {args.seq_len // W:>8} {res['seconds']:>9.2f} {mib(res['peak']):>9.1f}")
    print(
        f"{'SDPA':>6} {args.seq_len:>8} {sdpa['seconds']:>9.2f} {mib(sdpa['peak']):>9.1f}"
        f"   (one process, {args.threads} threads)"
    )
    print("max |error| vs float64 reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print(
        f"time ratio SDPA / ring: {sdpa['seconds'] / ring_time:.2f}   "
        f"(ring per-rank peak memory is "
        f"{mib(max(r['peak'] for r in results)) / max(mib(sdpa['peak']), 1e-9):.2f} x SDPA's)"
    )
    return dict(errors=errors, ring_seconds=ring_time, sdpa_seconds=sdpa["seconds"])


def main(args) -> int:
    found = flag_problems(args) + problems(args)
    if found:
        return refused("demo", found)
    run(args)
    return 0
