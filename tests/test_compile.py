"""torch.compile(fullgraph=True) around ring attention: one opaque operator with its own autograd.

Every path (causal/full, every layout, GQA, packed documents, window, sinks, softcap, Ulysses)
compiled gives the eager op's result, and both stay within 2x the single-device kernel's error
against the float64 reference on the whole sequence (tests/helpers.py); ringwise's model and a
transformers Llama compile whole. One cluster job per world size runs every case (compiling is the slow
part: aot_eager, inductor in the training run).
"""

import pytest
import torch
import torch.distributed as dist
from helpers import CEILINGS, EPS, assert_within_budget, count_comms, reference_attention, visible_mask

import ringwise


def _cases(W):
    layouts = [(lay, causal) for lay in ringwise.LAYOUTS for causal in (False, True)]
    cases = [dict(layout=lay, causal=causal, heads=4, kv_heads=2, dtype="float32") for lay, causal in layouts]
    total = 24 * W
    cases += [
        dict(layout="zigzag", causal=True, heads=4, kv_heads=1, dtype="bfloat16"),
        dict(layout="striped", causal=True, heads=4, kv_heads=2, dtype="float32", cu_seqlens=[0, 5, 6, total]),
        dict(layout="zigzag", causal=True, heads=4, kv_heads=2, dtype="float32", window=7),
        dict(layout="contiguous", causal=True, heads=4, kv_heads=4, dtype="float32", sinks=True),
        dict(layout="zigzag", causal=False, heads=2, kv_heads=2, dtype="float32", softcap=3.0),
        # the interval masks (docs/masks.md): image groups, a bidirectional window, chunks
        dict(layout="zigzag", causal=True, heads=4, kv_heads=2, dtype="float32", group_ids=_images(total)),
        dict(layout="striped", causal=False, heads=4, kv_heads=2, dtype="float32", window=(5, 3)),
        dict(layout="contiguous", causal=True, heads=2, kv_heads=1, dtype="float32", chunk=10, window=4),
    ]
    return cases


def _images(total):
    """Group ids over the global sequence: two images, one across the middle."""
    ids = [-1] * total
    for g, (a, b) in enumerate(((2, 9), (total // 2 - 5, total // 2 + 6))):
        ids[a:b] = [g] * (b - a)
    return ids


def _inputs(case, total, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk, d = case["heads"], case["kv_heads"], 16
    q, dout = (torch.randn(1, total, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, total, hk, d, generator=g, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(h, generator=g, dtype=torch.float64) if case.get("sinks") else None
    return q, k, v, dout, sinks


def _options(case, **groups):
    opts = dict(causal=case["causal"], layout=case["layout"], **groups)
    for name in ("cu_seqlens", "window", "softcap", "chunk", "group_ids"):
        if case.get(name) is not None:
            opts[name] = case[name]
    return opts


def _run(fn, q, k, v, sinks, dout, dt, shard):
    """fn's out and gradients on this rank's shard, in dtype dt."""
    leaves = [shard(x.to(dt)).requires_grad_() for x in (q, k, v)]
    s = sinks.to(dt).requires_grad_() if sinks is not None else None
    out = fn(*leaves, s)
    grads = torch.autograd.grad(out, leaves + ([s] if s is not None else []), shard(dout.to(dt)))
    return [out.detach()] + [g.detach() for g in grads]


def compiled_vs_eager(W, ulysses=False):
    """For every case: (max error vs the float64 reference of eager, of compiled, of the one-process kernel)."""
    from ringwise.attention.layout import global_indices
    from ringwise.attention.ulysses import mesh_groups

    ug, rg = mesh_groups(2, W // 2) if ulysses else (None, None)
    alone, _ = dist.new_subgroups_by_enumeration([[r] for r in range(W)])  # the one-process truth and budget
    groups = dict(group=rg, ulysses_group=ug) if ulysses else {}
    report = []
    for i, case in enumerate(_cases(W)):
        total = 24 * W
        q, k, v, dout, sinks = _inputs(case, total, seed=100 + i)
        dt = getattr(torch, case["dtype"])
        opts = _options(case, **groups)
        shard = lambda x: ringwise.shard(x, 1, case["layout"], rg, ulysses_group=ug)  # noqa: E731

        def attn(q, k, v, s, opts=opts):
            return ringwise.ring_attention(q, k, v, sinks=s, **opts)

        torch._dynamo.reset()
        eager = _run(attn, q, k, v, sinks, dout, dt, shard)
        compiled = _run(torch.compile(attn, fullgraph=True, backend="aot_eager"), q, k, v, sinks, dout, dt, shard)
        # the float64 whole-sequence truth, and the single-device kernel's error (the budget)
        # the truth: float64 softmax attention on the whole sequence (helpers' reference)
        mask = visible_mask(
            total, case["causal"], case.get("window"), case.get("cu_seqlens"), case.get("chunk"), case.get("group_ids")
        )

        def truth(q, k, v, s):
            return reference_attention(q, k, v, mask=mask, sinks=s, softcap=case.get("softcap"))[0]

        whole = _run(truth, q, k, v, sinks, dout, torch.float64, lambda x: x)
        single = lambda *a: ringwise.ring_attention(*a[:3], sinks=a[3], **_options(case, group=alone))  # noqa: E731
        kernel = _run(single, q, k, v, sinks, dout, dt, lambda x: x)
        idx = global_indices(
            case["layout"],
            dist.get_rank(rg),
            dist.get_world_size(rg),
            total,
            dist.get_rank(ug) if ug else 0,
            dist.get_world_size(ug) if ug else 1,
        )
        errs = []
        for j, (e, c, t, kk) in enumerate(zip(eager, compiled, whole, kernel)):
            local = (lambda x: x[:, idx]) if j < 4 else (lambda x: x)  # sinks' gradient: summed below
            if j == 4:  # every rank holds its share of d(sinks): sum over the mesh
                e, c = e.double().clone(), c.double().clone()
                dist.all_reduce(e), dist.all_reduce(c)
            errs.append(tuple((a.double() - local(t)).abs().max().item() for a in (e, c, local(kk))))
        report.append((case, errs, all(torch.equal(a, b) for a, b in zip(eager, compiled))))
    return report


@pytest.mark.parametrize("W,ulysses", [(2, False), (3, False), (4, True)], ids=["W2", "W3", "U2xR2"])
def test_every_path_compiled_equals_eager_within_the_kernel_budget(cluster, W, ulysses):
    reports = cluster(W).run(compiled_vs_eager, W, ulysses, timeout=600)
    for report in reports:
        for case, errs, identical in report:
            for name, (eager, compiled, kernel) in zip(("out", "dq", "dk", "dv", "dsinks"), errs):
                for what, err in (("eager", eager), ("compiled", compiled)):
                    assert_within_budget(
                        f"{case} {name} {what}", err, kernel, EPS[case["dtype"]], ceiling=CEILINGS[case["dtype"]]
                    )
            assert identical, f"compiled differs from eager (aot_eager runs the same op): {case}"


def model_step(compile_model):
    """Loss and gradients of ringwise's tiny model on a ring, eager or torch.compile(fullgraph=True)."""
    from ringwise.model import Transformer, model_config

    torch.manual_seed(0)
    model = Transformer(model_config("tiny"))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32 * dist.get_world_size()))
    labels = torch.roll(ids, -1, 1)
    pos = ringwise.positions(ids.shape[1], "zigzag")
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_model else model
    torch._dynamo.reset()
    with count_comms() as c:
        loss, n = run(ringwise.shard(ids, 1), pos, ringwise.shard(labels, 1))
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], dict(c.hops)


def test_ringwise_model_compiles_whole(cluster):
    """The tiny model under torch.compile(fullgraph=True) (aot_eager; inductor runs in the
    `train --compile` test): the ring's hops are the eager ones, loss and every gradient match
    eager to float32 rounding."""
    c = cluster(2)
    eager, compiled = c.run(model_step, False, timeout=300), c.run(model_step, True, timeout=600)
    for (le, ge, he), (lc, gc, hc) in zip(eager, compiled):
        assert he == hc and he["kv"] > 0
        assert torch.allclose(le, lc, rtol=1e-5, atol=1e-6), (le, lc)
        for a, b in zip(ge, gc):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def hf_logits(compile_model):
    """A small transformers Llama with ringwise attention on a ring of 2, eager or compiled."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    import ringwise.integrations.transformers as rw

    rw.use_ring()
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = rw.from_config(cfg).eval()
    ids = torch.randint(0, 97, (1, 32 * dist.get_world_size()))
    batch = rw.shard_batch(ids)
    batch.pop("labels")
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_model else model
    torch._dynamo.reset()
    with torch.no_grad():
        return run(**batch).logits


def test_transformers_llama_compiles_with_ringwise_attention(cluster):
    pytest.importorskip("transformers")
    c = cluster(2)
    eager, compiled = c.run(hf_logits, False, timeout=300), c.run(hf_logits, True, timeout=600)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


MASKED_FAMILIES = ("mistral", "gemma3", "gpt_oss", "llama4")  # windows, local/global layers with sinks, chunks


def hf_masked_logits(names):
    """Small transformers models whose masks are closures built inside the graph (sliding windows, chunks) on a
    ring of 2: {name: (eager logits, compiled logits)}. The closures are read through ringwise's tags."""
    from hf_models import make_config

    import ringwise.integrations.transformers as rw

    rw.use_ring()
    results = {}
    for name in names:
        cfg = make_config(name)
        torch.manual_seed(0)
        model = rw.from_config(cfg).eval()
        ids = torch.randint(3, 64, (1, 24 * dist.get_world_size()), generator=torch.Generator().manual_seed(1))
        batch = rw.shard_batch(ids)
        batch.pop("labels")
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(**batch).logits
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch).logits
        results[name] = (eager, compiled)
    return results


def test_transformers_masks_read_inside_a_compiled_graph(cluster):
    """Sliding-window (Mistral), local/global (Gemma 3, GPT-OSS with sinks) and chunked (Llama 4) models compile
    whole (fullgraph) on a ring of 2 and give the eager ring's logits bit for bit: their mask closures, built
    inside the graph where Dynamo cannot read closure cells, are read from ringwise's tags."""
    pytest.importorskip("transformers")
    for rank in cluster(2).run(hf_masked_logits, MASKED_FAMILIES, timeout=600):
        for name, (eager, compiled) in rank.items():
            assert torch.equal(eager, compiled), name


def hf_hybrid_logits(names):
    """Hybrid models (short convolutions, gated delta rules, Mamba2 and Mamba scans) on a ring of 2, eager and
    compiled: {name: (eager logits, compiled logits)}; names are "test_module:family". Their sharded layers run
    eager inside the graph (a graph break)."""
    import importlib

    from hf_versions import EAGER_EXPERTS

    import ringwise.integrations.transformers as rw

    rw.use_ring(layout="zigzag")
    results = {}
    for name in names:
        tests, family = name.split(":")
        module = importlib.import_module(tests)
        torch.manual_seed(0)
        model = rw.from_config(module.make_config(family), **EAGER_EXPERTS).eval()
        batch = rw.shard_batch(module.global_ids())
        batch.pop("labels")
        torch._dynamo.reset()
        with torch.no_grad():
            eager = model(**batch, use_cache=False).logits
            compiled = torch.compile(model, backend="aot_eager")(**batch, use_cache=False).logits
        results[name] = (eager, compiled)
    return results


def test_hybrid_models_compile_with_their_sharded_layers_eager(cluster):
    """LFM2 (short convolutions), Qwen3-Next (gated delta rule, MoE), Bamba (Mamba2 SSD) and Jamba (Mamba, whose
    documents reach the mixers through the model's hooks) under torch.compile on a ring of 2 give the eager ring's
    logits bit for bit: the sharded layers run eager (their cross-rank agreement cannot be traced)."""
    pytest.importorskip("transformers")
    names = ("test_hf_linear:lfm2", "test_hf_linear:qwen3_next", "test_hf_ssd:bamba", "test_hf_ssm:jamba")
    for rank in cluster(2).run(hf_hybrid_logits, names, timeout=600):
        for name, (eager, compiled) in rank.items():
            assert torch.equal(eager, compiled), name


def test_untagged_mask_closure_is_refused_under_compile():
    """A factory closure ringwise did not tag cannot be read in a graph: refused with the reason, not misread."""
    pytest.importorskip("transformers")
    from transformers import masking_utils as mu

    from ringwise.integrations import hf_masks

    hf_masks.tag_mask_factories()
    untagged = mu.sliding_window_overlay.__ringwise_untagged__

    def read(x):
        try:
            hf_masks.read_mask_function(mu.and_masks(untagged(8), mu.causal_mask_function))
        except ValueError as e:
            return x + (1 if "cannot read the mask closure" in str(e) else 2)
        return x

    def read_tagged(x):
        return x + hf_masks.read_mask_function(mu.and_masks(mu.sliding_window_overlay(8), mu.causal_mask_function)).left

    torch._dynamo.reset()
    x = torch.zeros(1)
    assert torch.compile(read, fullgraph=True, backend="eager")(x).item() == 1
    assert torch.compile(read_tagged, fullgraph=True, backend="eager")(x).item() == 7


def test_op_is_one_node_in_the_graph():
    """dynamo sees ringwise.attention as one call (no graph break, no inlined ring)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    q = torch.randn(1, 8, 2, 8)
    torch._dynamo.reset()
    torch.compile(lambda q: ringwise.ring_attention(q, q, q, causal=True) * 2, fullgraph=True, backend=backend)(q)
    assert sum("ringwise.attention" in s for s in seen) == 1, seen


def test_train_compile_flag_trains_the_same_first_step(tmp_path):
    """`ringwise train --compile` (inductor, each block fullgraph) on a ring of 2: the first step runs
    eager (validated), the second's loss is the compiled forward's, the third's follows the compiled
    backward's update; all equal the eager run's to float32 rounding, and the run completes."""
    import json

    from ringwise.cli import main

    def first_losses(name, *extra):
        out = tmp_path / name
        assert (
            main(
                [
                    "train",
                    "--world",
                    "2",
                    "--model",
                    "tiny",
                    "--seq-len",
                    "64",
                    "--batch",
                    "2",
                    "--steps",
                    "3",
                    "--eval-per-cell",
                    "1",
                    "--eval-lengths",
                    "64",
                    "--no-plots",
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    eager, compiled = first_losses("eager"), first_losses("compiled", "--compile")
    assert len(compiled) == 3 and all(abs(e - c) <= 1e-5 * abs(e) for e, c in zip(eager, compiled)), (eager, compiled)
    assert len(set(eager)) == 3, eager  # the steps changed the model: the later losses test the compiled graphs


def test_inductor_passes_every_argument_of_the_backward_op():
    """Inductor's generated backward calls ringwise.attention_backward with every scalar argument
    (a non-optional int argument was once dropped from its call): window and documents, fwd+bwd,
    equal to eager to float32 rounding."""
    q, k, v = (torch.randn(1, 32, 4, 16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return ringwise.ring_attention(q, k, v, causal=True, window=3, cu_seqlens=[0, 5, 32]).sum()

    torch._dynamo.reset()
    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v)), torch.autograd.grad(compiled, (q, k, v))):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(eager.detach(), compiled.detach(), rtol=1e-5, atol=1e-5)
