"""`ringwise export RUN_DIR OUT.pt`: a run's newest intact checkpoint as one file ({step, config,
model}); with --hf, a finetune run's as a folder AutoModelForCausalLM.from_pretrained reads (a --lora
run's adapters merged); with --adapter, a --lora run's adapters alone, as a peft folder.
Also `python -m ringwise.train export RUN_DIR OUT.pt`."""

from __future__ import annotations

import sys

from . import flag_problems, refused


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `ringwise train` / `finetune` run's folder (its --out)")
    p.add_argument("out_file", metavar="OUT", help="the file to write (.pt), or with --hf the folder (new or empty)")
    p.add_argument(
        "--hf",
        action="store_true",
        help="a ringwise finetune run as a transformers folder "
        "(safetensors, its config with the new RoPE, the tokenizer); a --lora run's adapters merged into "
        "the weights",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a ringwise finetune --lora run's adapters alone, as a peft folder (adapter_config.json, "
        "adapter_model.safetensors, the tokenizer) that PeftModel.from_pretrained puts on the base model",
    )


def main(args) -> int:
    """0 with the export written; 2 (no traceback) on bad flags or when there is nothing to export."""
    found = flag_problems(args)
    if found:
        return refused("export", found)
    try:
        if getattr(args, "hf", False) or getattr(args, "adapter", False):
            from ..train.pretrained import export_hf

            path = export_hf(args.run_dir, args.out_file, adapter=getattr(args, "adapter", False))
        else:
            from ..train import checkpoint

            path = checkpoint.export(args.run_dir, args.out_file)
    except (FileNotFoundError, ValueError) as e:
        print(f"ringwise export: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} to {args.out_file}")
    return 0
