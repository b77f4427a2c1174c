"""The model's own loss, `model(**batch, labels=...).loss` (what transformers' Trainer reads), on a model
configured for ringwise: rw.causal_lm_loss's share on every rank (no second shift; over the ring's label
count, or num_items_in_batch), whose sum and summed gradients equal one process's
`model(input_ids, labels=input_ids)`; or the same error on every rank, never another number."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, max_err  # noqa: E402
from hf_models import needs_smollm2, smollm2_folder  # noqa: E402
from hf_versions import EAGER_EXPERTS  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise import SeqShard  # noqa: E402

SEQ, DOCS, N_ITEMS = 24, [0, 5, 6, 17, 24], 37  # 24 splits for zigzag and striped at W = 2 and 3
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_dropout=0.0,
)


def make_config():
    return transformers.LlamaConfig(**SMALL)


def global_ids():
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))


def without_labels(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def loss_case(case):
    """On every rank: the model's loss three ways (shard_batch's labels, shift_labels, num_items_in_batch) beside
    rw.causal_lm_loss, and the summed gradients of the first; or (kind "refuse") what unshifted labels get."""
    shard = SeqShard(case["layout"])
    torch.manual_seed(0)
    model = rw.from_config(make_config(), shard=shard)
    batch = rw.shard_batch(global_ids(), cu_seqlens=case["docs"], shard=shard)
    labels = batch["labels"]
    if case["kind"] == "refuse":
        return refusals(model, batch, shard)
    out = model(**batch)  # the labels shard_batch returned, passed as they are
    want = rw.causal_lm_loss(out.logits, labels, shard=shard)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    with torch.no_grad():
        shifted = model(**without_labels(batch), labels=labels.clone(), shift_labels=labels.clone()).loss
        n_items = model(**batch, num_items_in_batch=torch.tensor(N_ITEMS)).loss
        local_sum = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return dict(
        loss=out.loss.item(),
        want=want.item(),
        shifted=shifted.item(),
        n_items=n_items.item(),
        local_sum=local_sum.item(),
        grads=grads,
    )


def refusals(model, batch, shard):
    """Unshifted labels (a collator's copy of input_ids) on every rank, then on rank 1 only: each rank's error
    and how long it took; then a good step, which shows the ranks are still in step."""
    rank, messages, seconds = dist.get_rank(), [], []
    for bad in ("every rank", "rank 1"):
        labels = batch["input_ids"].clone() if bad == "every rank" or rank == 1 else batch["labels"]
        start = time.perf_counter()
        try:
            model(**without_labels(batch), labels=labels).loss.backward()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
        seconds.append(time.perf_counter() - start)
    model.zero_grad()
    out = model(**batch)
    return dict(
        messages=messages,
        seconds=seconds,
        after=out.loss.item(),
        want=rw.causal_lm_loss(out.logits, batch["labels"], shard=shard).item(),
    )


GRID = [
    dict(world=W, layout=layout, docs=docs, kind=kind)
    for W in (2, 3)
    for layout in ("zigzag", "striped")
    for docs in (None, DOCS)
    for kind in ("exact", "refuse")
    if kind == "exact" or docs is None
]


def case_id(c):
    return f"W{c['world']}-{c['layout']}-{'packed' if c['docs'] else 'one-doc'}"


def single_loss(docs, dtype):
    """One process, transformers' own loss: model(input_ids, labels=input_ids) (documents: a block mask, and the
    first token of each later document is no target); the loss and every parameter gradient."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="sdpa").to(dtype)
    ids, mask, labels = global_ids(), None, global_ids()
    if docs is not None:
        doc = torch.repeat_interleave(torch.arange(len(docs) - 1), torch.tensor(docs).diff())
        mask = (doc[:, None] == doc[None, :]) & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        mask = mask[None, None].expand(ids.shape[0], 1, SEQ, SEQ)
        labels[:, docs[1:-1]] = -100
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", [c for c in GRID if c["kind"] == "exact"], ids=case_id)
def test_model_loss_is_the_exact_share(grid_results, case):
    results = grid_results(loss_case, GRID, case)
    for r in results:
        assert r["loss"] == r["want"], (r["loss"], r["want"])  # rw.causal_lm_loss's share on this rank
        assert r["shifted"] == r["want"], (r["shifted"], r["want"])  # shift_labels=: used as they are
        assert r["n_items"] == pytest.approx(r["local_sum"] / N_ITEMS, rel=1e-6)  # num_items_in_batch honoured
    ref, ref_grads = single_loss(case["docs"], torch.float64)
    f32, f32_grads = single_loss(case["docs"], torch.float32)
    total = torch.tensor(sum(r["loss"] for r in results), dtype=torch.float64)
    assert_within_budget("loss", max_err(total, ref), max_err(f32, ref), 1e-6, ceiling=CEILINGS["float32"])
    for n, g in results[0]["grads"].items():
        assert_within_budget(
            n, max_err(g, ref_grads[n]), max_err(f32_grads[n], ref_grads[n]), 1e-7, ceiling=CEILINGS["float32"]
        )


@pytest.mark.parametrize("case", [c for c in GRID if c["kind"] == "refuse"], ids=case_id)
def test_unshifted_labels_are_refused_alike_on_every_rank(grid_results, case):
    """A copy of input_ids as labels (transformers would shift it again inside each shard) is refused with one
    message on every rank, within seconds, also when only one rank passes it; the ranks stay in step."""
    results = grid_results(loss_case, GRID, case)
    for i, who in enumerate(("every rank", "rank 1 only")):
        messages = [r["messages"][i] for r in results]
        assert messages[0] is not None and all(m == messages[0] for m in messages), (who, messages)
        assert "rw.shard_batch" in messages[0] and "shift_labels" in messages[0], messages[0]
        assert "rw.causal_lm_loss" in messages[0], messages[0]
        assert max(r["seconds"][i] for r in results) < 10, (who, [r["seconds"] for r in results])
    assert "on 1 of the ring's" in results[0]["messages"][1], results[0]["messages"][1]
    for r in results:
        assert r["after"] == r["want"]


def made_run(folder):
    """The loss of models ringwise configured four ways (each on its own ring's sharding): (model loss,
    rw.causal_lm_loss) per way."""
    rw.use_ring(layout="zigzag")
    cfg = make_config()
    plain = lambda: transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=rw.NAME)  # noqa: E731
    torch.manual_seed(0)
    configured = plain()
    rw.configure(configured, SeqShard("striped"))
    torch.manual_seed(0)
    checked = plain()
    rw.check_model(checked)
    models = dict(
        from_config=rw.from_config(cfg, shard=SeqShard("striped")),
        from_pretrained=rw.from_pretrained(folder),
        configure=configured,
        check_model=checked,
    )
    got = {}
    for how, model in models.items():
        shard = rw.shard_of(model)
        batch = rw.shard_batch(global_ids(), cu_seqlens=DOCS, shard=shard)
        with torch.no_grad():
            out = model(**batch)
            got[how] = (out.loss.item(), rw.causal_lm_loss(out.logits, batch["labels"], shard=shard).item())
    return got


def test_every_way_of_configuring_a_model_gives_it_the_ring_loss(cluster, tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(make_config()).save_pretrained(tmp_path)
    for got in cluster(2).run(made_run, str(tmp_path)):
        assert got.keys() == {"from_config", "from_pretrained", "configure", "check_model"}
        for how, (loss, want) in got.items():
            assert loss == want, (how, loss, want)


class InlineLossForCausalLM(transformers.LlamaForCausalLM):
    """A model whose forward computes its loss itself, not through self.loss_function."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return out


class NoSetterForCausalLM(transformers.LlamaForCausalLM):
    """A model whose loss_function cannot be set (as on a transformers without the setter)."""

    loss_function = property(transformers.PreTrainedModel.loss_function.fget)


@pytest.mark.parametrize(
    "cls,why",
    [(InlineLossForCausalLM, "computed its loss without model.loss_function"), (NoSetterForCausalLM, "has no setter")],
    ids=["inline-loss", "no-setter"],
)
def test_a_loss_not_computed_by_the_ring_loss_is_refused(cls, why):
    """No family of test_hf_families computes its loss inline on transformers 5.25 (each calls
    self.loss_function); a model that does, or one whose loss_function cannot be set, is refused (its class
    decides, so every rank alike), and without labels it runs."""
    rw.use_ring()
    torch.manual_seed(0)
    model = cls._from_config(make_config(), attn_implementation=rw.NAME)
    rw.configure(model, SeqShard())
    batch = rw.shard_batch(global_ids())
    assert model(**without_labels(batch)).loss is None
    with pytest.raises(ValueError, match=why) as e:
        model(**batch)
    assert "rw.causal_lm_loss" in str(e.value)


def test_a_loss_changed_after_the_ring_loss_is_refused():
    """Mixtral with output_router_logits adds its load-balancing loss (this rank's tokens only) to the loss."""
    rw.use_ring()
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    model = rw.from_config(cfg, **EAGER_EXPERTS)
    batch = rw.shard_batch(global_ids())
    with pytest.raises(ValueError, match="changed the loss after its loss_function returned it"):
        model(**batch)
    out = model(**batch, output_router_logits=False)
    assert out.loss.item() == rw.causal_lm_loss(out.logits, batch["labels"]).item()


# ---------------------------------------------------------------- a real model: SmolLM2-135M


def smollm2_loss(path, seq):
    """model(**batch).loss, labels left in the batch as shard_batch made them, on this rank: its share."""
    rw.use_ring(layout="zigzag")
    model = rw.from_pretrained(path).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(**rw.shard_batch(ids)).loss.item()


@needs_smollm2
@pytest.mark.parametrize("world", [2, 3])
def test_smollm2_model_loss_sums_to_one_process(cluster, world):
    path, seq = smollm2_folder(), 384
    shares = cluster(world).run(smollm2_loss, path, seq, timeout=600)
    ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids).loss.item()
    assert abs(sum(shares) - want) <= 1e-5 * want, (shares, want)
