"""transformers architectures with sliding windows, hybrid local/global layers, sinks, soft-capping,
MoE and gradient checkpointing run sequence-parallel through the registry: logits and every parameter
gradient equal the one-process model (float64 oracle; budget 2x the float32 model's own error).
Half the cases run the feed-forward tiled (rw.tile_feed_forward, tiles shorter than the local shard;
inside gradient checkpointing too). Refusals: test_hf_refusals.py; more families at W = 2:
test_hf_families.py."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, count_comms, max_err  # noqa: E402
from hf_models import REFERENCE_ATTN, make_config  # noqa: E402
from hf_versions import EAGER_EXPERTS, REFUSED_HERE  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise.attention.layout import global_indices  # noqa: E402

SEQ = 48  # splits evenly for every layout at W = 2 and 3
DOCS = [0, 5, 6, 29, 48]


def make_model(name, attn, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn, **EAGER_EXPERTS)


def global_ids(seed=1):
    return torch.randint(3, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def refused_build(name):
    """This rank's refusal of the architecture, or None if it was built."""
    rw.use_ring()
    try:
        rw.from_config(make_config(name), **EAGER_EXPERTS)
    except ValueError as e:
        return str(e)
    return None


def ring_run(name, docs, layout, mode, tile):
    """mode: "cache" (default forward), "no-cache" (use_cache=False), "ckpt" (gradient checkpointing);
    tile: the feed-forward's tile in tokens (0: untiled)."""
    rw.use_ring(layout=layout)
    model = make_model(name, "ringwise")
    rw.check_model(model)
    assert rw.tile_feed_forward(model, tile) == tile
    if mode == "ckpt":
        model.gradient_checkpointing_enable()
        model.train()
    batch = rw.shard_batch(global_ids(), cu_seqlens=docs)
    labels = batch.pop("labels")
    logits = model(**batch, **({"use_cache": False} if mode == "no-cache" else {})).logits
    rw.causal_lm_loss(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for g in grads.values():
        dist.all_reduce(g)
    return dict(logits=logits.detach(), grads=grads)


def reference_mask(docs, window, dtype):
    """Additive (SEQ, SEQ) mask: causal, inside each document, within `window` keys (the query included)."""
    q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    visible = k <= q
    if window is not None:
        visible &= q - k < window
    lengths = torch.tensor(docs[1:]) - torch.tensor(docs[:-1])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    visible &= doc[:, None] == doc[None, :]
    additive = torch.zeros(SEQ, SEQ, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return additive[None, None].expand(2, 1, -1, -1)


def single_run(name, docs, dtype):
    """The one-process model on the whole sequence; documents as explicit masks per layer type."""
    model = make_model(name, REFERENCE_ATTN.get(name, "sdpa")).to(dtype)
    ids = global_ids()
    mask = None
    if docs is not None:
        cfg = model.config
        window = getattr(cfg, "sliding_window", None) or None
        if getattr(cfg, "layer_types", None):
            mask = {
                t: reference_mask(docs, window if t == "sliding_attention" else None, dtype)
                for t in ("full_attention", "sliding_attention")
            }
        else:
            mask = reference_mask(docs, window, dtype)
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if docs is not None:
        labels[:, torch.tensor(docs[1:]) - 1] = -100
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    return dict(logits=logits.detach(), grads={n: p.grad for n, p in model.named_parameters() if p.grad is not None})


CASES = [  # (architecture, world, documents, layout, mode, feed-forward tile): each architecture at W = 2 and 3,
    # packed at one of them, tiled at one of them (0: untiled; local shards are 24 / 16 tokens)
    ("mistral", 2, None, "zigzag", "cache", 0),
    ("mistral", 3, DOCS, "zigzag", "cache", 5),
    ("gemma2", 2, DOCS, "zigzag", "cache", 0),
    ("gemma2", 3, None, "zigzag", "ckpt", 5),
    ("gemma3", 2, None, "zigzag", "ckpt", 7),
    ("gemma3", 3, DOCS, "zigzag", "cache", 0),
    ("gpt_oss", 2, DOCS, "zigzag", "ckpt", 7),
    ("gpt_oss", 3, None, "zigzag", "cache", 0),
    ("qwen2_moe", 2, None, "zigzag", "no-cache", 0),
    ("qwen2_moe", 3, DOCS, "zigzag", "cache", 5),
    ("qwen2_moe_window", 2, DOCS, "zigzag", "cache", 5),
    ("llama", 2, None, "zigzag", "ckpt", 0),
    ("llama", 2, DOCS, "contiguous", "ckpt", 7),
    ("llama", 2, None, "striped", "ckpt", 0),
    ("llama", 3, DOCS, "zigzag", "ckpt", 5),
    ("llama", 3, None, "striped", "no-cache", 0),
]


@pytest.mark.parametrize(
    "name,world,docs,layout,mode,tile",
    CASES,
    ids=[
        f"{n}-W{w}-{'packed' if d else 'one-doc'}-{lay}-{m}{f'-tile{t}' if t else ''}" for n, w, d, lay, m, t in CASES
    ],
)
def test_architecture_matches_single_process(cluster, name, world, docs, layout, mode, tile):
    make_config(name)  # skips an architecture the installed transformers lacks, before any rank starts
    family = name.removesuffix("_window")
    if family in REFUSED_HERE:  # this transformers hard-codes the family's attention (or builds its own mask)
        messages = cluster(world).run(refused_build, name)
        assert messages[0] is not None and all(m == messages[0] for m in messages), messages
        assert REFUSED_HERE[family] in messages[0], messages[0]
        pytest.skip(f"transformers {transformers.__version__}: {family} is refused ({REFUSED_HERE[family]}), checked")
    results = cluster(world).run(ring_run, name, docs, layout, mode, tile)
    ref, f32 = single_run(name, docs, torch.float64), single_run(name, docs, torch.float32)
    logits = torch.empty_like(f32["logits"])
    for r, res in enumerate(results):
        logits[:, global_indices(layout, r, world, SEQ)] = res["logits"]
    assert_within_budget(
        "logits",
        max_err(logits, ref["logits"]),
        max_err(f32["logits"], ref["logits"]),
        1e-6,
        ceiling=CEILINGS["float32"],
    )
    assert results[0]["grads"].keys() == ref["grads"].keys()
    for n, g in results[0]["grads"].items():
        assert_within_budget(
            n, max_err(g, ref["grads"][n]), max_err(f32["grads"][n], ref["grads"][n]), 1e-7, ceiling=CEILINGS["float32"]
        )


def forward_hops(name, window):
    """kv hops of one forward of a 2-layer Mistral: full attention, or a window of `window` tokens."""
    rw.use_ring(layout="contiguous")
    torch.manual_seed(0)
    cfg = make_config(name)
    cfg.sliding_window = window
    model = rw.from_config(cfg)
    batch = rw.shard_batch(global_ids())
    batch.pop("labels")
    with torch.no_grad(), count_comms() as c:
        model(**batch)
    return c.hops["kv"]


def test_window_layers_send_fewer_hops(cluster):
    """The layer's window reaches the ring: with contiguous shards a short window needs the previous shard only."""
    world, layers = 3, make_config("mistral").num_hidden_layers
    full = cluster(world).run(forward_hops, "mistral", None)
    windowed = cluster(world).run(forward_hops, "mistral", 3)
    assert full == [layers * (world - 1)] * world
    assert windowed == [layers] * world, (windowed, full)
