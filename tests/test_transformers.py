"""Real transformers models (random tiny configs) run sequence-parallel through the registry:
logits and every parameter gradient equal the one-process SDPA model within float32 round-off."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, max_err  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402

SEQ = 24


def make_config(name):
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
    )
    if name == "llama":
        return transformers.LlamaConfig(**common)
    if name == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    if name == "mistral":
        return transformers.MistralConfig(sliding_window=4096, **common)  # a window longer than the sequence
    raise ValueError(name)


def make_model(name, attn, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(make_config(name), attn_implementation=attn)


def global_ids(seed=1):
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def ring_run(name, docs, mesh=None):
    """This rank's logits and the summed gradients, on a ring (mesh None) or a (U, R) Ulysses x ring mesh."""
    ug = rg = None
    if mesh is not None:
        from ringwise.attention.ulysses import mesh_groups

        ug, rg = mesh_groups(*mesh)
    rw.use_ring(group=rg, layout="zigzag", ulysses_group=ug)
    model = make_model(name, "ringwise")
    batch = rw.shard_batch(global_ids(), cu_seqlens=docs)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    rw.causal_lm_loss(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    rw.use_ring()  # later tests on this cluster use the plain ring
    return dict(logits=logits.detach(), grads=grads, u=dist.get_rank(ug) if ug else 0, r=dist.get_rank(rg))


def single_run(name, docs, dtype):
    """The one-process SDPA model on the whole sequence (documents as a 4-D block mask)."""
    model = make_model(name, "sdpa").to(dtype)
    ids = global_ids()
    mask = None
    if docs is not None:
        lengths = torch.tensor(docs[1:]) - torch.tensor(docs[:-1])
        doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        mask = ((doc[:, None] == doc[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril())[None, None]
        mask = mask.expand(ids.shape[0], 1, SEQ, SEQ)
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    if docs is not None:
        labels[:, torch.tensor(docs[1:]) - 1] = -100
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return dict(logits=logits.detach(), grads={n: p.grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("docs", [None, [0, 5, 6, 17, 24]], ids=["one-doc", "packed"])
def test_model_matches_single_process_sdpa(cluster, world, name, docs):
    if world == 3 and SEQ % 6:
        pytest.skip()
    results = cluster(world).run(ring_run, name, docs)
    ref, f32 = single_run(name, docs, torch.float64), single_run(name, docs, torch.float32)
    from ringwise.attention.layout import global_indices

    logits = torch.empty_like(f32["logits"])
    for r, res in enumerate(results):
        logits[:, global_indices("zigzag", r, world, SEQ)] = res["logits"]
    assert_within_budget(
        "logits",
        max_err(logits, ref["logits"]),
        max_err(f32["logits"], ref["logits"]),
        1e-6,
        ceiling=CEILINGS["float32"],
    )
    for n, g in results[0]["grads"].items():
        assert_within_budget(
            n, max_err(g, ref["grads"][n]), max_err(f32["grads"][n], ref["grads"][n]), 1e-7, ceiling=CEILINGS["float32"]
        )


@pytest.mark.parametrize("mesh", [(2, 2), (4, 1)], ids=["U2xR2", "U4xR1"])
@pytest.mark.parametrize("docs", [None, [0, 5, 6, 17, 24]], ids=["one-doc", "packed"])
def test_model_on_a_ulysses_ring_mesh_matches_single_process(cluster, mesh, docs):
    """use_ring(ulysses_group=): Llama (4 query / 2 kv heads) on Ulysses x ring meshes."""
    from ringwise.attention.layout import global_indices

    U, R = mesh
    results = cluster(U * R).run(ring_run, "llama", docs, mesh)
    ref, f32 = single_run("llama", docs, torch.float64), single_run("llama", docs, torch.float32)
    logits = torch.empty_like(f32["logits"])
    for res in results:
        logits[:, global_indices("zigzag", res["r"], R, SEQ, res["u"], U)] = res["logits"]
    assert_within_budget(
        "logits",
        max_err(logits, ref["logits"]),
        max_err(f32["logits"], ref["logits"]),
        1e-6,
        ceiling=CEILINGS["float32"],
    )
    for n, g in results[0]["grads"].items():
        assert_within_budget(
            n, max_err(g, ref["grads"][n]), max_err(f32["grads"][n], ref["grads"][n]), 1e-7, ceiling=CEILINGS["float32"]
        )


def test_model_outside_the_registry_is_refused():
    rw.use_ring()
    rw.check_model(make_model("llama", "ringwise"))
    with pytest.raises(ValueError, match="does not route its attention through ringwise"):
        rw.check_model(make_model("llama", "sdpa"))


def test_padding_mask_is_refused():
    rw.use_ring()
    ids = torch.randint(0, 64, (1, 8))
    model = make_model("llama", "ringwise")
    with pytest.raises(ValueError, match="padding masks"):
        model(input_ids=ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
