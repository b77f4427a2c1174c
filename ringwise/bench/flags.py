"""Every benchmark suite's `ringwise bench` flags, in one torch-free module.

The suites share one namespace (a few flags, --device, --threads, --repeats, --heads, --head-dim,
--gpu-dtype, are read by several suites: `shared_flags`), so the CLI builds them all, the suite
first and then a group per suite, without importing a single suite: `ringwise bench X` then
imports suite X alone. Each suite module keeps its own flags under its `add_arguments`.
"""

from __future__ import annotations

GPU_DTYPES = ("bf16", "fp16", "fp32")  # --gpu-dtype; common.DTYPES maps them to torch dtypes
DECODE_DTYPES = ("fp32", "bf16")  # --decode-dtype; decode.DTYPES maps them
CONTEXT_METHODS = ("vanilla", "memeff", "bpt")  # --gpu-methods; context.METHODS holds their settings

# The vocabulary of every ringwise command (docs/cli.md): --seq-len, --worlds (a sweep of ring
# sizes; --world is one count elsewhere), --device, --dtype-style names bf16 / fp16 / fp32; a
# suite's own flag is the same word after the suite's name (--compute-seq-len, --scaling-worlds).


def shared_flags(p):
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="attention, compute, context: cpu (process rings on threads) or cuda (one GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="attention, decode, peers: CPU threads in all, shared by the ranks (SDPA gets them all)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="attention, compute, overlap, peers: timed iterations per case (after one warm-up)",
    )
    p.add_argument("--heads", type=int, default=8, help="attention, peers: query heads")
    p.add_argument("--head-dim", type=int, default=64, help="attention, overlap, peers: head_dim")
    p.add_argument("--gpu-dtype", default="bf16", choices=GPU_DTYPES, help="attention, compute --device cuda: dtype")


def attention_flags(p):
    p.add_argument("--seq-len", type=int, default=16384, help="global tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="ring sizes W to measure")
    p.add_argument(
        "--gpu-seq-lens",
        type=int,
        nargs="+",
        default=[8192, 16384, 32768, 65536, 131072],
        help="--device cuda: sequence lengths",
    )
    p.add_argument("--gpu-heads", type=int, default=32, help="--device cuda: heads")
    p.add_argument("--gpu-head-dim", type=int, default=128, help="--device cuda: head_dim")


def compute_flags(p):
    p.add_argument(
        "--compute-worlds",
        type=int,
        nargs="+",
        default=[2, 4, 8],
        help="ring sizes W to emulate (every rank of each, one at a time)",
    )
    p.add_argument(
        "--compute-seq-len",
        type=int,
        default=None,
        help="global tokens per sequence (default 131072 on cuda, 8192 on cpu)",
    )
    p.add_argument("--compute-heads", type=int, default=None, help="query heads (default 32 cuda, 8 cpu)")
    p.add_argument("--compute-kv-heads", type=int, default=None, help="key/value heads (default: heads)")
    p.add_argument("--compute-head-dim", type=int, default=None, help="head_dim (default 128 cuda, 64 cpu)")
    p.add_argument("--compute-layout", default="zigzag", help="layout of the shards")
    p.add_argument("--compute-mask", default="causal", choices=("causal", "full"), help="attention mask")
    p.add_argument("--compute-kernel", default="auto", help="the kernel (ring_attention's backend=)")


def overlap_flags(p):
    p.add_argument(
        "--blocks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096], help="tokens per rank to sweep"
    )
    p.add_argument("--overlap-world", type=int, default=2, help="ring size")
    p.add_argument("--overlap-heads", type=int, default=8, help="query heads")


def scaling_flags(p):
    p.add_argument("--scaling-model", default="small", help="model preset (`ringwise train --model`)")
    p.add_argument("--tokens-per-rank", type=int, default=4096, help="weak scaling: tokens held by each rank")
    p.add_argument("--scaling-seq-len", type=int, default=16384, help="strong scaling: the fixed global sequence")
    p.add_argument("--scaling-worlds", type=int, nargs="+", default=[1, 2, 4, 8], help="ring sizes W")
    p.add_argument("--scaling-layout", default="zigzag")


def memory_flags(p):
    p.add_argument("--memory-model", default="small", help="model preset (`ringwise train --model`)")
    p.add_argument(
        "--memory-cases",
        nargs="+",
        default=["8192:1", "8192:2", "16384:2", "16384:4", "32768:4"],
        help="SEQ_LEN:WORLD pairs to measure",
    )


CONTEXT_OPTIONS = ("none", "checkpoint-layers", "save-attention", "ffn-tile")  # --context-options (context_model)


def context_flags(p):
    p.add_argument(
        "--budget-mib",
        type=float,
        default=None,
        help="per-process memory budget above the model state (default: 32; with --model 512)",
    )
    p.add_argument("--context-model", default="tiny", help="model preset (`ringwise train --model`)")
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a transformers checkpoint folder: plain transformers in one process against `ringwise finetune`'s "
        "step on W ranks with each of --context-options (CPU, float32), instead of --context-model",
    )
    p.add_argument(
        "--context-worlds", type=int, nargs="+", default=None, help="ring sizes W (default: 2 4 8; with --model 1 2 4)"
    )
    p.add_argument(
        "--granularity",
        type=int,
        default=None,
        help="search step in tokens per process (default: 512; with --model 256)",
    )
    p.add_argument(
        "--context-options",
        nargs="+",
        default=["checkpoint-layers"],
        choices=list(CONTEXT_OPTIONS),
        help="--model: ringwise's memory options, one per search (save-attention and ffn-tile with checkpoint-layers)",
    )
    p.add_argument(
        "--context-max-tokens",
        type=int,
        default=16384,
        help="--model: longest sequence per process searched",
    )
    p.add_argument(
        "--gpu-methods",
        nargs="+",
        default=list(CONTEXT_METHODS),
        choices=list(CONTEXT_METHODS),
        help="--device cuda: methods to search",
    )
    p.add_argument("--gpu-granularity", type=int, default=16384, help="--device cuda: search step (tokens)")
    p.add_argument("--gpu-max-seq-len", type=int, default=1048576, help="--device cuda: longest sequence tried")
    p.add_argument("--gpu-mfu-seq-len", type=int, default=32768, help="--device cuda: tokens/s and MFU here")


def ulysses_flags(p):
    p.add_argument(
        "--ulysses-meshes",
        nargs="+",
        default=["1x4", "2x2", "4x1"],
        help="U x R meshes (ulysses x ring), all of one world size",
    )
    p.add_argument("--ulysses-seq-len", type=int, default=8192, help="global tokens per sequence")
    p.add_argument("--ulysses-heads", type=int, default=8, help="query heads")
    p.add_argument("--ulysses-kv-heads", type=int, default=None, help="GQA key/value heads (default: heads)")
    p.add_argument("--ulysses-head-dim", type=int, default=64, help="head_dim")
    p.add_argument(
        "--ulysses-threads-per-rank", type=int, default=1, help="threads per rank; SDPA gets ranks x this many"
    )
    p.add_argument("--ulysses-repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")


def hybrid_flags(p):
    p.add_argument("--hybrid-seq-len", type=int, default=8192, help="global tokens per sequence")
    p.add_argument("--hybrid-heads", type=int, default=8, help="delta-rule heads (W must divide them)")
    p.add_argument("--hybrid-head-dim", type=int, default=128, help="dk = dv (Qwen3-Next's 128)")
    p.add_argument("--hybrid-worlds", type=int, nargs="+", default=[2], help="ranks W of the time rows")
    p.add_argument("--hybrid-threads-per-rank", type=int, default=1, help="threads per rank; one process: W x this")
    p.add_argument("--hybrid-repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")
    p.add_argument("--hybrid-memory-worlds", type=int, nargs="+", default=[1, 2, 4], help="ranks W of the memory rows")
    p.add_argument("--hybrid-local-len", type=int, default=2048, help="tokens per rank in the memory rows")


def decode_flags(p):
    p.add_argument(
        "--decode-seq-lens", type=int, nargs="+", default=[4096, 16384, 65536, 262144], help="cache lengths S (tokens)"
    )
    p.add_argument("--decode-worlds", type=int, nargs="+", default=[1, 2], help="ranks W (each --threads/W threads)")
    p.add_argument("--decode-heads", type=int, default=32, help="query heads (Llama-3-8B)")
    p.add_argument("--decode-kv-heads", type=int, default=8, help="key/value heads")
    p.add_argument("--decode-head-dim", type=int, default=128, help="head_dim")
    p.add_argument("--decode-dtype", default="fp32", choices=DECODE_DTYPES, help="dtype of the cache and the query")
    p.add_argument("--decode-repeats", type=int, default=5, help="timed calls per case (after one warm-up)")
    p.add_argument(
        "--decode-e2e-model",
        default="base",
        help="model preset of the end-to-end generate rows (`ringwise train --model`)",
    )
    p.add_argument(
        "--decode-e2e-prompts",
        type=int,
        nargs="+",
        default=[4096, 16384],
        help="prompt lengths of the end-to-end generate rows (ringwise.generate, random weights)",
    )
    p.add_argument("--decode-e2e-new", type=int, default=16, help="new tokens per end-to-end row")


def masks_flags(p):
    p.add_argument("--masks-seq-len", type=int, default=8192, help="global tokens (packed documents)")
    p.add_argument("--masks-worlds", type=int, nargs="+", default=[2, 4], help="ring sizes W (one thread a rank)")
    p.add_argument("--masks-heads", type=int, default=8, help="query heads")
    p.add_argument("--masks-kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--masks-head-dim", type=int, default=64, help="head_dim")
    p.add_argument("--masks-repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")


def peers_flags(p):
    p.add_argument("--peer-world", type=int, default=2, help="ring size")
    p.add_argument("--peer-seq-len", type=int, default=8192, help="global tokens per sequence")


SUITE_FLAGS = {
    "attention": attention_flags,
    "compute": compute_flags,
    "overlap": overlap_flags,
    "scaling": scaling_flags,
    "memory": memory_flags,
    "context": context_flags,
    "ulysses": ulysses_flags,
    "hybrid": hybrid_flags,
    "decode": decode_flags,
    "masks": masks_flags,
    "peers": peers_flags,
}
SUITE_HELP = {
    "attention": "ring vs single-process SDPA at equal total threads, per layout (or one GPU's kernels)",
    "compute": "per-rank compute of a W-rank ring, transfers excluded, against one process",
    "overlap": "ring vs its compute alone vs its transfers alone over block sizes",
    "scaling": "per-rank training memory as the ring grows",
    "memory": "measured per-rank training memory against the planner",
    "context": "longest trainable sequence within a per-process memory budget",
    "ulysses": "ring-only, hybrid and Ulysses-only meshes against single-process SDPA",
    "hybrid": "a delta-rule layer across ranks: the state scan vs the head all-to-all vs one process",
    "decode": "one new token's attention over a sharded KV cache, and end-to-end generation",
    "masks": "packed documents with chunks, image groups, windows and mask_mod: time and bytes vs causal",
    "peers": "ringwise against ring-attention-pytorch and the paper authors' JAX package (the peers extra)",
}


def add_bench_arguments(b) -> None:
    """`ringwise bench`'s flags: the suite first, then --out and --quick, the flags several suites
    read, and each suite's own group (named after it)."""
    import argparse

    from . import OPTIONAL, SUITES

    b.formatter_class = type("BenchHelp", (argparse.RawDescriptionHelpFormatter, b.formatter_class), {})
    b.usage = "%(prog)s SUITE [--quick] [--out DIR] [the suite's flags, in its group below]"
    b.description = (
        "Benchmarks measured side by side: JSON, markdown and PNG into --out.\n\nSUITE:\n"
        + "".join(f"  {name:<10} {SUITE_HELP[name]}\n" for name in SUITES + OPTIONAL)
        + f"  {'all':<10} every suite but peers, in turn"
    )
    b.add_argument(
        "suite",
        metavar="SUITE",
        choices=SUITES + OPTIONAL + ("all",),
        help=f"one of {', '.join(SUITES + OPTIONAL)}, all",
    )
    g = b.add_argument_group("every suite")
    g.add_argument("--out", default="results", metavar="DIR", help="folder for JSON, markdown and plots")
    g.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    shared_flags(b.add_argument_group("read by several suites (named in each flag's help)"))
    for name in SUITES + OPTIONAL:
        SUITE_FLAGS[name](b.add_argument_group(f"{name} (ringwise bench {name})"))
