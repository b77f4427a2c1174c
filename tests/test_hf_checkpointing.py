"""Layer checkpointing's modes on a transformers model (ringwise.checkpointing.checkpoint_hf_layers, which
`ringwise finetune --checkpoint-layers [--save-attention] [--offload-activations]` calls): the same
results as no checkpointing, bit for bit in one process and across modes on a ring, within float32's
budget of the one-process float64 result at W = 1, 2, 3; save_attention never reruns a ring; the offload
hooks take each decoder layer's input, one per layer."""

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers import CEILINGS, assert_within_budget  # noqa: E402
from test_checkpointing import ring_calls  # noqa: E402, F401  (the fixture)
from test_finetune import checkpoint_and_text, config, train_job  # noqa: E402, F401  (fixture, job)

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise import SeqShard  # noqa: E402
from ringwise.checkpointing import checkpoint_hf_layers  # noqa: E402
from ringwise.testing.comms import count_comms  # noqa: E402

SEQ = 24  # zigzag at W = 2 (chunks of 6) and striped at W = 3
MODES = {
    "none": None,
    "checkpoint": (False, False),
    "save": (True, False),
    "offload": (False, True),
    "save+offload": (True, True),
}
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_dropout=0.0,
)


def build(mode, dtype, shard):
    torch.manual_seed(0)
    model = rw.from_config(transformers.LlamaConfig(**SMALL), shard=shard).to(dtype).train()
    offload = checkpoint_hf_layers(model, *MODES[mode]) if MODES[mode] else None
    return model, offload


def global_ids():
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))


def hf_gradients_per_mode(layout, dtype_name, modes):
    """On each rank, per mode: the loss and the summed gradients of the model's own loss on the ring, the
    forward ring hops, the offloaded bytes."""
    shard = SeqShard(layout)
    out = {}
    for mode in modes:
        model, offload = build(mode, getattr(torch, dtype_name), shard)
        batch = rw.shard_batch(global_ids(), shard=shard)
        with count_comms() as c:
            loss = model(**batch).loss
            loss.backward()
        total = loss.detach().clone()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if dist.is_initialized():
            dist.all_reduce(total), dist.all_reduce(grads)
        out[mode] = dict(loss=total, grads=grads, hops=c.hops["kv"], offloaded=offload and offload.bytes)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_in_one_process(mode, ring_calls, monkeypatch):  # noqa: F811
    """Bit-identical loss and gradients (float64); the ring runs once per layer in forward, again in the
    recompute unless save_attention; offload takes one tensor per layer, the layer's input."""
    ref = hf_gradients_per_mode("zigzag", "float64", ["none"])["none"]
    seen = []
    if MODES[mode] and MODES[mode][1]:
        from ringwise.checkpointing import ActivationOffload

        real = ActivationOffload._offload
        monkeypatch.setattr(ActivationOffload, "_offload", lambda self, lay, t: seen.append(t) or real(self, lay, t))
    ring_calls[0] = 0
    r = hf_gradients_per_mode("zigzag", "float64", [mode])[mode]
    assert torch.equal(r["loss"], ref["loss"]) and torch.equal(r["grads"], ref["grads"])
    layers = SMALL["num_hidden_layers"]
    assert ring_calls[0] == layers * (2 if mode in ("checkpoint", "offload") else 1)
    if seen:
        assert [tuple(t.shape) for t in seen] == [(2, SEQ, SMALL["hidden_size"])] * layers
        assert r["offloaded"] == layers * 2 * SEQ * SMALL["hidden_size"] * 8


@pytest.fixture(scope="module")
def reference(cluster):
    return {
        dt: cluster(1).run(hf_gradients_per_mode, "contiguous", dt, ["none"])[0]["none"]
        for dt in ("float64", "float32")
    }


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "zigzag"), (3, "striped")])
def test_every_mode_is_exact_on_a_ring(cluster, reference, world, layout):
    ref, f32 = reference["float64"], reference["float32"]
    results = cluster(world).run(hf_gradients_per_mode, layout, "float32", list(MODES))[0]
    for mode, r in results.items():
        for name, eps in (("grads", 1e-7), ("loss", 1e-6)):
            assert_within_budget(
                f"{mode} {name}", _err(r[name], ref[name]), _err(f32[name], ref[name]), eps, ceiling=CEILINGS["float32"]
            )
        assert torch.equal(r["loss"], results["none"]["loss"]) and torch.equal(r["grads"], results["none"]["grads"])
    hops = {mode: r["hops"] for mode, r in results.items()}
    rerun = SMALL["num_hidden_layers"] * (world - 1)
    assert hops["checkpoint"] == hops["offload"] == hops["none"] + rerun
    assert hops["save"] == hops["save+offload"] == hops["none"]


def counted_train_job(cfg_dict):
    """train_job, counting the forward ring's hops and the tensors the offload hooks took."""
    from ringwise.checkpointing import ActivationOffload

    packed, real = [0], ActivationOffload._offload

    def offload(self, layer, t):
        packed[0] += 1
        return real(self, layer, t)

    ActivationOffload._offload = offload  # type: ignore[method-assign]
    try:
        with count_comms() as c:
            losses = train_job(cfg_dict)
    finally:
        ActivationOffload._offload = real  # type: ignore[method-assign]
    return losses, c.hops["kv"], packed[0]


def test_finetune_wires_the_modes(cluster, checkpoint_and_text, tmp_path):  # noqa: F811
    """`ringwise finetune` at W = 2: with --save-attention and --offload-activations the three steps'
    losses are --checkpoint-layers alone's, bit for bit; the ring runs fewer forward hops (no recompute
    reruns one) and the offload hooks took checkpoints."""
    model, text = checkpoint_and_text
    runs = {}
    for name, kw in {
        "checkpoint": dict(checkpoint_layers=True),
        "save+offload": dict(checkpoint_layers=True, save_attention=True, offload_activations=True),
    }.items():
        runs[name] = cluster(2).run(counted_train_job, vars(config(model, text, tmp_path / name, **kw)))[0]
    (plain, plain_hops, plain_packed), (modes, modes_hops, modes_packed) = runs["checkpoint"], runs["save+offload"]
    assert len(plain) == 3 and modes == plain
    assert modes_hops < plain_hops and plain_packed == 0 < modes_packed
