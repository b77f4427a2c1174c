"""`ringwise plan`: the paper's memory/overlap model (ringwise.plan) for a cluster you plan.

Torch-free, as the planner is: `ringwise plan` runs where torch is not installed.
"""

from __future__ import annotations

from dataclasses import replace

from .. import plan
from ..presets import LLAMA
from . import flag_problems, refused


def add_arguments(parser) -> None:
    """Options of `ringwise plan`; the custom-hardware numbers override the --hardware preset."""
    parser.add_argument(
        "--model",
        default="llama-7b",
        choices=LLAMA,
        help="the model's shapes (the presets `ringwise train --model` trains)",
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
    return found


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
    print(plan.plan_report(args.model, device, args.devices, args.batch, args.seq_len))
    dpn = getattr(args, "devices_per_node", None)
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
        print(plan.format_mesh_plan(args.model, device, cluster, seq, batch=args.batch))


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
