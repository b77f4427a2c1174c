"""TRL's SFTTrainer sequence-parallel through ringwise (ring_trainer(SFTTrainer), padding-free packing,
completion-only loss) on W local gloo ranks, beside TRL's own SFTTrainer in one process (sdpa, padded rows) on
the same random Llama, data and order: the logged loss of every step side by side, and seconds per step.

The model: a random Llama (--layers, --hidden; GQA 2:1, head_dim 32) of a 1024-token vocabulary, float32, or
a pretrained transformers folder (--model: SmolLM2 from scripts/fetch_smollm2.py) with its tokenizer.
The data: --batch prompt/completion pairs per step (prompts of 16..64 tokens, the rest completion, sequences
of 64..--max-len tokens, random tokens of the model's vocabulary), read in order
(train_sampling_strategy="sequential"), AdamW, one epoch of --steps steps. Usage:
    python benchmarks/trainer_sft.py --world 2
    python benchmarks/trainer_sft.py --world 2 --model models/smollm2-135m --steps 4 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

VOCAB = 1024


def make_config(layers: int, hidden: int):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(hidden // 64, 1),
        head_dim=32,
        pad_token_id=0,
        eos_token_id=2,
    )


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t1", eos_token="t2", pad_token="t0")


def dataset(n: int, max_len: int, vocab: int = VOCAB):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(64, max_len + 1, (), generator=g))
        prompt = int(torch.randint(16, 65, (), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append(dict(input_ids=ids, completion_mask=[0] * prompt + [1] * (length - prompt)))
    return Dataset.from_list(rows)


def run(cfg: dict, ring: bool) -> dict:
    """One training run (on a rank of the ring, or alone): the logged losses and the seconds of each step."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.starts, self.seconds = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.starts[-1])

    torch.manual_seed(0)
    path = cfg.get("model")
    config = transformers.AutoConfig.from_pretrained(path) if path else make_config(cfg["layers"], cfg["hidden"])
    if ring:
        import ringwise.integrations.transformers as rw
        from ringwise.integrations.trainer import ring_trainer

        rw.use_ring(layout="zigzag")
        model = rw.from_pretrained(path, dtype=torch.float32) if path else rw.from_config(config)
        cls = ring_trainer(SFTTrainer)
    else:
        auto = transformers.AutoModelForCausalLM
        model = (
            auto.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
            if path
            else auto.from_config(config, attn_implementation="sdpa")
        )
        cls = SFTTrainer
    tok = transformers.AutoTokenizer.from_pretrained(path) if path else tokenizer()
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=cfg["batch"],
            max_steps=cfg["steps"],
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            seed=0,
            disable_tqdm=True,
            completion_only_loss=True,
            padding_free=ring,  # the ring packs; one process pads (sdpa has no packed mask)
            max_length=None,
            train_sampling_strategy="sequential",
            gradient_checkpointing=False,
        )
        trainer = cls(
            model=model,
            args=args,
            train_dataset=dataset(cfg["batch"] * cfg["steps"], cfg["max_len"], config.vocab_size),
            processing_class=tok,
            callbacks=[clock],
        )
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(losses=losses, seconds=clock.seconds)


def on_rank(cfg: dict) -> dict:
    return run(cfg, ring=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--max-len", type=int, default=256, help="longest sequence (tokens)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--model", default=None, help="a pretrained transformers folder instead of the random Llama")
    a = p.parse_args()
    cfg = dict(steps=a.steps, batch=a.batch, max_len=a.max_len, layers=a.layers, hidden=a.hidden, model=a.model)
    from ringwise.testing.cluster import LocalCluster

    threads = max((os.cpu_count() or 1) // a.world, 1)
    with LocalCluster(a.world, threads_per_rank=threads, pg_timeout=600) as cluster:
        ranks = cluster.run(on_rank, cfg, timeout=3600)
    torch.set_num_threads(os.cpu_count() or 1)
    alone = run(cfg, ring=False)
    ring = ranks[0]
    assert all(r["losses"] == ring["losses"] for r in ranks), "the ranks logged different losses"
    rel = max(abs(x - y) / abs(y) for x, y in zip(ring["losses"], alone["losses"]))
    import transformers

    vocab = transformers.AutoConfig.from_pretrained(a.model).vocab_size if a.model else VOCAB
    tokens = sum(len(r["input_ids"]) for r in dataset(a.batch * a.steps, a.max_len, vocab))
    median = sorted(ring["seconds"][1:] or ring["seconds"])[len(ring["seconds"][1:] or ring["seconds"]) // 2]
    median_alone = sorted(alone["seconds"][1:] or alone["seconds"])[len(alone["seconds"][1:] or alone["seconds"]) // 2]
    print(
        json.dumps(
            dict(
                model=a.model or "random Llama",
                world=a.world,
                tokens_per_step=tokens / a.steps,
                losses_ring=[round(x, 6) for x in ring["losses"]],
                losses_one_process=[round(x, 6) for x in alone["losses"]],
                max_relative_loss_difference=rel,
                median_step_seconds_ring=round(median, 3),
                median_step_seconds_one_process=round(median_alone, 3),
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
