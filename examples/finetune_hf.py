"""Fine-tune a Hugging Face causal LM on long packed sequences with ring attention.

Each rank holds 1/W of every sequence; attention runs as a ring through transformers'
own attention registry (attn_implementation="ringwise"), documents packed into one
sequence attend only within themselves.

    python examples/finetune_hf.py --world 2                      # tiny random Llama, local ranks
    python examples/finetune_hf.py --world 2 --arch gemma2 --gradient-checkpointing
    python examples/finetune_hf.py --model PATH --text corpus.txt  # a local checkpoint and its tokenizer
    torchrun --nproc-per-node 8 examples/finetune_hf.py --model PATH --text data/ --seq-len 131072

Checkpoints (sharded DCP, atomic) go to --out every --ckpt-every steps; --resume continues.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import ringwise.integrations.transformers as rw
from ringwise.data import ByteTokenizer, RetrievalDataset
from ringwise.train import checkpoint
from ringwise.train.parallel import elastic_run, init_distributed


ARCHS = ("llama", "mistral", "gemma2", "gemma3", "gpt_oss", "qwen2_moe")


def tiny_config(arch: str, vocab: int, window: int):
    """A small random config of `arch`; windowed families get `window`-token sliding windows."""
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return T.LlamaConfig(**common)
    if arch == "mistral":
        return T.MistralConfig(**common, sliding_window=window)
    if arch == "gemma2":  # local/global layers with soft-capping
        return T.Gemma2Config(**common, head_dim=32, sliding_window=window, query_pre_attn_scalar=32)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**common, head_dim=32, sliding_window=window, query_pre_attn_scalar=32,
                                  layer_types=["sliding_attention", "full_attention"])
    if arch == "gpt_oss":  # attention sinks, local/global layers, MoE
        return T.GptOssConfig(**common, head_dim=32, sliding_window=window, num_local_experts=4,
                              num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(**common, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                num_experts=4, num_experts_per_tok=2)
    raise ValueError(f"--arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")


def build_model(args):
    """Loaded or tiny random model with ringwise attention; check_model runs before and after building."""
    if args.model:
        model = rw.from_pretrained(args.model, torch_dtype=torch.float32)
    else:
        torch.manual_seed(args.seed)
        model = rw.from_config(tiny_config(args.arch, ByteTokenizer().vocab_size, args.window))
    if args.gradient_checkpointing:  # transformers then calls the model with use_cache=False
        model.gradient_checkpointing_enable()
    return model


def packed_batches(args):
    """Yield (input_ids, cu_seqlens): --docs documents of equal length per sequence."""
    doc_len = args.seq_len // args.docs
    cu = [i * doc_len for i in range(args.docs)] + [args.seq_len]
    if args.text:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        text = "".join(open(p, encoding="utf-8").read() for p in args.text)
        ids = torch.tensor(tok(text)["input_ids"])
        n = len(ids) // args.seq_len
        if n == 0:
            raise SystemExit(f"--text holds {len(ids)} tokens, fewer than one --seq-len {args.seq_len}")
        step = 0
        while True:
            rows = [ids[((step * args.batch + b) % n) * args.seq_len:][:args.seq_len] for b in range(args.batch)]
            yield torch.stack(rows), cu
            step += 1
    data = RetrievalDataset(doc_len, seed=args.seed, fmt="compact", id_digits=3, value_digits=2, loss_on="all")
    index = 0
    while True:
        rows = []
        for _ in range(args.batch):
            last = args.seq_len - doc_len * (args.docs - 1)
            parts = [data[index + d]["input_ids"] for d in range(args.docs)]
            parts[-1] = torch.cat([parts[-1], torch.full((last - doc_len,), ByteTokenizer.PAD)])
            rows.append(torch.cat(parts))
            index += args.docs
        yield torch.stack(rows), cu


def worker(args):
    # the training job's own set-up: GPU LOCAL_RANK under NCCL with a CPU backend beside it (or gloo with
    # host-staged hops where ranks share a GPU), CPU and gloo without a GPU
    device = init_distributed("auto", None, timeout=120)
    rank = dist.get_rank()
    rw.use_ring(layout=args.layout)
    model = build_model(args).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume and (meta := checkpoint.resume(os.path.join(args.out, "checkpoints"), model, optimizer)):
        start = meta["step"]
    batches = packed_batches(args)
    for _ in range(start):  # the data stream is deterministic: skip what was trained on
        next(batches)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc="finetune", unit="step")
    for step in range(start, args.steps):
        ids, cu = next(batches)
        batch = rw.shard_batch(ids.to(device), cu_seqlens=cu)
        labels = batch.pop("labels")
        loss = rw.causal_lm_loss(model(**batch).logits, labels)
        loss.backward()
        for p in model.parameters():  # every rank's loss covers its tokens: sum the gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if bar is not None:
            bar.set_postfix(loss=f"{total.item():.4f}")
            bar.update()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:  # every rank writes (DCP)
            checkpoint.save(os.path.join(args.out, "checkpoints"), step + 1, model, optimizer, {}, keep=2)
    if bar is not None:
        bar.close()
        print(f"done: {args.steps} steps, last loss {total.item():.4f}; checkpoints in {args.out}/checkpoints")
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local checkpoint path (default: a tiny random --arch model)")
    p.add_argument("--arch", default="llama", choices=ARCHS, help="tiny random architecture when no --model")
    p.add_argument("--window", type=int, default=32, help="sliding window of the tiny windowed architectures")
    p.add_argument("--layout", default="zigzag", choices=("zigzag", "striped", "contiguous"))
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward pass")
    p.add_argument("--text", nargs="+", default=None, help="text files (needs --model for its tokenizer)")
    p.add_argument("--world", type=int, default=2, help="local ranks (ignored under torchrun)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--docs", type=int, default=4, help="documents packed into each sequence")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune_hf")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.text and not args.model:
        p.error("--text needs --model (its tokenizer)")
    elastic_run(worker, args.world, args)


if __name__ == "__main__":
    main()
