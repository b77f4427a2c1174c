"""A run folder's state on disk: sharded checkpoints (torch.distributed.checkpoint), the
newest intact one, export to one file, and the lock that gives a folder to one job.

A checkpoint `checkpoints/step-00000300/` holds DCP's files (every rank writes its own
shards, in parallel, and DCP reshards on load, so a run resumes on another world size or
mesh shape), `rng-rank-NNNNN.pt` (each rank's own CPU and CUDA random state), `meta.json`
(step, model config, run settings) and `COMPLETE`, the list of
files with their sizes, written last. Everything is written into a hidden
`.tmp-step-...` folder that is renamed into place only when complete, so a reader sees a
whole checkpoint or none; a checkpoint whose files do not match its `COMPLETE` list is
named and skipped for the newest intact one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

MARKER = "COMPLETE"
RUN_KEYS = (
    "seed",
    "batch",
    "seq_len",
    "seq_schedule",
    "data",
    "fmt",
    "id_digits",
    "value_digits",
    "questions",
    "id_chars",
    "id_pool",
    "loss_on",
    "lr",
    "steps",
    "warmup",
    "model",
    "pretrained",
    "text",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "eval_fraction",
    "lora",
    "lora_alpha",
    "lora_targets",
)


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}


def problem(path: Path) -> str | None:
    """Why `path` is not an intact checkpoint (None: it is)."""
    marker = path / MARKER
    if not marker.is_file():
        return f"{path}: no {MARKER} marker (an interrupted save)"
    try:
        listed = json.loads(marker.read_text())
        json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"{path}: unreadable {MARKER} or meta.json ({e})"
    found = _files(path)
    for name, size in listed.items():
        if found.get(name) != size:
            return (
                f"{path}: {name} is {'missing' if name not in found else f'{found[name]} bytes'}, "
                f"expected {size} bytes (truncated or damaged)"
            )
    return None


def checkpoints(folder: Path) -> list[Path]:
    """Renamed (complete when written) checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))


def newest_intact(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint and the problems of any newer ones skipped for it."""
    skipped: list[str] = []
    for path in reversed(checkpoints(folder)):
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append(why)
    return None, skipped


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temp folders of interrupted saves (only ever called by the folder's lock holder)."""
    folder = Path(folder)
    gone = [p for p in folder.iterdir() if p.name.startswith(".tmp-")] if folder.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _options(model) -> StateDictOptions:
    """What a checkpoint holds of the model: the parameters it trains (and the buffers). A model with frozen
    parameters (finetune --lora: the base under the adapters) keeps them out: they are the pretrained
    checkpoint's, read again when the run is built, so a checkpoint is the adapters' size, not the model's."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _state(model, optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(model))
    # a frozen parameter under a second name (an output matrix tied to a frozen embedding) is left out too
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    model_state = {k: v for k, v in model_state.items() if k not in frozen}
    return {"model": model_state, "optim": optim_state}


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank-{rank:05d}.pt"


def _rng_state() -> dict:
    """This rank's random state: ranks draw different numbers (e.g. dropout on their own
    tokens), so each keeps its own; DCP would store one copy of a tensor every rank holds."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(path: Path) -> None:
    """This rank's saved random state, if the checkpoint has one for its rank (a resume on
    more ranks than saved it leaves the new ranks' seeded state as it is)."""
    file = _rng_file(path, dist.get_rank())
    if file.exists():
        state = torch.load(file, weights_only=True)
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def save(folder: Path, step: int, model, optimizer, meta: dict, keep: int) -> Path:
    """Write a checkpoint of (model, optimizer, RNG) at `step` from every rank (a collective),
    then keep the newest `keep`. Rank 0 alone touches names and markers."""
    folder, rank = Path(folder), dist.get_rank()
    final, tmp = folder / _name(step), folder / f".tmp-{_name(step)}"

    def prepare():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    _on_rank0(prepare, f"preparing {tmp}")
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp))
    _collectively(lambda: torch.save(_rng_state(), _rng_file(tmp, rank)), f"saving the random state into {tmp}")
    _on_rank0(lambda: _finish(folder, tmp, final, step, meta, keep), f"finishing {final}")
    return final


def _on_rank0(fn, what: str) -> None:
    """fn() on rank 0 alone (names and markers), failures raised on every rank (_collectively)."""
    _collectively(fn if dist.get_rank() == 0 else (lambda: None), what)


def _collectively(fn, what: str) -> None:
    """fn() on every rank, then every rank learns whether any failed, so that a disk full on one
    rank raises the same error everywhere at once instead of leaving the others at a barrier.
    Also a barrier: after it, every rank's files are on disk."""
    err = None
    try:
        fn()
    except OSError as e:
        err = f"checkpoint: {what} failed on rank {dist.get_rank()}: {e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    first = next((e for e in errors if e), None)
    if first:
        raise RuntimeError(first)


def _finish(folder: Path, tmp: Path, final: Path, step: int, meta: dict, keep: int) -> None:
    """Rank 0: meta, fsync, the completion marker, the atomic rename, pruning."""
    (tmp / "meta.json").write_text(json.dumps(dict(meta, step=step), indent=1))
    for p in tmp.iterdir():
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    (tmp / MARKER).write_text(json.dumps(_files(tmp)))
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. --stop-after on a checkpoint step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    # keep the newest `keep` intact checkpoints up to this one; never this one, never a
    # newer (damaged, skipped by a resume) one, and never count a damaged one as kept
    intact = [p for p in checkpoints(folder) if p.name <= final.name and (p == final or problem(p) is None)]
    for old in intact[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, model, optimizer) -> dict:
    """Load a checkpoint into a (possibly differently sharded) model and optimizer, and
    restore this rank's random state; a collective. Returns its meta."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options(model)
    )
    _restore_rng(path)
    return read_meta(path)


def choose(folder: Path, log=print, skip: tuple[Path, ...] = ()) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 picks the newest intact one (naming
    any it skips) and tells the others."""
    pick: list[str | None] = [None]
    if dist.get_rank() == 0:
        for path in reversed(checkpoints(folder)):
            if path in skip:
                continue
            why = problem(path)
            if why is None:
                pick = [str(path)]
                break
            log(f"skipping a damaged checkpoint: {why}")
    dist.broadcast_object_list(pick, src=0)
    return Path(pick[0]) if pick[0] else None


def resume(folder: Path, model, optimizer, log=print) -> dict | None:
    """Load the newest checkpoint that loads (a collective); its meta, or None if there is none.

    A checkpoint that passes the size check but fails to load (DCP raises the same
    CheckpointException on every rank) is named and the next older one is tried; each
    attempt overwrites the whole model, optimizer and RNG state."""
    failed: tuple[Path, ...] = ()
    while (path := choose(folder, log, failed)) is not None:
        try:
            return dict(load(path, model, optimizer), path=str(path))
        except CheckpointException as e:  # DCP gathers every rank's failure and raises it on all of them
            log(f"skipping a damaged checkpoint: {path} failed to load ({type(e).__name__}: {str(e)[:300]})")
            failed += (path,)
    return None


def run_settings(cfg) -> dict:
    """The settings a resume must agree with (data order, schedule, model)."""
    return {k: getattr(cfg, k) for k in RUN_KEYS}


def incompatibilities(meta: dict, cfg) -> list[str]:
    """How `cfg` differs from the run that wrote a checkpoint (model preset and data stream)."""
    now = run_settings(cfg)
    return [
        f"--{k.replace('_', '-')}: checkpoint {v!r}, now {now[k]!r}"
        for k, v in meta.get("run", {}).items()
        if k in now and now[k] != v
    ]


def resume_problems(cfg) -> list[str]:
    """What stops `cfg` from starting in its --out: checkpoints of another run, or of this
    one without --resume (a fresh start would mix with them)."""
    path, _ = newest_intact(Path(cfg.out) / "checkpoints")
    if path is None:
        return []
    if not cfg.resume:
        return [
            f"--out {cfg.out} holds checkpoints up to step {read_meta(path)['step']}: pass --resume to "
            "continue that run, or give a new --out (or delete the folder) to start over"
        ]
    diffs = incompatibilities(read_meta(path), cfg)
    if diffs:
        return [
            f"--resume: {path} was made by a different run ({'; '.join(diffs)}); use the same settings or a new --out"
        ]
    return []


def consolidated(path: Path) -> dict:
    """A checkpoint as one dict in this process (model, optim, plus its meta)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/whole.pt")
        state = torch.load(f"{tmp}/whole.pt", weights_only=True)  # tensors, numbers, strings, dicts: no pickle
    state.update(read_meta(path))
    return state


def export(run_dir: Path, out_file: Path) -> Path:
    """The newest intact checkpoint of a run as one file for inference: {step, config, model, task}
    (task: the run's retrieval task and evaluation grid, None for runs saved before it was kept)."""
    path, skipped = newest_intact(Path(run_dir) / "checkpoints")
    if path is None:
        raise FileNotFoundError(
            f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}" + "".join(f"; skipped {why}" for why in skipped)
        )
    state = consolidated(path)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    torch.save(
        {"step": state["step"], "config": state["config"], "model": state["model"], "task": state.get("task")}, tmp
    )
    os.replace(tmp, out_file)
    return path


def load_export(path: Path) -> dict:
    """An `export` file ({step, config, model}) on the CPU, read with weights_only=True: a file from
    elsewhere cannot run code when loaded."""
    return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)  # ranks share its pages


class LockHeld(RuntimeError):
    pass


class RunLock:
    """`with RunLock(out):` one job per run folder. The holder keeps an exclusive `flock` on
    `.lock` for its whole life (the kernel drops it when the process dies, so a killed job's
    lock is free at once, and no two jobs can both win a take-over race); the file names
    the holder's pid and host, so a second job is refused naming them."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.mine = f"{os.getpid()} {socket.gethostname()}"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder() or ("?", "unknown host")
                raise LockHeld(
                    f"{self.path.parent} is in use by another job (pid {holder[0]} on "
                    f"{holder[1]}); wait for it or use another --out"
                ) from None
            try:  # the file we locked may have been released and removed meanwhile: lock the one in place
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self.mine.encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise LockHeld(f"could not take {self.path}: other jobs keep taking it")

    def _holder(self) -> tuple[str, str] | None:
        """(pid, host) named in the lock file, for the refusal message."""
        try:
            pid, host = self.path.read_text().split()
            return pid, host
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Remove the file, then drop the lock (a job that opened it meanwhile sees it gone and retries)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
