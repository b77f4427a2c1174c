"""Layer checkpointing's modes (ringwise.checkpointing): --save-attention keeps attention's outputs so a
layer's recompute never reruns its ring (nor the feed-forward's chunks); --offload-activations moves
each layer's checkpoint off the device in forward and brings it back one layer ahead in backward. Every
mode gives the results of no checkpointing, bit for bit in one process and across modes on a ring, and
the one-process float64 result within float32's budget at W = 1, 2, 3."""

import gc

import pytest
import torch
from helpers import CEILINGS, assert_within_budget, train_args

from ringwise.attention import api
from ringwise.checkpointing import ActivationOffload, in_layer_recompute
from ringwise.model import FeedForward, Transformer, model_config
from ringwise.testing.comms import count_comms
from ringwise.train import compute_gradients, make_mesh, shard_model, task_for
from ringwise.train.loop import Run

MODES = {
    "none": {},
    "checkpoint": dict(checkpoint_layers=True),
    "save": dict(checkpoint_layers=True, save_attention=True),
    "offload": dict(checkpoint_layers=True, offload_activations=True),
    "save+offload": dict(checkpoint_layers=True, save_attention=True, offload_activations=True),
}


def batch(seq=40, b=2, vocab=264):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (b, seq), generator=g)
    labels = torch.randint(0, vocab, (b, seq), generator=g)
    return ids, torch.arange(seq), labels


def one_process(mode, dtype=torch.float64, **overrides):
    """(loss, flat gradients, the model) of one forward and backward of the tiny model in one process."""
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", ffn_chunk=16, loss_chunk=16, **MODES[mode], **overrides)).to(dtype)
    loss, _ = model(*batch())
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), model


@pytest.fixture
def ring_calls(monkeypatch):
    """How many times the forward ring ran (api.ring_forward: the forward op's body on a plain ring)."""
    calls = [0]
    real = api.ring_forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "ring_forward", counted)
    return calls


@pytest.fixture
def ffn_chunk_calls(monkeypatch):
    """How many times a feed-forward chunk ran (FeedForward.swiglu: one blockwise chunk)."""
    calls = [0]
    real = FeedForward.swiglu

    def counted(self, x):
        calls[0] += 1
        return real(self, x)

    monkeypatch.setattr(FeedForward, "swiglu", counted)
    return calls


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_is_bit_identical_and_runs_the_ring_as_promised(mode, ring_calls, ffn_chunk_calls):
    """Loss and every gradient equal no checkpointing's bit for bit (float64); the forward ring runs once
    per layer, twice with plain checkpointing (forward and recompute), once again with save_attention.
    Each feed-forward chunk runs twice (forward, its own recompute) without layer checkpointing and with
    save_attention (the layer's recompute rebuilds the chunks' inputs, not the chunks); plain
    checkpointing's layer recompute reruns all chunks but the last (torch's early stop ends it once the
    last chunk's input, the layer's last saved tensor, is rebuilt)."""
    ref_loss, ref_grads, _ = one_process("none")
    ring_calls[0] = ffn_chunk_calls[0] = 0
    loss, grads, model = one_process(mode)
    assert torch.equal(loss, ref_loss) and torch.equal(grads, ref_grads)
    layers = model.cfg.n_layers
    recomputes = mode in ("checkpoint", "offload")
    assert ring_calls[0] == layers * (2 if recomputes else 1)
    chunks = -(-batch()[0].shape[1] // model.cfg.ffn_chunk)  # 40 tokens in chunks of 16: 3
    assert ffn_chunk_calls[0] == layers * (3 * chunks - 1 if recomputes else 2 * chunks)


@pytest.mark.parametrize("mode", ["save", "save+offload"])
def test_save_attention_without_early_stop_is_still_exact(mode, ffn_chunk_calls):
    """With torch's early stop off the layer's recompute runs to the layer's end: the placeholder outputs
    of the chunks it left out reach the residual add, whose output the recompute throws away. Same bits,
    still two runs per chunk."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    ref_loss, ref_grads, _ = one_process("none")
    ffn_chunk_calls[0] = 0
    with set_checkpoint_early_stop(False):
        loss, grads, model = one_process(mode)
    assert torch.equal(loss, ref_loss) and torch.equal(grads, ref_grads)
    chunks = -(-batch()[0].shape[1] // model.cfg.ffn_chunk)
    assert ffn_chunk_calls[0] == model.cfg.n_layers * 2 * chunks


def test_only_a_save_attention_layer_recompute_leaves_the_chunks_out(monkeypatch):
    """in_layer_recompute() is False in forward, in a feed-forward chunk's own recompute and after
    backward; True only inside the layers' recomputes, where the feed-forward runs no chunk."""
    seen = []
    forward, swiglu = FeedForward.forward, FeedForward.swiglu

    def recording_forward(self, x, inputs_only=False):
        seen.append(("ffn", inputs_only))
        return forward(self, x, inputs_only)

    def recording_swiglu(self, x):
        seen.append(("chunk", in_layer_recompute()))
        return swiglu(self, x)

    monkeypatch.setattr(FeedForward, "forward", recording_forward)
    monkeypatch.setattr(FeedForward, "swiglu", recording_swiglu)
    torch.manual_seed(0)
    model = Transformer(model_config("tiny", ffn_chunk=16, loss_chunk=16, **MODES["save"])).double()
    loss, _ = model(*batch())
    per_layer = [("ffn", False)] + [("chunk", False)] * 3  # 40 tokens in chunks of 16
    assert seen == per_layer * model.cfg.n_layers
    seen.clear()
    loss.backward()
    # backward, last layer first: its recompute (the chunks' inputs only), then its chunks' own recomputes
    assert seen == ([("ffn", True)] + [("chunk", False)] * 3) * model.cfg.n_layers
    assert not in_layer_recompute()


class Recording(ActivationOffload):
    """ActivationOffload that also keeps what it was handed (for the test only: it holds the tensors)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def _offload(self, layer, t):
        self.seen.append(t)
        return super()._offload(layer, t)


@pytest.mark.parametrize("save_attention", [False, True])
def test_offload_takes_exactly_the_layer_inputs_and_prefetches_one_layer_ahead(save_attention):
    """The hooks move each checkpoint: one tensor per layer, the layer's input itself, and nothing else;
    backward hands each back once, every layer's but the last one fetched ahead (while the layer after
    it recomputes); the bytes counted are the inputs'. Two steps in a row: the count per step holds
    and the host copies are let go with the graph."""
    torch.manual_seed(0)
    mode = "save+offload" if save_attention else "offload"
    model = Transformer(model_config("base", ffn_chunk=16, loss_chunk=16, **MODES[mode])).double()
    inputs = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append(args[0]), with_kwargs=True)
    model.offload = offload = Recording()
    L, (ids, pos, labels) = model.cfg.n_layers, batch()
    for _ in range(2):
        inputs.clear()
        offload.seen.clear()
        offload.reset_counts()
        loss, _ = model(ids, pos, labels)
        assert len(offload.seen) == len(inputs) == L  # (backward's recomputes call the layers again)
        assert all(s is x for s, x in zip(offload.seen, inputs))
        assert offload.packed == L and offload.bytes == sum(x.numel() * x.element_size() for x in inputs)
        offload.seen.clear()
        loss.backward()
        assert (offload.unpacked, offload.prefetched, offload.fetched_late) == (L, L - 1, 1)
        del loss
        gc.collect()
        layer = offload._last
        while layer is not None:  # the graph is gone: so are its host copies
            assert all(ref() is None for ref in layer.saved)
            layer = layer.previous


def test_offload_bytes_are_the_checkpoints_the_planner_counts():
    """One hidden vector per local token per layer: layers x batch x tokens x dim x element size."""
    _, _, model = one_process("offload", dtype=torch.float32)
    ids, _, _ = batch()
    assert model.offload.bytes == model.cfg.n_layers * ids.numel() * model.cfg.dim * 4


def test_the_modes_need_checkpoint_layers():
    for flag in ("save_attention", "offload_activations"):
        with pytest.raises(ValueError, match=f"{flag}=True needs checkpoint_layers"):
            model_config("tiny", **{flag: True})


# ---------------------------------------------------------------- on a ring, FSDP2, the training step


def gradients_per_mode(cfg, dtype_name, modes):
    """For each mode: loss, flat full gradients and the ring hops of one training step's gradients."""
    dtype = getattr(torch, dtype_name)
    mesh = make_mesh(cfg.dp, torch.device("cpu"), timeout=30)
    out = {}
    for mode in modes:
        torch.manual_seed(cfg.seed)
        model = Transformer(model_config(cfg.model, ffn_chunk=16, loss_chunk=16, **MODES[mode])).to(dtype)
        shard_model(model, mesh)
        model.set_ring(mesh.seqshard(cfg.layout))
        run = Run(cfg, mesh, task_for(cfg), model, torch.optim.SGD(model.parameters(), lr=cfg.lr))
        with count_comms() as c:
            loss, n = compute_gradients(run, 0)
        grads = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
        offload = model.offload
        out[mode] = dict(loss=loss, grads=grads, hops=c.hops["kv"], offloaded=offload and offload.bytes)
    return out


@pytest.fixture(scope="module")
def reference(cluster):
    """The one-process step without checkpointing in float64 (the oracle) and float32 (the budget)."""
    args = train_args(layout="contiguous")
    return {dt: cluster(1).run(gradients_per_mode, args, dt, ["none"])[0]["none"] for dt in ("float64", "float32")}


def _err(a, b):
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "zigzag"), (3, "striped")])
def test_every_mode_is_exact_on_a_ring(cluster, reference, world, layout):
    """Loss and gradients of each mode's training step equal the one-process float64 result within
    float32's budget, and equal no checkpointing's on the same ring bit for bit; the ring's forward
    hops: plain checkpointing reruns each layer's ring (L x (W-1) more), save_attention never does."""
    ref, f32 = reference["float64"], reference["float32"]
    per_rank = cluster(world).run(gradients_per_mode, train_args(layout=layout), "float32", list(MODES))
    layers = model_config("tiny").n_layers
    for results in per_rank:
        for mode, r in results.items():
            assert_within_budget(
                f"{mode} grads",
                _err(r["grads"], ref["grads"]),
                _err(f32["grads"], ref["grads"]),
                1e-7,
                ceiling=CEILINGS["float32"],
            )
            assert_within_budget(
                f"{mode} loss",
                abs(r["loss"] - ref["loss"]),
                abs(f32["loss"] - ref["loss"]),
                1e-6,
                ceiling=CEILINGS["float32"],
            )
            assert r["loss"] == results["none"]["loss"] and torch.equal(r["grads"], results["none"]["grads"])
        hops = {mode: r["hops"] for mode, r in results.items()}
        rerun = layers * (world - 1)  # the forward rings a recompute reruns (none on one rank)
        assert hops["checkpoint"] == hops["offload"] == hops["none"] + rerun
        assert hops["save"] == hops["save+offload"] == hops["none"]
        assert results["offload"]["offloaded"] == results["save+offload"]["offloaded"] > 0


# ---------------------------------------------------------------- on a GPU (make test-gpu)

HAS_CUDA = torch.cuda.is_available()


def cuda(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")(fn))


def _held_after_forward(model, ids, pos, labels):
    """(loss, device bytes the forward left allocated for backward) once the side stream's copies are done."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss, _ = model(ids, pos, labels)
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # the allocator frees blocks a side stream used at its next allocation
    return loss, torch.cuda.memory_allocated() - before


@cuda
def test_offload_on_a_gpu_frees_the_checkpoints_and_changes_no_bit():
    """On the GPU: the forward leaves the checkpoints' bytes fewer on the device (in pinned host memory
    instead), backward fetches every layer's but the last one ahead on the side stream, and the loss and
    every gradient equal plain checkpointing's bit for bit (with and without save_attention)."""
    results = {}
    ids, pos, labels = (t.cuda() for t in batch(seq=2048, b=2))
    for mode in ("checkpoint", "offload", "save", "save+offload"):
        torch.manual_seed(0)
        model = Transformer(model_config("base", **MODES[mode])).double().cuda()  # float64: deterministic kernels
        loss, held = _held_after_forward(model, ids, pos, labels)
        if model.offload is not None:
            last = model.offload._last.saved[-1]()
            assert last.host.is_pinned() and last.host.device.type == "cpu"
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[mode] = (loss.detach(), grads, held, model.offload)
    for plain, off in (("checkpoint", "offload"), ("save", "save+offload")):
        assert torch.equal(results[off][0], results[plain][0]) and torch.equal(results[off][1], results[plain][1])
        offload = results[off][3]
        L = model.cfg.n_layers
        assert offload.bytes == L * ids.numel() * model.cfg.dim * 8
        assert results[plain][2] - results[off][2] >= offload.bytes  # every checkpoint left the device
        assert (offload.unpacked, offload.prefetched, offload.fetched_late) == (L, L - 1, 1)
    assert torch.equal(results["save"][1], results["checkpoint"][1])
