"""What a training run is: `TrainConfig`, its command-line flags, and its validation.

`problems(cfg)` lists every problem of a configuration at once, as one line per flag; the
launcher calls `check(cfg)` before any rank starts, so a bad flag costs a few lines of
text, never a rank start-up or a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention.layout import LAYOUTS, split_unit
from ..data import RETRIEVAL_FORMATS, RetrievalDataset, text_files
from ..model import PRESETS, model_config
from .mesh import placement

# The dtype names every command takes; training offers bf16 and fp32 (fp16 would need loss scaling)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAIN_DTYPES = ("bf16", "fp32")


# --lora-targets' default: the attention and MLP projections of Llama-family decoders (Llama, Mistral, Qwen,
# Gemma, ...), by their module names
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def seq_len_or_schedule(text: str) -> int | list[list[int]]:
    """--seq-len's value: an integer, or stages LEN:STEPS,LEN:STEPS,... (finetune's progressive schedule)."""
    if ":" not in text and "," not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be an integer or a schedule LEN:STEPS,LEN:STEPS,...") from None
    stages = []
    for part in text.split(","):
        length, sep, steps = part.strip().partition(":")
        try:
            stage = [int(length), int(steps)]
        except ValueError:
            stage = None
        if not sep or stage is None:
            raise argparse.ArgumentTypeError(
                f"stage {part.strip()!r} is not LEN:STEPS (e.g. 4096:200,16384:100: 200 steps at 4096 tokens, "
                "then 100 at 16384)"
            )
        if stage[0] < 1 or stage[1] < 1:
            raise argparse.ArgumentTypeError(f"stage {part.strip()!r}: its length and steps must be positive integers")
        stages.append(stage)
    if any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
        raise argparse.ArgumentTypeError("the stages' lengths must increase (progressive training: short to long)")
    return stages


def schedule_text(stages) -> str:
    return ",".join(f"{length}:{steps}" for length, steps in stages)


class ConfigError(ValueError):
    """Every problem of a configuration, one per line."""


@dataclass
class TrainConfig:
    # processes
    world: int = 4
    dp: int = 1
    ulysses: int = 1
    layout: str = "zigzag"
    device: str = "auto"
    backend: str | None = None
    threads: int | None = None
    timeout: float = 120.0
    # model
    model: str = "small"
    pretrained: str | None = None  # a transformers checkpoint folder (ringwise finetune), instead of a preset
    rope_theta: float | None = None
    rope_scaling: str | None = None
    rope_factor: float | None = None
    checkpoint_layers: bool = False
    save_attention: bool = False  # with checkpoint_layers: keep attention's out and lse, so recompute skips the ring
    offload_activations: bool = False  # with checkpoint_layers: layer checkpoints in pinned host memory
    offload_params: bool = False  # the model state (FSDP2's shards, gradients, AdamW moments) in host memory
    ffn_tile: int | None = None  # tokens per feed-forward tile (None: chosen from the model's widths; 0: untiled)
    lora: int | None = None  # finetune: LoRA rank (None: full fine-tuning)
    lora_alpha: int | None = None  # LoRA's alpha (None: the rank, a scale of 1)
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    compile: bool = False
    dtype: str | None = None
    # data
    data: str = "retrieval"
    text: list[str] | None = None
    fmt: str = "compact"
    id_digits: int | None = None
    id_chars: str | None = None
    value_digits: int | None = None
    questions: int = 1
    id_pool: int | None = None
    loss_on: str = "answer"
    seq_len: int = 512  # with a schedule: its longest stage
    seq_schedule: list[list[int]] | None = None  # finetune's --seq-len LEN:STEPS,...: [[length, steps], ...]
    batch: int = 8
    # optimisation
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # output
    out: str = "runs/train"
    ckpt_every: int = 100
    keep: int = 2
    resume: bool = False
    stop_after: int | None = None
    eval_lengths: list[int] | None = None
    eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_per_cell: int = 8
    eval_decoys: int = 0
    eval_fraction: float = 0.1  # finetune: the held-out share of the packed sequences
    eval_sequences: int | None = None  # finetune: held-out sequences evaluated (None: up to EVAL_SEQUENCES)
    eval_bucket: int = 1024  # finetune: tokens per position bucket
    no_plots: bool = False

    @classmethod
    def from_args(cls, ns) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(ns).items() if k in names}
        if isinstance(given.get("seq_len"), list):  # --seq-len LEN:STEPS,...: the longest stage is the length
            given["seq_schedule"] = given["seq_len"]
            given["seq_len"] = max(length for length, _ in given["seq_len"])
        if "steps" in given and given["steps"] is None:  # finetune's --steps, not given: the schedule's, or 100
            schedule = given.get("seq_schedule")
            given["steps"] = sum(n for _, n in schedule) if schedule else FINETUNE_DEFAULTS["steps"]
        return cls(**given)

    def stage_at(self, step: int) -> tuple[int, int, int]:
        """(stage index, its sequence length, its first step) at `step`: (0, seq_len, 0) without a schedule;
        past the schedule's end, its last stage."""
        if not self.seq_schedule:
            return 0, self.seq_len, 0
        first = 0
        for i, (length, steps) in enumerate(self.seq_schedule):
            if step < first + steps or i == len(self.seq_schedule) - 1:
                return i, length, first
            first += steps
        raise AssertionError("unreachable")

    def seq_lengths(self) -> list[int]:
        """Every sequence length the run trains at (one without a schedule)."""
        return [length for length, _ in self.seq_schedule] if self.seq_schedule else [self.seq_len]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def world_size(self) -> int:
        """Ranks of the job: torchrun's WORLD_SIZE when it launched us, else --world."""
        return int(os.environ.get("WORLD_SIZE", self.world))

    @property
    def local_ranks(self) -> int:
        """Ranks on this node: torchrun's LOCAL_WORLD_SIZE when it launched us, else --world."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world))

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """--dtype, defaulting to bf16 on CUDA and fp32 on CPU."""
        return DTYPES[self.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    def task_kwargs(self) -> dict:
        """The retrieval task's arguments shared by training and evaluation."""
        return dict(
            fmt=self.fmt,
            id_digits=self.id_digits,
            value_digits=self.value_digits,
            id_chars=self.id_chars,
            id_pool=self.id_pool,
        )

    def eval_lengths_for(self, cp: int) -> list[int]:
        """Evaluation context lengths, rounded down to whole shard units of a ring of cp
        (each ring shard cut into --ulysses pieces)."""
        unit = split_unit(self.layout, cp, self.ulysses)
        lengths = self.eval_lengths or [self.seq_len // 2, self.seq_len]
        return sorted({max(unit, L - L % unit) for L in lengths})


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`ringwise train`: ringwise's own model (a preset) on the retrieval task or text."""
    d = TrainConfig()
    _process_flags(p, d)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=tuple(PRESETS))
    _memory_flags(p, "recompute each layer in backward")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each transformer block (fullgraph; ring attention is one operator in it); "
        "the validated first step and evaluation run eager",
    )
    _dtype_flag(g)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, choices=("retrieval", "text"))
    g.add_argument("--text", nargs="+", default=None, help="text files or folders (with --data text)")
    g.add_argument("--fmt", default=d.fmt, choices=tuple(RETRIEVAL_FORMATS), help="retrieval line format")
    g.add_argument("--id-digits", type=int, default=None)
    g.add_argument("--id-chars", default=None, help="single-character ids drawn from these characters")
    g.add_argument("--value-digits", type=int, default=None)
    g.add_argument(
        "--questions",
        type=int,
        default=d.questions,
        help="retrieval questions per training sequence (evaluation always asks one)",
    )
    g.add_argument(
        "--id-pool",
        type=int,
        default=None,
        help="haystack ids recur, drawn from this many ids (training and evaluation)",
    )
    g.add_argument(
        "--loss-on",
        default=d.loss_on,
        choices=("answer", "recall", "all"),
        help="training targets: answers only; also every recurring line's value; every token",
    )
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="global tokens per sequence")
    g.add_argument("--batch", type=int, default=d.batch, help="global sequences per step")
    _optimisation_flags(p, d)
    g = _output_flags(p, d)
    g.add_argument("--eval-lengths", type=int, nargs="*", default=None, help="retrieval eval context lengths")
    g.add_argument("--eval-depths", type=float, nargs="*", default=d.eval_depths)
    g.add_argument("--eval-per-cell", type=int, default=d.eval_per_cell)
    g.add_argument(
        "--eval-decoys",
        type=int,
        default=d.eval_decoys,
        help="with --id-pool: other ids that occur once in each evaluation document, so the "
        "needle is not the only line seen once",
    )


EVAL_SEQUENCES = 8  # finetune's --eval-sequences when not given (fewer where the held-out share holds fewer)
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    data="documents",
    seq_len=1024,
    batch=1,
    steps=100,
    lr=2e-5,
    warmup=10,
    weight_decay=0.1,
    ckpt_every=50,
    out="runs/finetune",
    eval_per_cell=2,
)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """`ringwise finetune`: a pretrained transformers model, the same job as train."""
    d = TrainConfig(**FINETUNE_DEFAULTS)
    _process_flags(p, d)
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        dest="pretrained",
        required=True,
        metavar="PATH",
        help="a local transformers checkpoint folder (config.json, *.safetensors, tokenizer)",
    )
    _dtype_flag(g)
    g.add_argument("--rope-theta", type=float, default=None, help="a new RoPE base (context extension)")
    g.add_argument(
        "--rope-scaling",
        default=None,
        choices=("linear", "yarn", "llama3"),
        help="a static RoPE scaling, written into the model's config (needs --rope-factor)",
    )
    g.add_argument("--rope-factor", type=float, default=None, help="the scaling's factor (> 1)")
    _memory_flags(p, "transformers' gradient checkpointing: recompute each layer in backward")
    g = p.add_argument_group("LoRA (through peft: the base weights frozen, only the adapters trained)")
    g.add_argument(
        "--lora",
        type=int,
        default=None,
        metavar="R",
        help="train rank-R LoRA adapters on --lora-targets instead of every weight (default: full fine-tuning)",
    )
    g.add_argument(
        "--lora-alpha",
        type=int,
        default=None,
        help="LoRA's alpha: the adapters' update is scaled by alpha / R (default: R)",
    )
    g.add_argument(
        "--lora-targets",
        nargs="+",
        default=list(LORA_TARGETS),
        metavar="NAME",
        help="the linear modules that get adapters, by their own name (the last part of the module's path, as "
        "q_proj in model.layers.0.self_attn.q_proj; peft's target_modules)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--text",
        nargs="+",
        required=True,
        metavar="FILE",
        help='text files, folders and .jsonl files (a "text" field per line); one document each, '
        "tokenized with the model's tokenizer (cached in $RINGWISE_CACHE/tokens, default "
        "~/.cache/ringwise/tokens; never beside your data)",
    )
    g.add_argument(
        "--seq-len",
        type=seq_len_or_schedule,
        default=d.seq_len,
        metavar="SEQ_LEN",
        help="global tokens per sequence (documents packed), or a schedule of stages LEN:STEPS,LEN:STEPS,... "
        "(progressive training: e.g. 4096:200,16384:100 trains 200 steps at 4096 tokens, then 100 at 16384; "
        "the model's RoPE and max_position_embeddings are set for the longest stage, evaluation runs at it)",
    )
    g.add_argument("--batch", type=int, default=d.batch, help="global sequences per step")
    _optimisation_flags(
        p,
        d,
        steps_help=f"(default: {d.steps}) optimizer steps; with a --seq-len schedule: "
        "its stages' steps summed (give both only if they agree)",
    )
    g = _output_flags(p, d)
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction, help="held-out share of the sequences")
    g.add_argument(
        "--eval-sequences",
        type=int,
        default=d.eval_sequences,
        help=f"held-out sequences for perplexity by position, before and after training (default: "
        f"{EVAL_SEQUENCES}, or every held-out sequence where there are fewer; more than there are "
        "is refused)",
    )
    g.add_argument("--eval-bucket", type=int, default=d.eval_bucket, help="tokens per position bucket")
    g.add_argument(
        "--eval-lengths",
        type=int,
        nargs="*",
        default=None,
        help="passkey retrieval context lengths (default: half and all of --seq-len)",
    )
    g.add_argument("--eval-depths", type=float, nargs="*", default=d.eval_depths, help="passkey depths in [0, 1]")
    g.add_argument("--eval-per-cell", type=int, default=d.eval_per_cell, help="passkey documents per cell")
    p.set_defaults(data=FINETUNE_DEFAULTS["data"])  # no flag of its own: the other defaults are the flags' (d)


def _process_flags(p, d) -> None:
    g = p.add_argument_group("processes")
    g.add_argument("--world", type=int, default=d.world, help="local processes to start (ignored under torchrun)")
    g.add_argument(
        "--dp", type=int, default=d.dp, help="data-parallel replicas; ring (cp) size = world / (dp x ulysses)"
    )
    g.add_argument(
        "--ulysses",
        type=int,
        default=d.ulysses,
        help="Ulysses degree U: groups of U consecutive ranks trade sequence for heads with an "
        "all-to-all around the ring (USP); U must divide the model's heads",
    )
    g.add_argument("--layout", default=d.layout, choices=LAYOUTS)
    g.add_argument(
        "--device",
        default=d.device,
        choices=("auto", "cpu", "cuda"),
        help="default: cuda where torch sees a GPU (each rank binds GPU LOCAL_RANK), else cpu",
    )
    g.add_argument(
        "--backend",
        default=None,
        choices=("gloo", "nccl"),
        help="default: nccl when every rank has a GPU of its own, else gloo (ranks that share a GPU "
        "stage their ring hops through host memory: for testing, not speed)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    g.add_argument(
        "--timeout",
        type=float,
        default=d.timeout,
        help="seconds a rank may wait on another before the job ends, naming the silent rank",
    )


def _memory_flags(p, checkpoint_help: str) -> None:
    """What a rank keeps on its device between forward and backward (docs/memory.md)."""
    g = p.add_argument_group("memory")
    g.add_argument("--checkpoint-layers", action="store_true", help=checkpoint_help)
    g.add_argument(
        "--save-attention",
        action="store_true",
        help="with --checkpoint-layers: keep each layer's attention output and log-sum-exp, so that "
        "recomputing a layer in backward never runs its ring again (more memory, less time)",
    )
    g.add_argument(
        "--offload-activations",
        action="store_true",
        help="with --checkpoint-layers: move the layer checkpoints to pinned host memory in forward and "
        "bring each back one layer ahead in backward (side-stream copies; saves GPU memory only)",
    )
    g.add_argument(
        "--offload-params",
        action="store_true",
        help="keep the model state in host memory (FSDP2's CPUOffloadPolicy): each rank's shards of the "
        "float32 weights, their gradients and the AdamW moments; each FSDP unit's weights are copied to the "
        "device for its forward and backward, and the optimizer step runs on the CPU (slower steps; saves "
        "GPU memory only)",
    )
    g.add_argument(
        "--ffn-tile",
        type=int,
        default=None,
        metavar="TOKENS",
        help="run each feed-forward (MLP or MoE block) over tiles of this many local tokens, each "
        "recomputed in backward (default: chosen from the model's widths; 0: one untiled call)",
    )


def _dtype_flag(g) -> None:
    g.add_argument(
        "--dtype",
        default=None,
        choices=TRAIN_DTYPES,
        help="compute dtype (master weights, optimizer state, loss and lse stay fp32); "
        "default bf16 on CUDA, fp32 on CPU",
    )


def _optimisation_flags(p, d, steps_help: str | None = None) -> None:
    g = p.add_argument_group("optimisation (AdamW, linear warm-up then cosine decay to 10%)")
    if steps_help is None:
        g.add_argument("--steps", type=int, default=d.steps)
    else:  # finetune: None until resolved (TrainConfig.from_args), the help saying what it resolves to
        g.add_argument("--steps", type=int, default=None, help=steps_help)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--seed", type=int, default=d.seed)


def _output_flags(p, d):
    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, help="folder for checkpoints, metrics, plots (one job at a time)")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=None, help="stop (as if interrupted) after this step")
    g.add_argument("--no-plots", action="store_true")
    return g


def _positive(cfg, names) -> list[str]:
    return [
        f"--{n.replace('_', '-')} {getattr(cfg, n)}: must be a positive integer"
        for n in names
        if getattr(cfg, n) is not None and getattr(cfg, n) < 1
    ]


def _finite(cfg, names, positive=False) -> list[str]:
    bad = []
    for n in names:
        v = getattr(cfg, n)
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            bad.append(f"--{n.replace('_', '-')} {v}: must be a finite number {'> 0' if positive else '>= 0'}")
    return bad


def problems(cfg: TrainConfig) -> list[str]:
    """Every problem of `cfg`, one line each (empty: the run can start)."""
    out = _positive(
        cfg, ("steps", "batch", "ckpt_every", "keep", "dp", "ulysses", "threads", "stop_after", "eval_per_cell")
    )
    world = cfg.world_size
    if world < 1:
        out.append(f"--world {world}: must be a positive integer")
    out += _finite(cfg, ("lr", "timeout"), positive=True) + _finite(cfg, ("weight_decay", "grad_clip"))
    out += _memory_problems(cfg)
    if cfg.warmup < 0:
        out.append(f"--warmup {cfg.warmup}: must be >= 0")
    if cfg.dp >= 1 and cfg.ulysses >= 1 and world >= 1:
        cp = world // (cfg.dp * cfg.ulysses)
        if world % (cfg.dp * cfg.ulysses):
            what = f"--dp {cfg.dp}" + (f" x --ulysses {cfg.ulysses}" if cfg.ulysses > 1 else "")
            out.append(f"{what} must divide the world size {world}")
        else:
            unit = split_unit(cfg.layout, cp, cfg.ulysses)
            for length in cfg.seq_lengths():
                if length < 1 or length % unit:
                    stage = next((f" (the stage {n}:{k})" for n, k in cfg.seq_schedule or () if n == length), "")
                    out.append(
                        f"--seq-len {length}{stage} must be a positive multiple of {unit} for layout {cfg.layout!r} "
                        f"on a ring of {cp}" + (f" x ulysses {cfg.ulysses}" if cfg.ulysses > 1 else "")
                    )
    if cfg.seq_schedule and cfg.steps != sum(n for _, n in cfg.seq_schedule):
        out.append(
            f"--steps {cfg.steps} and --seq-len {schedule_text(cfg.seq_schedule)} disagree: the schedule trains "
            f"{sum(n for _, n in cfg.seq_schedule)} steps; give --steps only if it is their sum"
        )
    finetune = bool(cfg.pretrained) or cfg.data == "documents"  # (without --model: the parser said so)
    if cfg.ulysses > 1 and cfg.model in PRESETS and not finetune:
        heads = model_config(cfg.model).n_heads
        if heads % cfg.ulysses:
            out.append(
                f"--ulysses {cfg.ulysses} must divide the {heads} attention heads of --model {cfg.model} "
                f"(valid: {', '.join(str(u) for u in range(1, heads + 1) if heads % u == 0)})"
            )
    if cfg.dp >= 1 and cfg.batch >= 1 and cfg.batch % cfg.dp:
        out.append(f"--batch {cfg.batch} must be divisible by --dp {cfg.dp} (each replica takes batch / dp)")
    if world >= 1:
        try:  # the ranks make the same decision from the same facts (mesh.placement)
            placement(cfg.device, cfg.backend, cfg.local_ranks)
        except ValueError as e:
            out.append(str(e))
    out += _output_problems(cfg) + (_pretrained_problems(cfg) if finetune else _data_problems(cfg))
    return out


def _memory_problems(cfg) -> list[str]:
    out = [
        f"--{flag} needs --checkpoint-layers (it changes what a checkpointed layer keeps)"
        for flag, on in (("save-attention", cfg.save_attention), ("offload-activations", cfg.offload_activations))
        if on and not cfg.checkpoint_layers
    ]
    if cfg.ffn_tile is not None and cfg.ffn_tile < 0:
        out.append(f"--ffn-tile {cfg.ffn_tile}: must be a positive number of tokens, or 0 (untiled)")
    return out


def _ffn_tile_problems(cfg, config) -> list[str]:
    """--ffn-tile on (its default): every decoder layer's feed-forward must be a module the integration can
    tile (OPT's is inline in its layer); read from the model's structure, built on the meta device."""
    if cfg.ffn_tile == 0:
        return []
    from accelerate import init_empty_weights

    from ..integrations.hf_tiling import feed_forward_modules
    from .pretrained import auto_model_class

    with init_empty_weights():
        model = auto_model_class(config).from_config(config)
    try:
        feed_forward_modules(model)
    except ValueError as e:
        return [f"--ffn-tile: {e}"]
    return []


def _lora_value_problems(cfg) -> list[str]:
    """--lora R, --lora-alpha, --lora-targets: their values (the targets against the model: below)."""
    out = []
    if cfg.lora is None:
        return ["--lora-alpha needs --lora R (LoRA's rank)"] if cfg.lora_alpha is not None else []
    if cfg.lora < 1:
        out.append(f"--lora {cfg.lora}: LoRA's rank must be a positive integer")
    if cfg.lora_alpha is not None and cfg.lora_alpha < 1:
        out.append(f"--lora-alpha {cfg.lora_alpha}: must be a positive integer")
    if not cfg.lora_targets:
        out.append("--lora-targets: give at least one module name")
    return out


def _lora_target_problems(cfg, config) -> list[str]:
    """With --lora: each --lora-targets name must name linear modules of the model (read from its structure on
    the meta device), so that no target is silently left out; the model's own linear names are listed."""
    if cfg.lora is None or not cfg.lora_targets:
        return []
    from accelerate import init_empty_weights

    from .pretrained import auto_model_class

    with init_empty_weights():
        model = auto_model_class(config).from_config(config)
    out = model.get_output_embeddings()
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out}
    unknown = [t for t in cfg.lora_targets if t not in linear]
    if unknown:
        return [
            f"--lora-targets {' '.join(unknown)}: no linear module of --model {cfg.pretrained} has that name "
            f"(its linear modules, the output projection aside: {', '.join(sorted(linear))})"
        ]
    return []


def _pretrained_problems(cfg) -> list[str]:
    """ringwise finetune's model, RoPE change and text, checked (and the text tokenized into its cache)
    before any rank starts."""
    import importlib.util

    missing = [m for m in ("transformers", "accelerate", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        return [f"--model needs {', '.join(missing)}: pip install 'ringwise[hf]'"]
    if cfg.lora is not None and importlib.util.find_spec("peft") is None:
        return ["--lora needs peft: pip install 'ringwise[trainer]' (or pip install peft)"]
    from .pretrained import checkpoint_problems, documents, extended_config  # documents: --text into its cache

    if not cfg.pretrained:  # finetune without --model: the parser reported it
        return []
    model = checkpoint_problems(cfg.pretrained)
    out = list(model)
    if cfg.compile:
        out.append("--compile is not supported with --model checkpoints yet")
    rope = []
    if (cfg.rope_scaling is None) != (cfg.rope_factor is None):
        rope.append("--rope-scaling and --rope-factor go together (e.g. --rope-scaling yarn --rope-factor 4)")
    if cfg.rope_factor is not None and not (math.isfinite(cfg.rope_factor) and cfg.rope_factor > 1):
        rope.append(f"--rope-factor {cfg.rope_factor}: must be a finite number > 1")
    if cfg.rope_theta is not None and not (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
        rope.append(f"--rope-theta {cfg.rope_theta}: must be a finite number > 0")
    out += rope
    if not 0 < cfg.eval_fraction < 1:
        out.append(f"--eval-fraction {cfg.eval_fraction}: must lie strictly between 0 and 1")
    out += _positive(cfg, ("eval_sequences", "eval_bucket"))
    out += _lora_value_problems(cfg)
    if model:  # nothing more can be read from the model
        return out
    vlm = _vlm_flag_problems(cfg)
    if vlm is not None:  # a vision-language model: what is not tested with it, refused
        out += vlm
    if not rope:  # the model's config with the RoPE change: does the integration run it, what heads
        try:
            config = extended_config(cfg.pretrained, cfg.seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)
            import ringwise.integrations.transformers as rw

            rw.check_model(config)
        except (ValueError, OSError, KeyError) as e:
            out.append(f"--model {cfg.pretrained}: {e}")
        else:
            out += _ffn_tile_problems(cfg, config)
            out += _lora_target_problems(cfg, config)
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            heads = text.num_attention_heads
            if cfg.ulysses > 1 and heads % cfg.ulysses:
                out.append(
                    f"--ulysses {cfg.ulysses} must divide the model's {heads} attention heads "
                    f"(valid: {', '.join(str(u) for u in range(1, heads + 1) if heads % u == 0)})"
                )
    if cfg.seq_len >= 1 and cfg.text:
        try:
            data = documents(cfg)
        except (OSError, ValueError) as e:
            said = any(str(e).removeprefix(f"--model {cfg.pretrained}: ") in o for o in out)  # a VLM refusal above
            return out + ([] if said else [f"--text: {e}"])
        if vlm is None:  # a vision-language run evaluates its held-out examples' loss, no passkey
            out += _passkey_problems(cfg, data.tokenizer)
        held, total = len(data.held_out), len(data.train) + len(data.held_out)
        if cfg.eval_sequences is not None and cfg.eval_sequences > held:
            out.append(
                f"--eval-sequences {cfg.eval_sequences}: the held-out share holds {held} "
                f"sequence{'s' * (held != 1)} (--eval-fraction {cfg.eval_fraction} of the {total} sequences "
                f"of --seq-len {cfg.seq_len} in --text); give at most {held}, or raise --eval-fraction"
            )
    return out


def _vlm_flag_problems(cfg) -> list[str] | None:
    """None for a text model; for a vision-language one, its refusals: a family finetune has not been tested on,
    and the flags not tested with image-text examples."""
    from transformers import AutoConfig

    from .pretrained import is_vlm, vlm_problems

    try:
        config = AutoConfig.from_pretrained(cfg.pretrained)
    except (ValueError, OSError, KeyError):
        return None  # the config check below reports it
    if not is_vlm(config):
        return None
    out = [f"--model {cfg.pretrained}: {p}" for p in vlm_problems(config)]
    untested = dict(
        lora=cfg.lora is not None,
        **{"seq-len LEN:STEPS,...": bool(cfg.seq_schedule)},
        ulysses=cfg.ulysses > 1,
        dp=cfg.dp > 1,
        **{"checkpoint-layers": cfg.checkpoint_layers, "offload-params": cfg.offload_params},
    )
    out += [
        f"--{flag} is not supported with a vision-language --model yet (image-text fine-tuning is tested without it)"
        for flag, on in untested.items()
        if on
    ]
    return out


def _passkey_problems(cfg, tokenizer) -> list[str]:
    from .passkey import passkey_document

    if any(not 0.0 <= d <= 1.0 for d in cfg.eval_depths):
        return [f"--eval-depths {cfg.eval_depths}: depths must lie in [0, 1]"]
    world = cfg.world_size
    if world < 1 or cfg.dp < 1 or cfg.ulysses < 1 or world % (cfg.dp * cfg.ulysses):
        return []
    for L in cfg.eval_lengths_for(world // (cfg.dp * cfg.ulysses)):
        try:
            passkey_document(tokenizer, L, 0.5, "12345")
        except ValueError as e:
            return [f"--eval-lengths: {e}"]
    return []


def _output_problems(cfg) -> list[str]:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        return [f"--out {out}: is a file; give a folder (created if missing)"]
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        return [f"--out {out}: {parent} is not writable"]
    return []


def _data_problems(cfg) -> list[str]:
    if cfg.seq_len < 1:
        return []
    if cfg.data == "text":
        if not cfg.text:
            return ["--data text needs --text FILE_OR_FOLDER [...]"]
        try:
            text_files(cfg.text)
        except (OSError, ValueError) as e:
            return [f"--text: {e}"]
        return []
    bad = []
    try:
        RetrievalDataset(cfg.seq_len, seed=cfg.seed, questions=cfg.questions, loss_on=cfg.loss_on, **cfg.task_kwargs())
    except ValueError as e:
        bad.append(f"retrieval task: {e}")
    if any(not 0.0 <= d <= 1.0 for d in cfg.eval_depths):
        bad.append(f"--eval-depths {cfg.eval_depths}: depths must lie in [0, 1]")
    world = cfg.world_size
    if world >= 1 and cfg.dp >= 1 and cfg.ulysses >= 1 and not world % (cfg.dp * cfg.ulysses):
        for L in cfg.eval_lengths_for(world // (cfg.dp * cfg.ulysses)):
            try:
                RetrievalDataset(L, depth=0.5, decoys=cfg.eval_decoys, **cfg.task_kwargs())
            except ValueError as e:
                bad.append(f"evaluation at {L} tokens: {e}")
                break
    return bad


def check(cfg: TrainConfig, more: Sequence[str] = ()) -> None:
    """Raise ConfigError listing every problem of `cfg` (and `more`) at once."""
    found = problems(cfg) + list(more)
    if found:
        raise ConfigError(f"{len(found)} problem{'s' * (len(found) > 1)} with the flags:\n  " + "\n  ".join(found))
