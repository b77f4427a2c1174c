"""`ringwise plan`: the paper's memory/overlap model (ringwise.plan) for a cluster you plan.

Torch-free, as the planner is: `ringwise plan` runs where torch is not installed.
"""
from __future__ import annotations

import sys
from dataclasses import replace

from .. import plan


def add_arguments(parser) -> None:
    """Options of `ringwise plan`; the custom-device numbers override the --device preset."""
    parser.add_argument("--model", default="7b", help=f"one of {', '.join(plan.MODELS)}")
    parser.add_argument("--device", default="a100-nvlink", help=f"one of {', '.join(plan.DEVICES)}")
    parser.add_argument("--devices", type=int, default=8, help="devices in the ring (FSDP too)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per ring")
    parser.add_argument("--seq", type=int, default=None, help="sequence for per-layer numbers")
    parser.add_argument("--flops", type=float, default=None, help="custom dense FLOP/s")
    parser.add_argument("--memory-gb", type=float, default=None, help="custom memory, GB")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="custom unidirectional bandwidth, GB/s")
    parser.add_argument("--devices-per-node", type=int, default=None,
                        help="plan the Ulysses x ring split for nodes of this many devices (--devices in all)")
    parser.add_argument("--nvlink-gbps", type=float, default=None,
                        help="in-node bandwidth per device, GB/s (default: the device's bandwidth)")
    parser.add_argument("--internode-gbps", type=float, default=50.0,
                        help="network bandwidth per device between nodes, GB/s (50 = 400 Gb/s)")
    parser.add_argument("--table2", action="store_true", help="print paper Table 2 vs ours")
    parser.add_argument("--table3", action="store_true", help="print paper Table 3 vs ours")


def run(args) -> None:
    """Print the plan (or the tables) for parsed ``args``; bad input raises ValueError."""
    if args.table2 or args.table3:
        print("\n\n".join(t() for f, t in ((args.table2, plan.format_table2),
                                          (args.table3, plan.format_table3)) if f))
        return
    device = plan.get_device(args.device)
    custom = {}
    for name, field, scale in (("flops", "flops", 1), ("memory_gb", "memory_bytes", 1e9),
                               ("bandwidth_gbps", "bandwidth_bytes_per_s", 1e9)):
        value = getattr(args, name, None)
        if value is not None:
            custom[field] = plan.positive(f"--{name.replace('_', '-')}", value) * scale
    if custom:
        device = replace(device, name=f"custom({device.name})", **custom)
    print(plan.plan_report(args.model, device, args.devices, args.batch, args.seq))
    dpn = getattr(args, "devices_per_node", None)
    if dpn is not None:
        plan.positive("--devices-per-node", dpn, integer=True)
        if args.devices % dpn:
            raise ValueError(f"--devices {args.devices} must be a multiple of --devices-per-node {dpn}")
        nvlink = device.bandwidth_bytes_per_s if args.nvlink_gbps is None else \
            plan.positive("--nvlink-gbps", args.nvlink_gbps) * 1e9
        cluster = plan.Cluster(dpn, args.devices // dpn, nvlink,
                               plan.positive("--internode-gbps", args.internode_gbps) * 1e9)
        seq = args.seq or max(32 * plan.K, args.devices * plan.K)
        print()
        print(plan.format_mesh_plan(args.model, device, cluster, seq, batch=args.batch))


def main(args) -> int:
    """0 with the plan printed; 2 (one line) on a bad value or an unknown preset."""
    try:
        run(args)
    except ValueError as e:
        print(f"ringwise plan: {e}", file=sys.stderr)
        return 2
    return 0
