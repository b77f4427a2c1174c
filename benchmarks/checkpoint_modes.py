"""Layer checkpointing's modes side by side in one run: step time, peak memory and loss of one training
forward+backward with no checkpointing, --checkpoint-layers, --checkpoint-layers --save-attention, and
(with --offload) --checkpoint-layers --offload-activations, alone and with --save-attention.

Two models: ringwise's own (a preset, `--model`) and a small transformers Llama (random weights,
`--hf-layers` layers of `--hf-hidden` width; ringwise's attention through the integration). Each mode's
model is built from the same seed on every rank and runs the same global batch (1 sequence of
`--seq-len` tokens, zigzag over `--world` gloo ranks on CPU, or one process on a GPU with `--device
cuda --world 1`).

Two passes. Memory: each mode alone, one warm-up step then one step whose peak above its start is
recorded (CPU: resident set, max over ranks; CUDA: the caching allocator's peak) with its loss (every
mode's is the same number: tested in tests/test_checkpointing.py). Time: every mode's model built, one
warm-up round, then `--repeats` rounds of one step per mode, the modes interleaved (each round starts
one mode later), so a machine whose load drifts (a shared CPU) slows every mode alike rather than the
one that happened to run then; per mode the median over rounds of the slowest rank's wall seconds
and, on CPU, of the slowest rank's process CPU seconds (threads' compute, not time spent waiting for
a core or a peer: on a loaded machine the steadier figure of the work each mode does).

Usage: python benchmarks/checkpoint_modes.py [--world 2 --seq-len 16384 --model small --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ringwise.attention.seqshard import SeqShard
from ringwise.model import Transformer, model_config
from ringwise.testing.memory import PeakMemory, mib

MODES = {
    "none": {},
    "checkpoint": dict(checkpoint_layers=True),
    "checkpoint+save": dict(checkpoint_layers=True, save_attention=True),
    "checkpoint+offload": dict(checkpoint_layers=True, offload_activations=True),
    "checkpoint+save+offload": dict(checkpoint_layers=True, save_attention=True, offload_activations=True),
}

Step = Callable[[], float]  # one training forward+backward; returns the global mean loss


def _batch(vocab: int, seq_len: int, shard: SeqShard, device: torch.device):
    tokens = torch.randint(0, vocab, (1, seq_len + 1), generator=torch.Generator().manual_seed(1))
    ids, labels = (shard.shard(t).to(device) for t in (tokens[:, :-1], tokens[:, 1:]))
    return ids, labels, shard.positions(seq_len).to(device)


def _slowest(x: float, device: torch.device) -> float:
    """x's maximum over the ranks (x itself in one process)."""
    if not dist.is_initialized():
        return x
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _timed(step: Step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step, each the slowest rank's; all ranks start together."""
    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return _slowest(wall, device), _slowest(cpu, device)


def side_by_side(make: Callable[[str], Step], modes: list[str], repeats: int, device: torch.device) -> dict:
    """mode -> (median wall s, median CPU s, peak MiB, loss): the two passes of the module docstring."""
    memory = {}
    for mode in modes:  # each mode alone, its model let go of before the next
        step = make(mode)
        step()  # warm-up
        with PeakMemory(device) as mem:
            loss = step()
        memory[mode] = (mib(_slowest(float(mem.peak_bytes), device)), loss)
        del step
    steps = {mode: make(mode) for mode in modes}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for r in range(1 + repeats):  # round 0: warm-up
        for i in range(len(modes)):
            mode = modes[(r + i) % len(modes)]
            t = _timed(steps[mode], device)
            if r:
                times[mode].append(t)
    out = {}
    for mode in modes:
        wall = statistics.median(t[0] for t in times[mode])
        cpu = statistics.median(t[1] for t in times[mode]) if device.type == "cpu" else None
        out[mode] = (wall, cpu, *memory[mode])
    return out


def own_model(preset: str, seq_len: int, modes: list[str], repeats: int, device_name: str) -> dict:
    device, shard = torch.device(device_name), SeqShard("zigzag")

    def make(mode: str) -> Step:
        torch.manual_seed(0)
        model = Transformer(model_config(preset, **MODES[mode])).to(device)
        ids, labels, pos = _batch(model.cfg.vocab_size, seq_len, shard, device)

        def step() -> float:
            loss, _ = model(ids, pos, labels, **shard.ring_kwargs())
            (loss / seq_len).backward()
            model.zero_grad(set_to_none=False)
            total = loss.detach().double()
            if dist.is_initialized():
                dist.all_reduce(total)
            return total.item() / seq_len

        return step

    return side_by_side(make, modes, repeats, device)


def hf_model(layers: int, hidden: int, seq_len: int, modes: list[str], repeats: int, device_name: str) -> dict:
    import transformers

    import ringwise.integrations.transformers as rw
    from ringwise.checkpointing import checkpoint_hf_layers

    device, shard = torch.device(device_name), SeqShard("zigzag")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=seq_len,
        attention_dropout=0.0,
    )

    def make(mode: str) -> Step:
        torch.manual_seed(0)
        model = rw.from_config(config, shard=shard).to(device).train()
        if mode != "none":
            checkpoint_hf_layers(model, MODES[mode].get("save_attention", False), "offload" in mode)
        tokens = torch.randint(0, 512, (1, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
        batch = rw.shard_batch(tokens, shard=shard)  # on the device: the labels must be the very tensor it returns

        def step() -> float:
            loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=False)
            total = loss.detach().double()
            if dist.is_initialized():
                dist.all_reduce(total)
            return total.item()

        return step

    return side_by_side(make, modes, repeats, device)


def table(title: str, res: dict) -> list[str]:
    base = res.get("checkpoint")
    cpu = all(r[1] is not None for r in res.values())
    columns = ["mode", "s/step", "/ checkpoint", "/ none"]
    columns += ["CPU s/step", "/ checkpoint (CPU)"] if cpu else []
    columns += ["peak MiB", "loss"]
    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for mode, (s, c, peak, loss) in res.items():
        row = f"| {mode} | {s:.3f} | {f'{s / base[0]:.2f}x' if base else '-'} | {s / res['none'][0]:.2f}x |"
        if cpu:
            row += f" {c:.3f} | {f'{c / base[1]:.2f}x' if base else '-'} |"
        lines.append(row + f" {peak:.1f} | {loss:.6f} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="small", help="ringwise's preset")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--hf-seq-len", type=int, default=None, help="the transformers model's length (default --seq-len)")
    p.add_argument("--hf-layers", type=int, default=4)
    p.add_argument("--hf-hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--offload", action="store_true", help="also the --offload-activations modes")
    p.add_argument("--skip", nargs="*", default=[], choices=["own", "hf"])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args()
    modes = [m for m in MODES if a.offload or "offload" not in m]
    hf_len = a.hf_seq_len or a.seq_len
    jobs = []
    if "own" not in a.skip:
        jobs.append((f"ringwise `{a.model}`, S = {a.seq_len}", own_model, (a.model, a.seq_len, modes, a.repeats)))
    if "hf" not in a.skip:
        title = f"transformers Llama {a.hf_layers} x {a.hf_hidden}, S = {hf_len}"
        jobs.append((title, hf_model, (a.hf_layers, a.hf_hidden, hf_len, modes, a.repeats)))
    results = {}
    if a.world == 1:
        torch.set_num_threads(a.threads)
        for title, fn, args in jobs:
            results[title] = fn(*args, a.device)
    else:
        if a.device != "cpu":
            raise SystemExit("--world > 1 runs gloo ranks on CPU; on a GPU use --world 1")
        from ringwise.testing.cluster import LocalCluster

        with LocalCluster(a.world, threads_per_rank=a.threads, track_memory=True, pg_timeout=3600) as cluster:
            for title, fn, args in jobs:
                results[title] = cluster.run(fn, *args, a.device, timeout=7200)[0]
    where = f"W = {a.world}, {a.device}, batch 1, zigzag, torch {torch.__version__}"
    print(f"Checkpoint modes ({where}; median of {a.repeats} interleaved rounds after a warm-up round)\n")
    for title, res in results.items():
        print("\n".join(table(title, res)))
    if a.out:
        a.out.write_text(json.dumps(dict(where=where, results=results), indent=1))


if __name__ == "__main__":
    main()
