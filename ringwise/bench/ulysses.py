"""Ring-only, Ulysses-only and hybrid meshes side by side against single-process SDPA.

The same global sequence and the same total threads: W = U x R ranks (one thread each by
default) run ring_attention(..., group=ring, ulysses_group=ulysses) forward + backward on
meshes U x R (1 x W is the pure ring, W x 1 pure Ulysses); one process with W threads runs
torch SDPA on the whole sequence. Full and causal (zigzag). The ratio SDPA time / mesh
time is the efficiency of the mesh: 1.0 means sharding costs nothing over the fused kernel.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

import ringwise
from ringwise.attention.traffic import recording
from ringwise.attention.ulysses import mesh_groups
from ringwise.testing.cluster import LocalCluster

from . import draw, write_results
from .common import add_sdpa_ratios, fwd_bwd_step, sdpa_seconds
from .flags import ulysses_flags as add_arguments  # noqa: F401 (defined in flags.py: the CLI needs no suite)
from .timing import median_time

_GROUPS: dict = {}  # per rank process: one pair of groups per mesh


def _mesh(U, R):
    if (U, R) not in _GROUPS:
        _GROUPS[(U, R)] = mesh_groups(U, R)
    return _GROUPS[(U, R)]


def time_mesh(U, R, batch, seq, heads, kv_heads, head_dim, causal, repeats, layout="zigzag"):
    """Forward+backward on this rank's piece; the slowest rank's seconds per iteration (median)
    and the all-to-alls of one iteration."""
    ug, rg = _mesh(U, R)
    g = torch.Generator().manual_seed(0)
    shapes = [
        (batch, seq, heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, kv_heads, head_dim),
        (batch, seq, heads, head_dim),
    ]
    q, k, v, dout = (ringwise.shard(torch.randn(s, generator=g), 1, layout, group=rg, ulysses_group=ug) for s in shapes)

    def attention(q, k, v):
        return ringwise.ring_attention(q, k, v, causal=causal, layout=layout, group=rg, ulysses_group=ug)

    fwd_bwd = fwd_bwd_step(attention, (q, k, v, dout))
    last: list = []

    def step():  # each iteration counted on its own: the count left is one iteration's
        with recording() as traffic:
            fwd_bwd()
        last[:] = [traffic]

    return median_time(step, repeats), sum(last[0].all_to_all.values())


def _parse_meshes(text):
    meshes = []
    for item in text:
        try:
            U, R = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--ulysses-meshes takes UxR items such as 2x2, got {item!r}") from None
        if U < 1 or R < 1:
            raise ValueError(f"--ulysses-meshes: {item!r} needs U >= 1 and R >= 1")
        meshes.append((U, R))
    return list(dict.fromkeys(meshes))


QUICK = dict(ulysses_seq_len=512, ulysses_repeats=1, ulysses_head_dim=32)


def run(args) -> dict:
    meshes = _parse_meshes(args.ulysses_meshes)
    worlds = {U * R for U, R in meshes}
    heads, kv = args.ulysses_heads, args.ulysses_kv_heads or args.ulysses_heads
    bad = [f"{U}x{R}" for U, R in meshes if heads % U]
    if len(worlds) != 1 or bad or heads % kv:  # refuse before any timing
        raise ValueError(
            f"--ulysses-meshes must share one world size (got {sorted(worlds)}) and U must divide "
            f"--ulysses-heads {heads} (not {bad}); heads must be a multiple of kv heads {kv}"
        )
    W, T = worlds.pop(), args.ulysses_threads_per_rank
    batch, seq, d, repeats = 1, args.ulysses_seq_len, args.ulysses_head_dim, args.ulysses_repeats
    rows = []
    with tqdm(total=2 + 2 * len(meshes), desc="ulysses bench", unit="case") as bar:
        for causal, t in sdpa_seconds(batch, seq, heads, d, W * T, repeats, bar).items():
            rows.append(dict(impl="sdpa", mesh="1 process", ulysses=1, ring=1, causal=causal, seconds=t, all_to_alls=0))
        with LocalCluster(W, threads_per_rank=T) as cluster:
            for U, R in meshes:
                for causal in (False, True):
                    bar.set_postfix_str(f"{U}x{R} causal={causal}")
                    t, a2a = cluster.run(time_mesh, U, R, batch, seq, heads, kv, d, causal, repeats, timeout=3600)[0]
                    impl = "ring" if U == 1 else "ulysses" if R == 1 else "hybrid"
                    rows.append(
                        dict(impl=impl, mesh=f"{U}x{R}", ulysses=U, ring=R, causal=causal, seconds=t, all_to_alls=a2a)
                    )
                    bar.update()
    add_sdpa_ratios(rows)
    lines = [
        f"Global sequence {seq}, {heads} heads ({kv} kv) x {d}, float32, forward+backward, zigzag, "
        f"{W} ranks x {T} thread(s) vs SDPA in one process with {W * T} threads, median of {repeats}. "
        "SDPA's GQA is expanded (it takes equal heads); all-to-alls per iteration (forward + backward).",
        "",
        "| impl | U x R | mask | seconds | SDPA time / this | all-to-alls |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['mesh']} | {'causal' if r['causal'] else 'full'} | {r['seconds']:.3f} | "
            f"{r['sdpa_over_this']:.3f} | {r['all_to_alls']} |"
        )
    md = "\n".join(lines) + "\n"
    out = write_results(
        args.out,
        "ulysses",
        dict(args={k: v for k, v in vars(args).items() if k.startswith("ulysses") or k in ("out", "quick")}, rows=rows),
        md,
    )
    mesh_rows = [r for r in rows if r["impl"] != "sdpa"]
    labels = list(dict.fromkeys(f"{r['impl']} {r['mesh']}" for r in mesh_rows))
    draw(
        "bars",
        labels,
        {
            mask: [r["sdpa_over_this"] for r in mesh_rows if r["causal"] == (mask == "causal")]
            for mask in ("full", "causal")
        },
        out / "ulysses.png",
        ylabel="SDPA time / mesh time",
        title=f"Ring, Ulysses and hybrid on {W} ranks vs SDPA, S={seq}",
    )
    print(md)
    return dict(rows=rows)
