"""`ringwise train`: sequence-parallel training of the Blockwise Transformer.

Every rank holds one shard of each sequence of its data-parallel replica; ranks form a
(dp x ring) mesh. Each rank's loss covers only its own tokens and is normalised by the
*global* labelled-token count, so summing parameter gradients over all ranks gives
exactly the gradient of the whole batch, whatever W, dp or layout.

Locally, `ringwise train --world 4` starts the ranks through PyTorch's elastic launcher
(the code torchrun runs); on a cluster the same module runs under
`torchrun --nnodes N --nproc-per-node 8 -m ringwise.train ... --backend nccl`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import checkpoints
from .data import (DEFAULT_DIGITS, RETRIEVAL_FORMATS, PackedTextDataset, RetrievalDataset, collate,
                   retrieval_eval_grid, sample_indices)
from .launch import elastic_run
from .attention.layout import positions, shard, split_unit
from .lab.memory import _status_kb
from .model import PRESETS, Transformer, model_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("processes")
    g.add_argument("--world", type=int, default=4, help="local processes to start (ignored under torchrun)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel replicas; ring size = world / dp")
    g.add_argument("--layout", default="zigzag", choices=("contiguous", "striped", "zigzag"))
    g.add_argument("--backend", default=None, help="gloo (CPU, default) or nccl (CUDA)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="small", choices=tuple(PRESETS))
    g.add_argument("--checkpoint-layers", action="store_true", help="recompute each layer in backward")
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state over all ranks (FSDP2)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="retrieval", choices=("retrieval", "text"))
    g.add_argument("--text", nargs="+", default=None, help="text files or folders (with --data text)")
    g.add_argument("--fmt", default="compact", choices=tuple(RETRIEVAL_FORMATS), help="retrieval line format")
    g.add_argument("--id-digits", type=int, default=None)
    g.add_argument("--id-chars", default=None, help="single-character ids drawn from these characters")
    g.add_argument("--value-digits", type=int, default=None)
    g.add_argument("--questions", type=int, default=1,
                   help="retrieval questions per training sequence (evaluation always asks one)")
    g.add_argument("--id-pool", type=int, default=None,
                   help="haystack ids recur, drawn from this many ids (training and evaluation)")
    g.add_argument("--loss-on", default="answer", choices=("answer", "recall", "all"),
                   help="training targets: answers only; also every recurring line's value; every token")
    g.add_argument("--seq-len", type=int, default=512, help="global tokens per sequence")
    g.add_argument("--batch", type=int, default=8, help="global sequences per step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=600)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="folder for checkpoints, metrics, plots")
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None, help="stop (as if interrupted) after this step")
    g.add_argument("--eval-lengths", type=int, nargs="*", default=None, help="retrieval eval context lengths")
    g.add_argument("--eval-depths", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    g.add_argument("--eval-per-cell", type=int, default=8)
    g.add_argument("--eval-decoys", type=int, default=0,
                   help="with --id-pool: other ids that occur once in each evaluation document, so the "
                        "needle is not the only line seen once")
    g.add_argument("--no-plots", action="store_true")


class Mesh:
    """This rank's place in the (dp x ring) arrangement of the world."""

    def __init__(self, dp: int):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if dp < 1 or self.world % dp:
            raise ValueError(f"--dp {dp} must divide the world size {self.world}")
        self.dp, self.ring_size = dp, self.world // dp
        self.dp_rank, self.ring_rank = divmod(self.rank, self.ring_size)
        # The ring always gets its own group, so its point-to-point traffic never
        # interleaves with collectives (FSDP, gradient reduction) on the default group.
        groups = [dist.new_group(list(range(d * self.ring_size, (d + 1) * self.ring_size))) for d in range(dp)]
        self.ring_group = groups[self.dp_rank]


def make_dataset(args):
    if args.data == "text":
        if not args.text:
            raise ValueError("--data text needs --text FILE [FILE ...]")
        return PackedTextDataset(args.text, args.seq_len)
    return RetrievalDataset(args.seq_len, seed=args.seed, fmt=args.fmt, id_digits=args.id_digits,
                            value_digits=args.value_digits, questions=args.questions,
                            id_chars=args.id_chars, id_pool=args.id_pool, loss_on=args.loss_on)


def local_batch(dataset, step, args, mesh: Mesh):
    """This replica's sequences of the global batch at `step`, sharded for this ring rank."""
    indices = sample_indices(step, args.batch, len(dataset), args.seed)
    per = args.batch // mesh.dp
    batch = collate([dataset[i] for i in indices[mesh.dp_rank * per:(mesh.dp_rank + 1) * per]])
    ids = shard(batch["input_ids"], 1, args.layout, mesh.ring_group)
    labels = shard(batch["labels"], 1, args.layout, mesh.ring_group)
    return ids, labels


def shard_model(model: torch.nn.Module, mesh: Mesh, device) -> None:
    """FSDP2 over every rank: each layer's parameters, gradients and optimizer state live
    in 1/world shards and are gathered only while the layer runs. Gradients are summed
    (not averaged) across ranks, because each rank's loss is already divided by the
    global token count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    world = init_device_mesh(device.type, (mesh.world,))
    for layer in model.layers:
        fully_shard(layer, mesh=world)
    fully_shard(model, mesh=world)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state on CPU, the same with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load whole state into a (possibly sharded) model and a fresh optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not optimizer.state:  # give the optimizer its state tensors first (a step with lr 0 and zero grads)
        lrs = [g["lr"] for g in optimizer.param_groups]
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum every parameter gradient over all ranks in one collective."""
    grads = [p.grad for p in model.parameters()]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def compute_gradients(model, dataset, step, args, mesh: Mesh, device):
    """Loss and parameter gradients of the whole global batch at `step`, on every rank."""
    ids, labels = local_batch(dataset, step, args, mesh)
    ids, labels = ids.to(device), labels.to(device)
    pos = positions(args.seq_len, args.layout, mesh.ring_group, device=device)
    loss_sum, n_tokens = model(ids, pos, labels, layout=args.layout, group=mesh.ring_group,
                               validate=step == getattr(args, "_first_step", step))
    totals = torch.stack([loss_sum.detach().double(), n_tokens.double()])
    dist.all_reduce(totals)
    if totals[1] == 0:
        raise RuntimeError(f"step {step}: the global batch has no labelled tokens")
    (loss_sum / totals[1].to(loss_sum.dtype)).backward()
    if not getattr(args, "fsdp", False):  # FSDP reduce-scatters (sums) the gradients itself
        all_reduce_grads(model)
    return (totals[0] / totals[1]).item(), int(totals[1].item())


def train_step(model, optimizer, dataset, step, args, mesh: Mesh, device):
    """One optimizer step on the global batch; returns (global mean loss, global tokens)."""
    loss, n_tokens = compute_gradients(model, dataset, step, args, mesh, device)
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss, n_tokens


def peak_rss_mib_max() -> float:
    """The largest peak resident memory of any rank so far (MiB)."""
    t = torch.tensor([_status_kb("VmHWM") / 1024.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def eval_setup(args, ring_size: int) -> tuple[list[int], dict]:
    """Evaluation context lengths (whole shard units) and the evaluation task's arguments.

    Building one dataset per length checks them, so `check_arguments` can refuse bad
    evaluation flags before training rather than after it."""
    unit = split_unit(args.layout, ring_size)
    lengths = args.eval_lengths or [args.seq_len // 2, args.seq_len]
    lengths = sorted({max(unit, L - L % unit) for L in lengths})
    kwargs = dict(fmt=args.fmt, id_digits=args.id_digits, value_digits=args.value_digits, id_chars=args.id_chars,
                  id_pool=args.id_pool, decoys=args.eval_decoys)
    for L in lengths:
        RetrievalDataset(L, depth=0.5, **kwargs)
    return lengths, kwargs


@torch.no_grad()
def evaluate_retrieval(model, args, mesh: Mesh, device) -> dict:
    """Accuracy by (context length, needle depth): an answer counts if every digit is right."""
    lengths, kwargs = eval_setup(args, mesh.ring_size)
    grid = retrieval_eval_grid(lengths, args.eval_depths, args.eval_per_cell, **kwargs)
    model.eval()
    acc = {}
    for (L, depth), examples in grid.items():
        batch = collate(examples)
        ids = shard(batch["input_ids"], 1, args.layout, mesh.ring_group).to(device)
        labels = shard(batch["labels"], 1, args.layout, mesh.ring_group).to(device)
        pos = positions(L, args.layout, mesh.ring_group, device=device)
        pred, mask = model.labelled_predictions(ids, pos, labels, layout=args.layout, group=mesh.ring_group)
        hits = torch.zeros(labels.shape, dtype=torch.bool, device=device)
        hits[mask] = pred == labels[mask]
        counts = torch.stack([(hits & mask).sum(1), mask.sum(1)]).double()
        dist.all_reduce(counts, group=mesh.ring_group)
        acc[(L, depth)] = (counts[0] == counts[1]).double().mean().item()
    model.train()
    return dict(lengths=lengths, depths=list(args.eval_depths),
                accuracy=[[acc[(L, d)] for L in lengths] for d in args.eval_depths])


def _log(msg: str) -> None:
    print(msg, flush=True)


def worker(args) -> None:
    """One rank of the job (started by the elastic launcher or by torchrun)."""
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=120))
    try:
        _run(args, backend)
    finally:
        dist.destroy_process_group()


def _run(args, backend):
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    mesh = Mesh(args.dp)
    if args.batch % mesh.dp:
        raise ValueError(f"--batch {args.batch} must be divisible by --dp {mesh.dp}")
    unit = split_unit(args.layout, mesh.ring_size)
    if args.seq_len % unit:
        raise ValueError(f"--seq-len {args.seq_len} must be a multiple of {unit} for layout {args.layout!r} "
                         f"on a ring of {mesh.ring_size}")
    out = Path(args.out)
    is_main = mesh.rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    cfg = model_config(args.model, checkpoint_layers=args.checkpoint_layers)
    dataset = make_dataset(args)
    if args.data == "text":
        cfg.vocab_size = dataset.tokenizer.vocab_size
    torch.manual_seed(args.seed)  # identical initial parameters on every rank
    model = Transformer(cfg).to(device)
    if args.fsdp:
        shard_model(model, mesh, device)
    else:
        for p in model.parameters():  # one flat all-reduce needs every gradient to exist
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    start = 0
    if args.resume:
        state = checkpoints.load_latest(out / "checkpoints", map_location=device)
        if state is not None:
            checkpoints.check_compatible(state, cfg, args)
            load_full_state(model, optimizer, state["model"], state["optimizer"])
            torch.set_rng_state(state["rng"])
            start = state["step"]
            if is_main:
                _log(f"resumed from step {start} ({state['path']})")
        elif is_main:
            _log(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    args._first_step = start

    metrics_path = out / "metrics.jsonl"
    if is_main and start == 0 and metrics_path.exists():
        metrics_path.unlink()
    tokens_per_step = args.batch * args.seq_len
    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        _log(f"training {args.model} ({model.num_params() / 1e6:.2f}M params) on {mesh.world} ranks "
             f"(dp {mesh.dp} x ring {mesh.ring_size}, {args.layout}), {args.seq_len} tokens per sequence, "
             f"{args.batch} sequences per step")
    last_loss = float("nan")
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        last_loss, n_tokens = train_step(model, optimizer, dataset, step, args, mesh, device)
        seconds = time.perf_counter() - t0
        peak = peak_rss_mib_max()
        if is_main:
            rec = dict(step=step, loss=last_loss, lr=lr_at(step, args), seconds=seconds,
                       tokens_per_s=tokens_per_step / seconds, labelled_tokens=n_tokens, peak_rss_mib=peak)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens_per_step / seconds:,.0f}", peak_MiB=f"{peak:.0f}")
            bar.update()
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps or done == args.stop_after:
            model_state, optim_state = full_state(model, optimizer)  # a collective under FSDP
            if is_main:
                checkpoints.save(out / "checkpoints", dict(
                    step=done, model=model_state, optimizer=optim_state,
                    rng=torch.get_rng_state(), config=cfg.to_dict(), args=checkpoints.run_args(args)), keep=args.keep)
            dist.barrier()
        if args.stop_after is not None and done >= args.stop_after and done < args.steps:
            if is_main:
                bar.close()
                _log(f"stopped after step {done} (--stop-after); continue with --resume")
            return
    if bar is not None:
        bar.close()

    result = dict(final_loss=last_loss, steps=args.steps)
    if args.data == "retrieval":
        result["retrieval"] = evaluate_retrieval(model, args, mesh, device)
    if is_main:
        (out / "summary.json").write_text(json.dumps(result, indent=2))
        if not args.no_plots:
            _plots(out, result)
        _log(_summary(args, mesh, model, result, out))


def _plots(out: Path, result: dict) -> None:
    from .lab.plots import plot_loss_curve, plot_retrieval_heatmap

    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    plot_loss_curve([r["step"] for r in recs], [r["loss"] for r in recs], out / "loss.png",
                    title="Training loss (global mean per labelled token)")
    if "retrieval" in result:
        r = result["retrieval"]
        plot_retrieval_heatmap(r["accuracy"], r["lengths"], r["depths"], out / "retrieval.png",
                               title="Line retrieval accuracy")


def _summary(args, mesh, model, result, out) -> str:
    line = (f"done: {args.steps} steps, {model.num_params() / 1e6:.2f}M params, {mesh.world} ranks "
            f"(dp {mesh.dp} x ring {mesh.ring_size}), final loss {result['final_loss']:.4f}")
    if "retrieval" in result:
        r = result["retrieval"]
        per_len = [sum(row[j] for row in r["accuracy"]) / len(r["accuracy"]) for j in range(len(r["lengths"]))]
        digits = args.value_digits or DEFAULT_DIGITS[args.fmt][1]
        line += "; retrieval accuracy " + ", ".join(f"{a:.0%} at {L} tokens" for a, L in zip(per_len, r["lengths"]))
        line += f" (chance {1 / (9 * 10 ** (digits - 1)):.2g})"  # values have no leading zero
    return line + f"; results in {out}/"


def check_arguments(args) -> None:
    """Refuse bad flags in the launching process: before any rank starts, talks or trains."""
    world = int(os.environ.get("WORLD_SIZE", args.world))
    if args.dp < 1 or world % args.dp:
        raise ValueError(f"--dp {args.dp} must divide the world size {world}")
    if args.data == "retrieval":
        make_dataset(args)
        eval_setup(args, world // args.dp)


def launch(args) -> None:
    """Run the job: under torchrun directly, else start --world local ranks (elastic launcher)."""
    check_arguments(args)
    elastic_run(worker, args.world, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ringwise.train", description=__doc__.split("\n")[0])
    add_arguments(p)
    launch(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
