"""The planner's per-token bytes (`ringwise plan --model config.json`) against measurement.

Two ways, one rank:

* Resident set (the default): runs `ringwise finetune --checkpoint-layers` at two sequence lengths on one
  CPU rank (float32), reads each run's peak resident memory (metrics.jsonl's peak_rss_mib: VmHWM, with
  glibc's mmap threshold low so that freed tensors leave the resident set) and divides the difference by
  the difference in tokens: the bytes one more token costs, model state and every constant cancelled.
* In process (--census on CPU, --device cuda on a GPU): one `ringwise finetune` training step
  (ringwise.train.loop.step) per length in this process, after a warm-up step that made the optimizer
  state. On CPU the step runs under torch's profiler with allocations recorded: its peak is the running
  total of the bytes allocated during the step, and the census lists the tensors live at that peak, by the
  backward node, module and op that allocated them, per token (their growth between the two lengths). On
  CUDA the peak is the caching allocator's max_memory_allocated (the model state on the device included).

The planner's figure is its ledger's (device_type "cpu" or "cuda") for the same config, dtype, flags and
one rank: the slope of its peak between the same lengths, and in process its peak too.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/plan_ledger.py --model models/smollm2-135m \
        --text README.md BENCHMARKS.md docs
    python benchmarks/plan_ledger.py --make-wide models/wide-mlp   # the wide-MLP model, random weights
    python benchmarks/plan_ledger.py --model models/wide-mlp --text README.md BENCHMARKS.md docs --ffn-tile 0
    python benchmarks/plan_ledger.py --census --model models/wide-mlp
    python benchmarks/plan_ledger.py --device cuda --dtype bf16 --model llama-3.1-8b --layers 4 \
        --lengths 32768 65536 --offload-activations --offload-params   # a planner preset, random weights

Any further finetune flag is passed on (--ffn-tile, --save-attention, --offload-activations, --offload-params).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ringwise import plan

WIDE = dict(hidden_size=512, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)


def make_wide(folder: Path) -> Path:
    """A random Llama with a wide MLP (hidden 512, intermediate 8192, 4 layers) and a byte-level
    tokenizer (one token per byte), saved as a transformers folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, **WIDE
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_mib(model: str, text: list[str], seq_len: int, extra: list[str], out: Path) -> float:
    """The run's peak resident MiB (the largest peak_rss_mib of its steps)."""
    cmd = [
        sys.executable, "-m", "ringwise.cli", "finetune", "--model", model, "--text", *text,
        "--world", "1", "--device", "cpu", "--dtype", "fp32", "--checkpoint-layers", "--seq-len", str(seq_len),
        "--steps", "2", "--warmup", "1", "--ckpt-every", "100", "--no-plots", "--eval-sequences", "1",
        "--eval-bucket", str(seq_len), "--eval-lengths", "256", "--eval-depths", "0.5", "--eval-per-cell", "1",
        "--out", str(out), *extra,
    ]  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r["peak_rss_mib"] for r in records if "peak_rss_mib" in r)


def memory_flags(extra: list[str]) -> argparse.Namespace:
    """finetune's memory flags among the extra arguments."""
    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--save-attention", "--offload-activations", "--offload-params"):
        p.add_argument(flag, action="store_true")
    p.add_argument("--ffn-tile", type=int, default=None)
    return p.parse_known_args(extra)[0]


def planned(config: plan.ModelConfig, extra: list[str], dtype="fp32", device_type="cpu") -> plan.Ledger:
    """The planner's ledger for this config on one rank, with the run's memory flags."""
    f = memory_flags(extra)
    modes = plan.MemoryModes(True, f.save_attention, f.offload_activations, f.ffn_tile, f.offload_params)
    return plan.ledger(config, 1, dtype, modes, device_type)


def config_folder(model: str, layers: int | None, folder: Path) -> str:
    """`model` as a folder with a config.json: a checkpoint folder as it is, or a planner preset written out
    (with `layers` decoder layers), whose weights the in-process run makes up."""
    if Path(model).is_dir() and layers is None:
        return model
    if Path(model).is_dir():
        cfg = json.loads((Path(model) / "config.json").read_text())
    else:
        title, cfg = plan.CONFIG_PRESETS[model]
        cfg = dict(cfg, architectures=["LlamaForCausalLM"], rope_theta=500000.0, max_position_embeddings=2**20)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def _join_one_rank_group(device: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from ringwise.train.mesh import init_distributed

    init_distributed(device, None, 600.0)


def _random_weights(hf, path) -> None:
    """Instead of reading a checkpoint: each rank's shards filled in place (normal(0, 0.02); norms 1)."""
    import torch

    with torch.no_grad():
        for name, p in hf.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02)


def _label(stack: list[str]) -> str:
    """Where an allocation happened: the backward node being evaluated (or forward), the module, the op."""
    nodes = [s.split(": ")[-1] for s in stack if s.startswith("autograd::engine::evaluate_function")]
    modules = [s[4:].replace("hf.model.", "") for s in stack if s.startswith("mod:")]
    ops = [s for s in stack if not s.startswith(("autograd::engine", "mod:", "ProfilerStep"))]
    return f"{nodes[-1] if nodes else 'forward'} | {modules[-1] if modules else '-'} | {' > '.join(ops[-2:])}"


def _profiled_peak(work, device: str) -> tuple[int, dict, str]:
    """work() under torch's profiler with `device`'s allocations recorded: (the peak of allocated bytes: on CPU
    those allocated during work() and not yet freed, on CUDA the allocator's whole total; {label: bytes} of
    the allocations made during work() and live at the peak; the label of the allocation that made it)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    allocations = []

    def walk(event, stack):
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields, stack))
        for child in event.children:
            walk(child, stack + [event.name])

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, [])
    live: dict[int, tuple[int, list[str]]] = {}
    total, peak, at_peak, where = 0, -1, {}, ""
    for _, fields, stack in sorted(allocations, key=lambda a: a[0]):
        if str(fields.device).split(":")[0] != device:
            continue
        if fields.alloc_size > 0:
            live[fields.ptr] = (fields.alloc_size, stack)
            total += fields.alloc_size
            if device == "cuda":
                total = fields.total_allocated
            if total > peak:
                peak, at_peak, where = total, dict(live), _label(stack)
        elif fields.ptr in live:
            total -= live.pop(fields.ptr)[0]
        elif device == "cuda":
            total = fields.total_allocated
    groups: dict[str, int] = collections.Counter()
    for size, stack in at_peak.values():
        groups[_label(stack)] += size
    return peak, dict(groups), where


def in_process(
    folder: str, lengths: list[int], device: str, dtype: str, extra: list[str], random: bool, census: bool
) -> list:
    """One rank's `ringwise finetune` step at each length, in this process: [(peak bytes, census, where)]."""
    from typing import Any, cast

    import torch

    import ringwise.train.pretrained as pretrained
    from ringwise.train.config import FINETUNE_DEFAULTS, TrainConfig
    from ringwise.train.loop import Run, step

    _join_one_rank_group(device)
    from ringwise.train.mesh import make_mesh

    if random:
        pretrained.load_weights = _random_weights  # the shards are made up, not read
    f = memory_flags(extra)
    base = dict(FINETUNE_DEFAULTS, pretrained=folder, seq_len=max(lengths), dtype=dtype, device=device, warmup=1)
    cfg = TrainConfig(
        **base,
        checkpoint_layers=True,
        save_attention=f.save_attention,
        offload_activations=f.offload_activations,
        offload_params=f.offload_params,
        ffn_tile=f.ffn_tile,
    )
    mesh = make_mesh(1, torch.device(device, 0) if device == "cuda" else torch.device(device), 600.0)
    model = pretrained.build_pretrained(cfg, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    run = Run(cfg, mesh, cast(Any, None), model, optimizer)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    names = {m: n for n, m in model.named_modules()}
    opened: list = []

    def enter(module, args):
        opened.append(torch.autograd.profiler.record_function("mod:" + names.get(module, type(module).__name__)))
        opened[-1].__enter__()

    def leave(module, args, output):
        opened.pop().__exit__(None, None, None)

    class Tokens:
        def __init__(self, length: int):
            ids = torch.randint(0, vocab, (length + 1,), generator=torch.Generator().manual_seed(1))
            self.train_data = [dict(input_ids=ids[:-1], labels=ids[1:], cu_seqlens=[0, length])]

    results = []
    for i, length in enumerate([64] + list(lengths)):
        run.cfg, run.task = cfg.replace(seq_len=length), cast(Any, Tokens(length))
        if i == 0:  # the warm-up: the optimizer state exists from here on
            step(run, 0)
            continue
        if device == "cuda":
            print(f"{length:,} tokens: {torch.cuda.memory_allocated() / 2**20:,.1f} MiB allocated before the step")
        if device == "cuda" and not census:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(run, i)
            torch.cuda.synchronize()
            results.append((torch.cuda.max_memory_allocated(), {}, "cuda max_memory_allocated"))
        else:
            hooks = [
                torch.nn.modules.module.register_module_forward_pre_hook(enter),
                torch.nn.modules.module.register_module_forward_hook(leave),
            ]
            try:
                results.append(_profiled_peak(lambda: step(run, i), device))  # noqa: B023
            finally:
                for h in hooks:
                    h.remove()
        print(f"{length:,} tokens: peak {results[-1][0] / 2**20:,.1f} MiB ({results[-1][2]})", flush=True)
        if census and device == "cuda":  # the step's own allocations live at the peak, the largest first
            for label, size in sorted(results[-1][1].items(), key=lambda kv: -kv[1])[:25]:
                print(f"  {size / 2**20:>10,.1f} MiB  {label}", flush=True)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a transformers checkpoint folder (in process: or a planner preset)")
    p.add_argument("--text", nargs="+", default=["README.md", "BENCHMARKS.md", "docs"])
    p.add_argument("--lengths", nargs=2, type=int, default=[2048, 4096])
    p.add_argument("--make-wide", metavar="FOLDER", help="save the wide-MLP model there and stop")
    p.add_argument("--census", action="store_true", help="in process: the live tensors at each step's peak")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: in process on the GPU")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="in process: the compute dtype")
    p.add_argument("--layers", type=int, default=None, help="in process: this many decoder layers, random weights")
    args, extra = p.parse_known_args(argv)
    if args.make_wide:
        print(make_wide(Path(args.make_wide)))
        return
    if not args.model:
        p.error("--model (or --make-wide) is required")
    short, long = args.lengths
    summary: dict = dict(model=args.model, flags=extra, lengths=[short, long])
    with tempfile.TemporaryDirectory() as tmp:
        if args.census or args.device == "cuda":
            folder = config_folder(args.model, args.layers, Path(tmp) / "config")
            random = folder != args.model or not any(Path(folder).glob("*.safetensors"))
            results = in_process(folder, [short, long], args.device, args.dtype, extra, random, args.census)
            config = plan.read_config(folder)
            peaks = [r[0] for r in results]
            summary.update(dtype=args.dtype, device=args.device, layers=config.n_layers, random_weights=random)
            summary["peak_mib"] = [round(x / 2**20, 1) for x in peaks]
            slope = (peaks[1] - peaks[0]) / (long - short)
        else:
            config = plan.read_config(args.model)
            peaks = [peak_mib(args.model, args.text, n, extra, Path(tmp) / str(n)) * 2**20 for n in (short, long)]
            summary["peak_rss_mib"] = [round(x / 2**20, 1) for x in peaks]
            slope = (peaks[1] - peaks[0]) / (long - short)
    print(f"peak {peaks[0] / 2**20:.1f} MiB at {short}, {peaks[1] / 2**20:.1f} MiB at {long}: {slope:,.0f} B/token")
    led = planned(config, extra, args.dtype, "cuda" if args.device == "cuda" else "cpu")
    per_token = led.slope(short, long)
    summary.update(
        measured_bytes_per_token=round(slope),
        planned_bytes_per_token=round(per_token),
        planned_over_measured=round(per_token / slope, 3),
        planned_peak_phase=[led.peak(short)[1], led.peak(long)[1]],
        planned_phases_per_token={p: round(led.bytes_per_token(p)) for p in led.phases_per_token},
    )
    if args.device == "cuda":  # the whole peak is comparable too: everything on the device is allocated there
        summary["planned_peak_mib"] = [round(led.peak(n)[0] / 2**20, 1) for n in (short, long)]
    if args.census:
        census = {k: (results[1][1].get(k, 0) - results[0][1].get(k, 0)) / (long - short) for k in results[1][1]}
        print("live at the peak, bytes per token (their growth between the lengths), by where they were allocated:")
        for k, v in sorted(census.items(), key=lambda kv: -kv[1]):
            if v >= 1:
                print(f"  {v:>10,.0f}  {k}")
        at = led.peak(long)[1]
        print(f"the ledger's {at} moment, bytes per token:")
        for name, v in led.phases_per_token[at].items():
            print(f"  {v:>10,.0f}  {name}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
