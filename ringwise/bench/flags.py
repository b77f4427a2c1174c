"""Every benchmark suite's `ringwise bench` flags, in one torch-free module.

The suites share one namespace (compute, overlap and peers read attention's --repeats,
--device, --head-dim...; `bench attention --ulysses` reads the ulysses suite's flags), so the
CLI builds them all, grouped by suite, without importing a single suite: `ringwise bench X`
then imports suite X alone. Each suite module keeps its own flags under its `add_arguments`.
"""
from __future__ import annotations

GPU_DTYPES = ("bf16", "fp16", "fp32")  # --gpu-dtype; common.DTYPES maps them to torch dtypes
CONTEXT_METHODS = ("vanilla", "memeff", "bpt")  # --gpu-methods; context.METHODS holds their settings


def attention_flags(p):
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="attention/context: cpu (process rings on threads) or cuda (one GPU)")
    p.add_argument("--gpu-seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072],
                   help="--device cuda: sequence lengths")
    p.add_argument("--gpu-heads", type=int, default=32, help="--device cuda: heads")
    p.add_argument("--gpu-head-dim", type=int, default=128, help="--device cuda: head_dim")
    p.add_argument("--gpu-dtype", default="bf16", choices=GPU_DTYPES, help="--device cuda: dtype")
    p.add_argument("--seq", type=int, default=16384, help="global sequence length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2], help="ring sizes to measure")
    p.add_argument("--threads", type=int, default=2, help="total threads, shared by the ranks")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")


def compute_flags(p):
    p.add_argument("--compute-worlds", type=int, nargs="+", default=[2, 4, 8],
                   help="compute: ring sizes W to emulate (every rank of each, one at a time)")
    p.add_argument("--compute-seq", type=int, default=None,
                   help="compute: global sequence length (default 131072 on cuda, 8192 on cpu)")
    p.add_argument("--compute-heads", type=int, default=None, help="compute: query heads (default 32 cuda, 8 cpu)")
    p.add_argument("--compute-kv-heads", type=int, default=None, help="compute: key/value heads (default: heads)")
    p.add_argument("--compute-head-dim", type=int, default=None, help="compute: head_dim (default 128 cuda, 64 cpu)")
    p.add_argument("--compute-layout", default="zigzag", help="compute: layout of the shards")
    p.add_argument("--compute-mask", default="causal", choices=("causal", "full"), help="compute: attention mask")
    p.add_argument("--compute-backend", default="auto", help="compute: the kernel (ring_attention's backend)")


def overlap_flags(p):
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096],
                   help="overlap: tokens per rank to sweep")
    p.add_argument("--overlap-world", type=int, default=2)
    p.add_argument("--overlap-heads", type=int, default=8)


def scaling_flags(p):
    p.add_argument("--scaling-model", default="small", help="model preset for the scaling sweeps")
    p.add_argument("--tokens-per-rank", type=int, default=4096, help="weak scaling: tokens held by each rank")
    p.add_argument("--global-len", type=int, default=16384, help="strong scaling: fixed global sequence")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--scaling-layout", default="zigzag")


def memory_flags(p):
    p.add_argument("--memory-model", default="small", help="memory: model preset")
    p.add_argument("--memory-cases", nargs="+", default=["8192:1", "8192:2", "16384:2", "16384:4", "32768:4"],
                   help="memory: SEQ:WORLD pairs to measure")


def context_flags(p):
    p.add_argument("--budget-mib", type=float, default=32.0, help="context: per-process memory budget")
    p.add_argument("--context-model", default="tiny", help="context: model preset")
    p.add_argument("--ring-worlds", type=int, nargs="+", default=[2, 4, 8], help="context: ring sizes")
    p.add_argument("--granularity", type=int, default=512, help="context: search step in tokens per process")
    p.add_argument("--gpu-methods", nargs="+", default=list(CONTEXT_METHODS), choices=list(CONTEXT_METHODS),
                   help="context --device cuda: methods to search")
    p.add_argument("--gpu-granularity", type=int, default=16384, help="context --device cuda: search step (tokens)")
    p.add_argument("--gpu-max-seq", type=int, default=1048576, help="context --device cuda: longest sequence tried")
    p.add_argument("--gpu-mfu-seq", type=int, default=32768, help="context --device cuda: tokens/s and MFU here")


def ulysses_flags(p):
    p.add_argument("--ulysses", action="store_true",
                   help="with `bench attention`: run this suite (ring, Ulysses and hybrid meshes) instead")
    p.add_argument("--ulysses-meshes", nargs="+", default=["1x4", "2x2", "4x1"],
                   help="U x R meshes (ulysses x ring), all of one world size")
    p.add_argument("--ulysses-seq", type=int, default=8192, help="global sequence length")
    p.add_argument("--ulysses-heads", type=int, default=8)
    p.add_argument("--ulysses-kv-heads", type=int, default=None, help="GQA key/value heads (default: heads)")
    p.add_argument("--ulysses-head-dim", type=int, default=64)
    p.add_argument("--ulysses-threads-per-rank", type=int, default=1,
                   help="threads per rank; SDPA gets ranks x this many")
    p.add_argument("--ulysses-repeats", type=int, default=3, help="timed iterations per case (after one warm-up)")


def decode_flags(p):
    p.add_argument("--decode-seqs", type=int, nargs="+", default=[4096, 16384, 65536, 262144],
                   help="decode: cache lengths S")
    p.add_argument("--decode-worlds", type=int, nargs="+", default=[1, 2], help="decode: ranks W (each --threads/W threads)")
    p.add_argument("--decode-heads", type=int, default=32, help="decode: query heads (Llama-3-8B)")
    p.add_argument("--decode-kv-heads", type=int, default=8, help="decode: key/value heads")
    p.add_argument("--decode-head-dim", type=int, default=128)
    p.add_argument("--decode-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--decode-repeats", type=int, default=5, help="decode: timed calls per case (after one warm-up)")
    p.add_argument("--decode-e2e-model", default="base", help="decode: model preset of the end-to-end generate rows")
    p.add_argument("--decode-e2e-prompts", type=int, nargs="+", default=[4096, 16384],
                   help="decode: prompt lengths of the end-to-end generate rows (ringwise.generate, random weights)")
    p.add_argument("--decode-e2e-new", type=int, default=16, help="decode: new tokens per end-to-end row")


def peers_flags(p):
    p.add_argument("--peer-world", type=int, default=2)
    p.add_argument("--peer-seq", type=int, default=8192)


SUITE_FLAGS = {"attention": attention_flags, "compute": compute_flags, "overlap": overlap_flags,
               "scaling": scaling_flags, "memory": memory_flags, "context": context_flags,
               "ulysses": ulysses_flags, "decode": decode_flags, "peers": peers_flags}


def add_bench_arguments(b) -> None:
    """`ringwise bench`'s flags: the suite, --out, --quick, then every suite's group."""
    from . import OPTIONAL, SUITES

    b.add_argument("suite", choices=SUITES + OPTIONAL + ("all",))
    b.add_argument("--out", default="results", help="folder for JSON, markdown and plots")
    b.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    for name in SUITES + OPTIONAL:
        SUITE_FLAGS[name](b.add_argument_group(name))
