"""`ringwise plan`: the memory ledger of `ringwise finetune` (ringwise.plan) for a cluster you plan, and the
paper's memory/overlap model (--paper, --table2, --table3).

Torch-free, as the planner is: `ringwise plan` runs where torch is not installed.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .. import plan
from . import flag_problems, refused


def add_arguments(parser) -> None:
    """Options of `ringwise plan`; the custom-hardware numbers override the --hardware preset."""
    parser.add_argument(
        "--model",
        default="llama-7b",
        metavar="CONFIG",
        help="a transformers config.json or checkpoint folder (a VLM's text_config is read), or a LLaMA "
        "preset: " + ", ".join(plan.LLAMA_PRESETS),
    )
    parser.add_argument(
        "--dtype", default="bf16", choices=tuple(plan.DTYPE_BYTES), help="compute dtype (finetune's --dtype)"
    )
    parser.add_argument("--checkpoint-layers", action="store_true", help="plan with finetune's --checkpoint-layers")
    parser.add_argument("--save-attention", action="store_true", help="plan with finetune's --save-attention")
    parser.add_argument("--offload-activations", action="store_true", help="plan with finetune's --offload-activations")
    parser.add_argument(
        "--offload-params",
        action="store_true",
        help="plan with finetune's --offload-params (the model state in host memory, the optimizer step on the CPU)",
    )
    parser.add_argument(
        "--ffn-tile",
        type=int,
        default=None,
        metavar="TOKENS",
        help="finetune's --ffn-tile (default: automatic, the hidden size; 0: untiled)",
    )
    parser.add_argument(
        "--host-memory-gb",
        metavar="GB",
        type=float,
        default=None,
        help="host memory per node, GB (bounds offloaded checkpoints and the offloaded model state; default: not "
        "limited)",
    )
    parser.add_argument(
        "--reserve-gb",
        metavar="GIB",
        type=float,
        default=2.0,
        help="device memory kept out of the plan, GiB (CUDA context, communication buffers, allocator slack)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's per-method memory model (vanilla, memory-efficient, BPT, ring) instead of the ledger",
    )
    parser.add_argument(
        "--hardware",
        default="a100-nvlink",
        choices=tuple(plan.DEVICES),
        help="the accelerator and its link (its FLOP/s, memory, ring bandwidth)",
    )
    parser.add_argument(
        "--devices",
        metavar="N",
        type=int,
        default=8,
        help="devices in the planned cluster, all nodes: the job's world size there (the ring, "
        "and FSDP's shards); not `train --world`, the local processes a run starts",
    )
    parser.add_argument("--batch", metavar="N", type=int, default=1, help="sequences per ring")
    parser.add_argument(
        "--seq-len",
        metavar="TOKENS",
        type=int,
        default=None,
        help="global tokens per sequence for the per-layer numbers and the decode cache "
        "(default: 32K or 1K per device, the larger)",
    )
    parser.add_argument("--flops", metavar="FLOP_S", type=float, default=None, help="custom dense FLOP/s")
    parser.add_argument("--memory-gb", metavar="GB", type=float, default=None, help="custom memory, GB")
    parser.add_argument(
        "--bandwidth-gbps", metavar="GB_S", type=float, default=None, help="custom unidirectional bandwidth, GB/s"
    )
    parser.add_argument(
        "--devices-per-node",
        metavar="N",
        type=int,
        default=None,
        help="plan the Ulysses x ring split for nodes of this many devices (--devices in all)",
    )
    parser.add_argument(
        "--nvlink-gbps",
        metavar="GB_S",
        type=float,
        default=None,
        help="in-node bandwidth per device, GB/s (default: the hardware's bandwidth)",
    )
    parser.add_argument(
        "--internode-gbps",
        metavar="GB_S",
        type=float,
        default=50.0,
        help="network bandwidth per device between nodes, GB/s (50 = 400 Gb/s)",
    )
    parser.add_argument("--table2", action="store_true", help="print paper Table 2 vs ours")
    parser.add_argument("--table3", action="store_true", help="print paper Table 3 vs ours")


def problems(args) -> list[str]:
    """Every bad value among the flags, one line each (empty: the plan can be printed)."""
    found = []
    for flag, integer in (
        ("--devices", True),
        ("--batch", True),
        ("--seq-len", True),
        ("--flops", False),
        ("--memory-gb", False),
        ("--bandwidth-gbps", False),
        ("--devices-per-node", True),
        ("--nvlink-gbps", False),
        ("--internode-gbps", False),
        ("--host-memory-gb", False),
    ):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        try:
            plan.positive(flag, value, integer)
        except ValueError:
            found.append(f"{flag} {value}: must be a positive {'integer' if integer else 'finite number'}")
    dpn = getattr(args, "devices_per_node", None)
    if dpn and dpn > 0 and args.devices > 0 and args.devices % dpn:
        found.append(f"--devices {args.devices} must be a multiple of --devices-per-node {dpn}")
    reserve = getattr(args, "reserve_gb", 0.0)
    if reserve is not None and not reserve >= 0:
        found.append(f"--reserve-gb {reserve}: must be a number >= 0")
    found += plan.mode_problems(*_mode_values(args))
    try:
        path_like = os.path.exists(args.model) or args.model.endswith(".json") or os.sep in args.model
        if not path_like and args.model not in plan.LLAMA_PRESETS:
            raise ValueError("unknown model")  # a preset by its listed name only (one name per thing)
        plan.resolve_model(args.model)
    except ValueError as e:
        found.append(_model_problem(args.model, str(e)))
    return found


def _model_problem(value, why: str) -> str:
    """--model's problem in the command line's words: the flag and its value first."""
    if why.startswith("--model"):
        return why
    if why.startswith("unknown model"):  # neither a file nor a preset
        presets = ", ".join(plan.LLAMA_PRESETS)
        return f"--model {value}: must be a transformers config.json or folder, or one of {presets}"
    return f"--model {value}: {why}"


def _mode_values(args) -> tuple:
    return tuple(
        getattr(args, name, None if name == "ffn_tile" else False)
        for name in ("checkpoint_layers", "save_attention", "offload_activations", "ffn_tile")
    )


def _modes(args) -> plan.MemoryModes:
    checkpoint_layers, save_attention, offload_activations, ffn_tile = _mode_values(args)
    offload_params = getattr(args, "offload_params", False)
    return plan.MemoryModes(checkpoint_layers, save_attention, offload_activations, ffn_tile, offload_params)


def run(args) -> None:
    """Print the plan (or the tables) for parsed ``args``; bad input raises ValueError."""
    if args.table2 or args.table3:
        print("\n\n".join(t() for f, t in ((args.table2, plan.format_table2), (args.table3, plan.format_table3)) if f))
        return
    device = plan.get_device(args.hardware)
    custom = {}
    for name, field, scale in (
        ("flops", "flops", 1),
        ("memory_gb", "memory_bytes", 1e9),
        ("bandwidth_gbps", "bandwidth_bytes_per_s", 1e9),
    ):
        value = getattr(args, name, None)
        if value is not None:
            custom[field] = plan.positive(f"--{name.replace('_', '-')}", value) * scale
    if custom:
        device = replace(device, name=f"custom({device.name})", **custom)
    model = plan.resolve_model(args.model)
    dpn = getattr(args, "devices_per_node", None)
    if getattr(args, "paper", False):
        print(plan.plan_report(plan.shape_of(model), device, args.devices, args.batch, args.seq_len))
    else:
        host = None if args.host_memory_gb is None else plan.positive("--host-memory-gb", args.host_memory_gb) * 1e9
        reserve = args.reserve_gb * plan.GIB
        path = plan.checkpoint_folder(args.model) or "PATH"
        common = dict(host_bytes=host, ranks_per_host=dpn, reserve_bytes=reserve)
        print(plan.ledger_report(model, device, args.devices, args.dtype, _modes(args), model_path=path, **common))
        print(plan.modes_table(model, device, args.devices, args.dtype, **common))
        print(plan.format_decode_plan(model, args.devices, args.seq_len or 2**20, args.batch))
    if dpn is not None:
        plan.positive("--devices-per-node", dpn, integer=True)
        if args.devices % dpn:
            raise ValueError(f"--devices {args.devices} must be a multiple of --devices-per-node {dpn}")
        nvlink = (
            device.bandwidth_bytes_per_s
            if args.nvlink_gbps is None
            else plan.positive("--nvlink-gbps", args.nvlink_gbps) * 1e9
        )
        cluster = plan.Cluster(
            dpn, args.devices // dpn, nvlink, plan.positive("--internode-gbps", args.internode_gbps) * 1e9
        )
        seq = args.seq_len or max(32 * plan.K, args.devices * plan.K)
        print()
        print(plan.format_mesh_plan(plan.shape_of(model), device, cluster, seq, batch=args.batch))


def main(args) -> int:
    """0 with the plan printed; 2 (every problem listed) on bad values or an unknown preset."""
    found = flag_problems(args) + problems(args)
    if found:
        return refused("plan", found)
    try:
        run(args)
    except ValueError as e:
        return refused("plan", [str(e)])
    return 0
