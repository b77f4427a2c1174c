"""The training loop: `setup`, `step`, `save`, `train`, and `worker` that runs them on one rank.

What differs between runs (the model, the data, the evaluation, what a checkpoint keeps of them)
is the run's task (tasks.py), picked once from the configuration: nothing here asks which.
Every rank holds one shard of each sequence of its replica. Each rank's loss covers only
its own tokens and is divided by the *global* labelled-token count, so summing parameter
gradients over all ranks (FSDP2's reduce-scatter, see mesh.py) gives exactly the
gradient of the whole batch, whatever the world size, dp or layout. Rank 0 writes
metrics.jsonl and summary.json; the ranks never draw plots (the command does, after the job: plots.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..attention.seqshard import SeqShard
from ..data import collate, sample_indices
from ..model import IGNORE_INDEX, Transformer
from . import checkpoint
from .config import TrainConfig, schedule_text
from .mesh import Mesh, init_distributed, make_mesh
from .tasks import Task, eager_if, task_for
from .watchdog import Heartbeat, name_failed_peers, peak_memory_mib, return_large_frees

if TYPE_CHECKING:
    from .pretrained import PretrainedLM


def log(msg: str) -> None:
    print(msg, flush=True)


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Run:
    """Everything one rank trains with."""

    cfg: TrainConfig
    mesh: Mesh
    task: Task  # the model's and the data's maker, the evaluation (tasks.py)
    model: Transformer | PretrainedLM  # ringwise's own, or a pretrained transformers model (pretrained.py)
    optimizer: torch.optim.Optimizer
    start: int = 0
    seq_len: int = 0  # the last step's sequence length, as trained (compute_gradients)

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def is_main(self) -> bool:
        return self.mesh.rank == 0

    @property
    def seqshard(self) -> SeqShard:
        """How this rank's replica cuts each sequence: cfg.layout over the cp (ring) and ulysses groups."""
        return self.mesh.seqshard(self.cfg.layout)


def build(cfg: TrainConfig, mesh: Mesh) -> Run:
    """The task's data and model (sharded: never whole in one process), and the optimizer."""
    task = task_for(cfg)
    model = task.build_model(mesh)
    trained = [p for p in model.parameters() if p.requires_grad]  # --lora: the adapters only (the base is frozen)
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    return Run(cfg, mesh, task, model, optimizer)


def setup(cfg: TrainConfig, mesh: Mesh) -> Run:
    """Build the run and, with --resume, load the newest intact checkpoint (any world size)."""
    run = build(cfg, mesh)
    out = Path(cfg.out)
    if run.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run.task.prepare_folder(out)
    if cfg.resume:
        meta = checkpoint.resume(
            out / "checkpoints", run.model, run.optimizer, log=log if run.is_main else (lambda m: None)
        )
        if meta is not None:
            run.start = meta["step"]
            if run.is_main:
                log(f"resumed from step {run.start} ({meta['path']})")
        elif run.is_main:
            log(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    if run.is_main:  # this rank holds the folder's lock
        checkpoint.remove_leftovers(out / "checkpoints")
        truncate_metrics(out / "metrics.jsonl", run.start)
    return run


def truncate_metrics(path: Path, start: int) -> None:
    """Keep only the records of steps before `start` (the steps a resume replays are logged again)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines(keepends=True) if line.strip() and json.loads(line)["step"] < start
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def local_batch(run: Run, step: int) -> list[tuple]:
    """This replica's sequences of the global batch at `step`, sharded for this ring rank, as
    micro-batches (input_ids, labels, cu_seqlens, images): the whole batch at once, or, for packed
    documents and image-text examples, one sequence at a time (each has its own boundaries, or its own
    images: the global tokens and the processor's inputs, which the model shards)."""
    cfg, mesh = run.cfg, run.mesh
    # a --seq-len schedule: the windows of the step's stage (the benchmarks' stand-in tasks have train_data only)
    data = run.task.train_data_at(step) if cfg.seq_schedule else run.task.train_data
    indices = sample_indices(step, cfg.batch, len(data), cfg.seed)
    per = cfg.batch // mesh.dp
    examples = [data[i] for i in indices[mesh.dp_rank * per : (mesh.dp_rank + 1) * per]]
    shard = lambda x: run.seqshard.shard(x).to(run.device)  # noqa: E731  (labels are already next-token targets)
    if "images" in examples[0]:  # image-text examples: each with its global tokens and images (the model shards)
        return [
            (
                shard(ex["input_ids"][None]),
                shard(ex["labels"][None]),
                None,
                {
                    "input_ids": ex["input_ids"][None].to(run.device),
                    **{k: v.to(run.device) for k, v in ex["images"].items()},
                },
            )
            for ex in examples
        ]
    if "cu_seqlens" in examples[0]:
        return [(shard(ex["input_ids"][None]), shard(ex["labels"][None]), ex["cu_seqlens"], None) for ex in examples]
    batch = collate(examples)
    return [(shard(batch["input_ids"]), shard(batch["labels"]), None, None)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def compute_gradients(run: Run, step: int) -> tuple[float, int]:
    """Loss and parameter gradients of the whole global batch at `step` (gradients summed by FSDP2), and
    its labelled tokens; the length of its sequences as trained (this rank's shard x the pieces of the
    sequence) in run.seq_len."""
    seqshard = run.seqshard
    micro = local_batch(run, step)
    run.seq_len = seq_len = micro[0][0].shape[1] * seqshard.world
    pos = seqshard.positions(seq_len, device=run.device)
    count = torch.stack([(labels != IGNORE_INDEX).sum() for _, labels, _, _ in micro]).sum().double()
    dist.all_reduce(count)  # every rank divides by the global labelled-token count
    if count == 0:
        raise RuntimeError(f"step {step}: the global batch has no labelled tokens")
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    for i, (ids, labels, cu, images) in enumerate(micro):
        first = step == run.start and i == 0  # the model's first loss, validated (set_ring): eager, not a 2nd graph
        with eager_if(run.cfg.compile and first):
            if images is None:
                loss_sum, _ = run.model.loss(ids, pos, labels, cu)
            else:  # a vision-language example: the pretrained model's own call
                loss_sum, _ = cast("PretrainedLM", run.model).image_loss(ids, pos, labels, images)
        (loss_sum / count.to(loss_sum.dtype)).backward()
        total += loss_sum.detach().double()
    dist.all_reduce(total)
    return (total / count).item(), int(count.item())


def step(run: Run, step: int) -> dict:
    """One optimizer step on the global batch; its metrics."""
    t0 = time.perf_counter()
    loss, n_tokens = compute_gradients(run, step)
    seq_len = run.seq_len
    if run.cfg.grad_clip:
        clip_gradients(run, run.cfg.grad_clip)
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = lr_at(step, run.cfg)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    tokens = run.cfg.batch * seq_len
    peaks = gather_peaks(run)
    key = "peak_gpu_mib" if run.device.type == "cuda" else "peak_rss_mib"
    stage = dict(stage=run.cfg.stage_at(step)[0] + 1) if run.cfg.seq_schedule else {}
    return dict(
        step=step,
        loss=loss,
        seq_len=seq_len,
        **stage,
        lr=lr_at(step, run.cfg),
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        labelled_tokens=n_tokens,
        **{key: max(peaks), f"{key}_per_rank": peaks},
    )


@torch.no_grad()
def clip_gradients(run: Run, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s scaling (by max_norm / (norm + 1e-6) where that is below 1), with
    the norm of the whole model's gradient summed from every rank's shards: each rank squares its own
    shards (FSDP2 gives every parameter's gradient as this rank's DTensor shard, wherever it lives: in
    host memory under --offload-params), the squares are summed over the shard group as one tensor on
    the run's device (so the collective runs under NCCL as under gloo), and each rank scales its shards
    in place. Returns the norm before clipping."""
    grads = [cast(DTensor, p.grad).to_local() for p in run.model.parameters() if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64, device=run.device)
    if grads:
        squares += torch.stack([n.double().square() for n in torch._foreach_norm(grads)]).sum().to(run.device)
    dist.all_reduce(squares, group=run.mesh.shard_mesh.get_group())
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, scale.to(grads[0].device, grads[0].dtype))
    return norm.item()


def gather_peaks(run: Run) -> list[float]:
    """Every rank's peak memory so far (MiB; on CUDA the allocator's peak of live tensors, on CPU the
    peak resident set, which counts no freed tensor since the rank set glibc's mmap threshold low:
    watchdog.return_large_frees), gathered as a device tensor so the collective runs under NCCL as
    under gloo."""
    every = torch.zeros(run.mesh.world, dtype=torch.float64, device=run.device)
    every[run.mesh.rank] = peak_memory_mib(run.device)
    dist.all_reduce(every)  # each rank fills its own slot
    return [round(x, 1) for x in every.tolist()]


def save(run: Run, done: int) -> None:
    """A checkpoint of the run after `done` steps; its meta keeps the model's config and the task's (tasks.py)."""
    kept = run.task.checkpoint_meta(run.mesh, run.model)
    meta = dict(
        config=kept["config"],
        run=checkpoint.run_settings(run.cfg),
        world=run.mesh.world,
        mesh=dict(dp=run.mesh.dp, cp=run.mesh.cp, ulysses=run.mesh.ulysses),
        task=kept["task"],
    )
    checkpoint.save(Path(run.cfg.out) / "checkpoints", done, run.model, run.optimizer, meta, keep=run.cfg.keep)


def stage_line(cfg: TrainConfig, step: int) -> str:
    """A --seq-len schedule's stage at `step`: its length, its steps, and the RoPE it trains with (one
    setting for the whole run, written into the model's config for the longest stage)."""
    i, length, first = cfg.stage_at(step)
    steps = cfg.seq_schedule[i][1] if cfg.seq_schedule else cfg.steps
    if cfg.rope_scaling is not None:
        rope = f"RoPE {cfg.rope_scaling} scaling x{cfg.rope_factor:g}"
    else:
        rope = "the model's RoPE" if cfg.rope_theta is None else "RoPE"
    if cfg.rope_theta is not None:
        rope += f" theta {cfg.rope_theta:g}"
    resumed = f", resumed at step {step}" if step != first else ""
    return (
        f"stage {i + 1}/{len(cfg.seq_schedule or [0])}: {length} tokens per sequence, steps {first}-"
        f"{first + steps - 1}{resumed}; {rope} (the same in every stage, max_position_embeddings {cfg.seq_len}+)"
    )


def _last_record(path: Path) -> dict | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def train(run: Run) -> dict | None:
    """Steps from run.start; the summary, or None when stopped early by --stop-after."""
    cfg, out = run.cfg, Path(run.cfg.out)
    bar = None
    if run.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.start, desc="train", unit="step", dynamic_ncols=True)
        mesh = run.mesh
        log(
            f"training {run.task.name} ({run.model.num_params() / 1e6:.2f}M params, {cfg.compute_dtype(run.device)}) "
            f"on {mesh.world} ranks (dp {mesh.dp} x cp {mesh.cp} x ulysses {mesh.ulysses}, {cfg.layout}), "
            + (
                f"a --seq-len schedule {schedule_text(cfg.seq_schedule)} (length:steps)"
                if cfg.seq_schedule
                else f"{cfg.seq_len} tokens per sequence"
            )
            + f", {cfg.batch} sequences per step"
            + (f"; LoRA rank {cfg.lora}: {trainable_params(run.model) / 1e6:.3f}M trained" if cfg.lora else "")
        )
    before = run.task.evaluate_before(run)
    rec = dict(loss=float("nan"))
    for s in range(run.start, cfg.steps):
        if run.is_main and cfg.seq_schedule and (s == run.start or cfg.stage_at(s)[2] == s):
            log(stage_line(cfg, s))
        rec = step(run, s)
        if bar is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            stage = {"stage": f"{rec['stage']}/{len(cfg.seq_schedule)}"} if cfg.seq_schedule else {}
            bar.set_postfix(**stage, seq=rec["seq_len"], loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
            bar.update()
        done = s + 1
        stopping = cfg.stop_after is not None and cfg.stop_after <= done < cfg.steps
        if done % cfg.ckpt_every == 0 or done == cfg.steps or stopping:  # never stop without saving
            save(run, done)
        if stopping:
            if bar is not None:
                bar.close()
                log(f"stopped after step {done} (--stop-after); continue with --resume")
            return None
    if bar is not None:
        bar.close()
    if run.start >= cfg.steps and run.is_main:  # resumed a finished run: its last step's loss, from its log
        rec = _last_record(out / "metrics.jsonl") or rec
    result = dict(final_loss=rec["loss"], steps=cfg.steps, **run.task.evaluate(run, before))
    if run.is_main:
        (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def worker(cfg: TrainConfig, launcher_holds_lock: bool = False) -> None:
    """One rank of the job (started by the elastic launcher, which holds --out's lock, or by torchrun)."""
    device = init_distributed(cfg.device, cfg.backend, cfg.timeout)
    heartbeat = lock = None
    try:
        heartbeat = Heartbeat()
        lock = None if launcher_holds_lock else job_lock(cfg)
        if device.type == "cpu":
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dist.get_world_size()))
            if not return_large_frees() and dist.get_rank() == 0:  # the launcher set it already where it can
                log("warning: not glibc (no mallopt): peak_rss_mib may count freed memory")
        run_on_mesh(cfg, make_mesh(cfg.dp, device, cfg.timeout, cfg.ulysses))
    except Exception as e:
        named = name_failed_peers(e, heartbeat, cfg.timeout)
        if named is e:
            raise
        raise named from e
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if lock is not None:
            lock.release()
        dist.destroy_process_group()


def job_lock(cfg: TrainConfig):
    """Under torchrun no launching process of ours holds --out's lock: rank 0 takes it, and
    every rank raises the same error if another job holds it."""
    lock: checkpoint.RunLock | None = None
    err: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            lock = checkpoint.RunLock(cfg.out).acquire()
        except checkpoint.LockHeld as e:
            err = [str(e)]
    dist.broadcast_object_list(err, src=0)
    if err[0]:
        raise checkpoint.LockHeld(err[0])
    return lock


def run_on_mesh(cfg: TrainConfig, mesh: Mesh) -> dict | None:
    """Train on an initialised mesh (the tests call this on their own clusters)."""
    run = setup(cfg, mesh)
    result = train(run)
    if result is not None and run.is_main:
        log(summary_line(cfg, run, result))
    return result


def summary_line(cfg: TrainConfig, run: Run, result: dict) -> str:
    mesh = run.mesh
    line = (
        f"done: {cfg.steps} steps, {run.model.num_params() / 1e6:.2f}M params, {mesh.world} ranks "
        f"(dp {mesh.dp} x cp {mesh.cp} x ulysses {mesh.ulysses}), final loss {result['final_loss']:.4f}"
    )
    return line + run.task.summary(result) + f"; results in {cfg.out}/"
