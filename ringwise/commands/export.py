"""`ringwise export RUN_DIR OUT.pt`: a run's newest intact checkpoint as one file ({step, config,
model}); with --hf, a finetune run's as a folder AutoModelForCausalLM.from_pretrained reads.
Also `python -m ringwise.train export RUN_DIR OUT.pt`."""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a training --out folder")
    p.add_argument("out_file", help="where to write the consolidated checkpoint (.pt), or the folder (--hf)")
    p.add_argument("--hf", action="store_true", help="a ringwise finetune run as a transformers folder "
                   "(safetensors, its config with the new RoPE, the tokenizer)")


def main(args) -> int:
    """0 with the export written; 2 (one line, no traceback) when there is nothing to export."""
    try:
        if getattr(args, "hf", False):
            from ..train.pretrained import export_hf

            path = export_hf(args.run_dir, args.out_file)
        else:
            from ..train import checkpoint

            path = checkpoint.export(args.run_dir, args.out_file)
    except (FileNotFoundError, ValueError) as e:
        print(f"ringwise export: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out_file}")
    return 0
