"""Analytic cluster planner: the memory and overlap model of Ring Attention (arXiv 2310.01889).

Answers three planning questions without touching a GPU: how much activation memory one layer
needs per method (paper Table 1), how large a block must be for the ring's communication to hide
behind compute (Table 2), and the longest trainable context per method (Table 3). Pure Python.

Assumptions, all of them (the defaults reproduce the paper's setups; every one is a parameter):

* Table 1 is in bf16 bytes; ``bytes_per_element`` rescales it (4 for fp32). The "Total" column is
  the max of the attention and FFN columns, since the two sublayers are recomputed one after the
  other. The paper prints the vanilla total as 2bhs^2; the attention column is 2bns^2 (scores per
  head) and we use that, reading "h" as a typo.
* Overlap (section 3): a ring step computes 4dc^2 FLOPs and sends K and V, 4cd bytes in bf16, so
  the transfer hides iff c >= F/B, F = dense FLOP/s and B = unidirectional bytes/s per device;
  the per-device sequence is then at least 6c. For InfiniBand F/B = 312/12.5 = 24.96K; the paper
  prints 24.5K (but 149.5K for 6c, i.e. c = 24.9K), so we keep the formula and test loosely there.
* H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA datasheet, 1979 is with sparsity), 80 GB HBM3, NVLink 4
  at 900 GB/s bidirectional = 450 GB/s per direction. TPU and A100 numbers are the paper's Table 2.
* Training memory per device (section 5.1, App. B), on n devices, ``batch`` sequences per device
  for the baselines and per ring for ring (1 by default: the baselines hold one sequence per
  device, total batch n*l tokens, and ring trains one n*l sequence over all n devices):
  - model state under FSDP: 16 bytes/param (fp32 weights, grads, Adam m and v; the paper trains
    in full precision; bf16 mixed precision with fp32 master weights is 16 too), divided by n;
    plus one layer gathered unsharded (fp32 weights and grads, 8 bytes per layer parameter).
  - full gradient checkpointing with ``nothing_saveable`` on attention and FFN separately
    (App. B.2): 2 saved inputs per layer, 2*L*b*s*h elements; ring shards them, s -> s/n.
  - the peak of one layer's recompute: Table 1, with c = s/n for ring and c = ``chunk`` (1024)
    for the blockwise baselines. Vanilla attention is unfused, and an unfused fp32 backward keeps
    several b*n*s^2 buffers live at once: we count 8 (scores, masked scores, exp, probabilities
    in the recompute; dP, P*dP, dS, scaled dS in the backward) where Table 1 counts one. That is
    the high end of a naive count, chosen because with 4 the 8x A100 7B vanilla would reach 8K
    against the paper's 2K; it moves only the vanilla column.
  - no full-sequence logits: the LM head and loss are taken over sequence chunks (as a
    blockwise model does), a negligible chunk instead of b*s*V. The paper's JAX code does build
    the logits; ``logits_copies=1`` (fp32, 128 KB/token) models that, and it puts 32x A100 7B
    at 32K/1024K, outside 2x of the paper's 128K/4096K.
  - activations in fp32 (4 bytes) on GPU and TPU alike ("full precision", section 4).
  - the whole of ``memory_bytes`` (80 GB = 80e9, not 80 GiB) is usable.
  - ring size = n devices. TPU pod names count TensorCores, two per chip for v3 and v4:
    TPUv4-1024 is 512 chips, TPUv3-512 is 256 (with Table 2's 16 GB per v3 device, the paper's
    number, though a v3 chip carries 2 x 16 GB); TPUv5e-256 is 256 single-core chips.
  - max context is searched in tokens; tables round down to a power of two of K = 1024 tokens.
* One fitted parameter: a baseline whose FFN is *not* blockwise (vanilla, memory-efficient
  attention) keeps ``ffn_saved_per_layer`` = 0.75 (tokens x ffn_hidden) buffers per layer in the
  activation dtype (fp32 by default; 1.5 bf16-sized buffers) on top of its checkpoints: the SwiGLU
  hidden its checkpoint policy does not cover, which is exactly what BPT's blockwise FFN removes. The
  paper does not say how much its baselines keep, so the value is fitted to Table 3: every cell is
  within 2x for any value in about (0.64, 0.83), and outside that window one of two cells leaves it
  (8x A100 13B mem-eff, paper 4K: needs > 0.64; 32x A100 7B mem-eff, paper 64K: needs < 0.83). It is a fudge factor
  in the form of a saved buffer (counting it in every layer is not derived from a checkpoint
  policy), disclosed as such. Without it (0) the
  planner puts mem-eff at BPT's length for most models, against the paper's consistent 2x gap,
  and 8x A100 13B mem-eff at 16K, 4x the paper's 4K. The test holds the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .presets import LLAMA, SHAPES

METHODS = ("vanilla", "memeff", "bpt", "ring")
METHOD_TITLES = {
    "vanilla": "Vanilla",
    "memeff": "Memory-efficient attn",
    "bpt": "Mem-eff attn + FFN (BPT)",
    "ring": "Ring Attention",
}
K = 1024  # tokens per "K" in the tables


def positive(name, value, integer=False):
    """value, checked: a finite number > 0 (an int with integer=True); else ValueError naming `name`."""
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        kind = "positive int" if integer else "positive number"
        raise ValueError(f"{name} must be a {kind}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder: the only sizes the memory model needs."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab: int = 32000

    def __post_init__(self):
        for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "ffn_hidden", "vocab"):
            positive(f"ModelShape.{f}", getattr(self, f), integer=True)
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{self.name}: hidden {self.hidden} must divide into n_heads "
                f"{self.n_heads}, and n_heads into n_kv_heads {self.n_kv_heads}"
            )

    @property
    def layer_params(self) -> int:
        """Weights of one block: q, o (h*h), k, v (h*kv_dim), SwiGLU (3*h*f), two RMSNorms."""
        kv_dim = self.hidden // self.n_heads * self.n_kv_heads
        h = self.hidden
        return 2 * h * h + 2 * h * kv_dim + 3 * h * self.ffn_hidden + 2 * h

    @property
    def n_params(self) -> int:
        """All weights: layers, untied embedding and LM head, final norm."""
        return self.n_layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden


@dataclass(frozen=True)
class Device:
    """One accelerator: dense FLOP/s, memory bytes, unidirectional ring bandwidth bytes/s."""

    name: str
    flops: float
    memory_bytes: float
    bandwidth_bytes_per_s: float

    def __post_init__(self):
        for f in ("flops", "memory_bytes", "bandwidth_bytes_per_s"):
            positive(f"Device.{f}", getattr(self, f))


def _shape(name) -> ModelShape:
    """The planner's view of a preset from ringwise.presets (the one the model trains)."""
    s = SHAPES[name]
    return ModelShape(name, s["n_layers"], s["dim"], s["n_heads"], s["n_kv_heads"], s["ffn_dim"], s["vocab_size"])


MODELS = {name[len("llama-") :]: _shape(name) for name in LLAMA}

DEVICES = {
    d.name: d
    for d in (
        Device("a100-nvlink", 312e12, 80e9, 300e9),
        Device("a100-ib", 312e12, 80e9, 12.5e9),
        Device("h100", 989e12, 80e9, 450e9),
        Device("tpu-v3", 123e12, 16e9, 112e9),
        Device("tpu-v4", 275e12, 32e9, 268e9),
        Device("tpu-v5e", 196e12, 16e9, 186e9),
    )
}


def _lookup(table, name, what):
    key = str(name).lower().replace("_", "-")
    key = key[len("llama-") :] if what == "model" and key.startswith("llama-") else key
    if key not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}")
    return table[key]


def get_model(name) -> ModelShape:
    """A preset by name ('7b' or 'llama-7b'); a ModelShape passes through."""
    return name if isinstance(name, ModelShape) else _lookup(MODELS, name, "model")


def get_device(name) -> Device:
    """A preset by name ('a100-nvlink', 'tpu-v4', ...); a Device passes through."""
    return name if isinstance(name, Device) else _lookup(DEVICES, name, "device")


def _method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------- Table 1: one layer's peak
def activation_parts(method, b, s, hidden, heads, block, bytes_per_element=2, score_copies=1):
    """(attention, FFN) peak bytes of one layer, paper Table 1 scaled from bf16.

    ``score_copies`` counts live b*n*s^2 buffers in vanilla attention (Table 1 counts one).
    For ring, ``block`` is the per-device block c = s/n.
    """
    _method(method)
    for n, v in (
        ("b", b),
        ("s", s),
        ("hidden", hidden),
        ("heads", heads),
        ("block", block),
        ("bytes_per_element", bytes_per_element),
        ("score_copies", score_copies),
    ):
        positive(n, v)
    unit = bytes_per_element / 2  # Table 1 is in bf16 bytes
    c = min(block, s)
    attn, ffn = {
        "vanilla": (2 * b * heads * s * s * score_copies, 8 * b * s * hidden),
        "memeff": (2 * b * s * hidden + 4 * b * c * hidden, 8 * b * s * hidden),
        "bpt": (2 * b * s * hidden, 2 * b * s * hidden),
        "ring": (6 * b * c * hidden, 2 * b * c * hidden),
    }[method]
    return attn * unit, ffn * unit


def activation_bytes_per_layer(method, b, s, hidden, heads, block, bytes_per_element=2, score_copies=1):
    """Peak activation bytes of one layer (Table 1 'Total' = max of attention and FFN)."""
    return max(activation_parts(method, b, s, hidden, heads, block, bytes_per_element, score_copies))


# ---------------------------------------------------------------- Table 2: overlap condition
def min_block_size(device, bytes_per_element=2, kv_fraction=1.0) -> float:
    """Smallest block c (tokens) whose compute 4dc^2 hides sending K,V (4cd bytes in bf16).

    4dc^2/F >= 4cd/B gives c >= F/B. Other K/V dtypes or GQA (K/V narrower than the hidden by
    ``kv_fraction``) scale the bytes sent, hence c, linearly.
    """
    device = get_device(device)
    positive("bytes_per_element", bytes_per_element)
    positive("kv_fraction", kv_fraction)
    return device.flops / device.bandwidth_bytes_per_s * (bytes_per_element / 2) * kv_fraction


def min_seq_per_device(device, **kw) -> float:
    """Per-device sequence the paper asks for overlap: s = 6c (section 3, Table 2)."""
    return 6 * min_block_size(device, **kw)


# ---------------------------------------------------------------- Table 3: max context
@dataclass(frozen=True)
class MemoryModel:
    """What a training step keeps per device besides one layer's peak (see module docstring)."""

    state_bytes_per_param: float = 16.0  # fp32 weights + grads + Adam m, v; sharded by FSDP
    gather_bytes_per_param: float = 8.0  # one unsharded layer: fp32 weights + grads
    checkpoints_per_layer: int = 2  # saved inputs of attention and of FFN
    logits_copies: float = 0.0  # full-sequence fp32 logits (0: chunked loss)
    bytes_per_element: float = 4.0  # activations: fp32 ("full precision", App. B)
    score_copies: int = 8  # live b*n*s^2 buffers in unfused vanilla attention
    chunk: int = 1024  # query/key block of the blockwise baselines
    ffn_saved_per_layer: float = 0.75  # (s x ffn) buffers a non-blockwise FFN keeps per layer; fitted


DEFAULT_MEMORY = MemoryModel()


def training_memory(method, model, n_devices, seq, batch=1, memory=DEFAULT_MEMORY) -> dict:
    """Bytes per device, by part, to train ``model`` on ``seq``-token sequences."""
    model, _ = get_model(model), _method(method)
    for n, v in (("n_devices", n_devices), ("seq", seq), ("batch", batch)):
        positive(n, v, integer=n != "seq")
    e, h = memory.bytes_per_element, model.hidden
    local = seq / n_devices if method == "ring" else seq
    block = local if method == "ring" else memory.chunk
    parts = {
        "model state": model.n_params * memory.state_bytes_per_param / n_devices,
        "gathered layer": model.layer_params * memory.gather_bytes_per_param,
        "checkpoints": memory.checkpoints_per_layer * model.n_layers * batch * local * h * e,
        "logits": memory.logits_copies * batch * local * model.vocab * e,
        "ffn hidden": (
            memory.ffn_saved_per_layer * model.n_layers * batch * seq * model.ffn_hidden * e
            if method in ("vanilla", "memeff")
            else 0.0
        ),
        "layer peak": activation_bytes_per_layer(method, batch, seq, h, model.n_heads, block, e, memory.score_copies),
    }
    parts["total"] = sum(parts.values())
    return parts


def max_context(method, model, device, n_devices, batch=1, memory=DEFAULT_MEMORY) -> int:
    """Longest sequence (tokens; a multiple of n_devices for ring) that fits; 0 if none does."""
    device, n_devices = get_device(device), positive("n_devices", n_devices, integer=True)
    _method(method), positive("batch", batch, integer=True)
    step = n_devices if method == "ring" else 1
    fits = lambda k: training_memory(method, model, n_devices, k * step, batch, memory)["total"] <= device.memory_bytes
    if not fits(1):
        return 0
    hi = 2
    while fits(hi):
        hi *= 2
    lo = hi // 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def pow2_k(tokens) -> int:
    """Round a token count down to a power of two of K = 1024 tokens (the paper's grid); 0 if < 1K."""
    return 0 if tokens < K else 2 ** int(math.floor(math.log2(tokens / K)))


# ---------------------------------------------------------------- ringwise's own buffers
def ringwise_activation_bytes(model, tokens_per_rank, world, batch=1, bytes_per_element=4) -> dict:
    """Per-rank activation bytes of one ringwise training step with per-layer checkpointing.

    Table 1 counts the paper's attention buffers only; this counts what ringwise itself holds
    per local token while one layer is recomputed and back-propagated (h = hidden,
    kv = n_kv_heads x head_dim), read off ringwise.model and ringwise.attention.ring, not fitted:

    * checkpoints: every layer's input, h per layer;
    * the recomputed layer's saved activations: its input, the attention norm's output, q,
      q after rotary, the attention output, the residual after attention, the FFN norm's
      output (7h); k, k after rotary, v (3kv);
    * backward: the residual-stream and norm-output gradients, the float32 dQ accumulator and
      the kernel's dQ part (4h); the local block's dK, dV (2kv);
    * ring (W > 1): receive buffers for the visiting K, V (one pair at W = 2, two from W = 3),
      and the travelling dK, dV accumulator with its receive buffer (4kv).

    Per-chunk constants (one SwiGLU chunk, one logits chunk, kernel scratch) are left out, so
    this is the part that grows with the sequence. Every buffer is counted at
    ``bytes_per_element``; ringwise's accumulators are float32 even for bf16 inputs, so bf16
    figures undercount them slightly. ``bench memory`` checks it against
    measurement.
    """
    model = get_model(model)
    for n, v in (("tokens_per_rank", tokens_per_rank), ("world", world), ("batch", batch)):
        positive(n, v, integer=True)
    h, kv = model.hidden, model.hidden // model.n_heads * model.n_kv_heads
    per_token = {
        "checkpoints": model.n_layers * h,
        "layer recompute": 7 * h + 3 * kv,
        "backward": 4 * h + 2 * kv,
        "ring buffers": 0 if world == 1 else 2 * min(2, world - 1) * kv + 4 * kv,
    }
    parts = {k: v * tokens_per_rank * batch * bytes_per_element for k, v in per_token.items()}
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------- Ulysses x ring (USP) split
@dataclass(frozen=True)
class Cluster:
    """Nodes of devices: NVLink inside a node, a slower network between nodes (bytes/s per device)."""

    devices_per_node: int
    nodes: int
    nvlink_bytes_per_s: float
    internode_bytes_per_s: float

    def __post_init__(self):
        positive("devices_per_node", self.devices_per_node, integer=True)
        positive("nodes", self.nodes, integer=True)
        positive("nvlink_bytes_per_s", self.nvlink_bytes_per_s)
        positive("internode_bytes_per_s", self.internode_bytes_per_s)

    @property
    def n_devices(self) -> int:
        return self.devices_per_node * self.nodes


def mesh_traffic(model, seq, ulysses, ring, batch=1, bytes_per_element=2) -> dict:
    """Bytes one device sends per attention layer, forward + backward, on a U x R mesh.

    Mirrors ringwise.attention.ulysses: each all-to-all keeps 1/U of a device's tokens and
    sends the rest; forward carries q, k, v then out, backward dout then dq, dk, dv. K/V
    heads travel ``kv_copies`` times when kv_heads % U != 0. The ring, over R ranks on
    S/R tokens and heads/U, sends R-1 K/V hops each way and R float32 dK/dV hops backward.
    """
    model = get_model(model)
    U, R = positive("ulysses", ulysses, True), positive("ring", ring, True)
    if model.n_heads % U:
        raise ValueError(f"ulysses={U} does not divide the {model.n_heads} heads of {model.name}")
    e, h, d = bytes_per_element, model.hidden, model.hidden // model.n_heads
    copies = U // math.gcd(model.n_kv_heads, U)  # ulysses.kv_copies (this module stays torch-free)
    kv = d * model.n_kv_heads * copies  # K (or V) elements per token that travel
    tokens = batch * seq / (U * R)
    a2a = (U - 1) / U * tokens * e * 2 * (2 * h + 2 * kv)
    block = batch * seq / R * kv / U  # K (or V) elements of one visiting block
    hop_fwd, hop_bwd = 2 * block * e, 2 * block * e + 2 * block * 4
    ring_bytes = (R - 1) * hop_fwd + (R - 1) * 2 * block * e + R * 2 * block * 4 if R > 1 else 0.0
    return dict(
        all_to_all=a2a,
        ring_bytes=ring_bytes,
        hop_forward=hop_fwd if R > 1 else 0.0,
        hop_backward=hop_bwd if R > 1 else 0.0,
        kv_copies=copies,
    )


def mesh_splits(model, device, cluster: Cluster, seq, batch=1, causal=True, bytes_per_element=2) -> list[dict]:
    """Every (U, R) with U x R = all devices and U | heads, with its estimated attention time.

    Model: compute 4 S^2 hidden FLOPs forward (half under a causal mask; backward 2.5x),
    spread evenly (zigzag) and run at the device's dense FLOP/s. The all-to-alls cannot
    overlap compute, so their time adds: NVLink inside a node, the network for the part
    that leaves it. Each ring step hides its hop behind that step's compute and exposes
    only the excess, at the network's bandwidth once the ring leaves a node.
    """
    model, device = get_model(model), get_device(device)
    N, dpn = cluster.n_devices, cluster.devices_per_node
    cf = 0.5 if causal else 1.0
    compute = 3.5 * 4 * (batch * seq) * seq * model.hidden * cf / N / device.flops  # forward + backward
    rows = []
    for U in (u for u in range(1, N + 1) if N % u == 0 and model.n_heads % u == 0):
        R = N // U
        t = mesh_traffic(model, seq, U, R, batch, bytes_per_element)
        if dpn % U == 0:  # the ulysses group lies inside a node
            a2a_time = t["all_to_all"] / cluster.nvlink_bytes_per_s
        elif U % dpn == 0:  # whole nodes: dpn-1 of the U-1 parts stay on NVLink
            off = t["all_to_all"] * (U - dpn) / (U - 1)
            a2a_time = max(off / cluster.internode_bytes_per_s, (t["all_to_all"] - off) / cluster.nvlink_bytes_per_s)
        else:
            a2a_time = t["all_to_all"] / cluster.internode_bytes_per_s
        ring_bw = cluster.nvlink_bytes_per_s if N <= dpn else cluster.internode_bytes_per_s
        fwd_step, bwd_step = compute / 3.5 / R, compute * 2.5 / 3.5 / R
        exposed = (
            (
                (R - 1) * max(0.0, t["hop_forward"] / ring_bw - fwd_step)
                + R * max(0.0, t["hop_backward"] / ring_bw - bwd_step)
            )
            if R > 1
            else 0.0
        )
        # the least ring block S/R whose hops hide: forward 2ckv*e/B <= 4c^2*h*cf/F, backward with f32 dK/dV
        kv = model.hidden // model.n_heads * model.n_kv_heads * t["kv_copies"]
        e = bytes_per_element
        hide = max(kv * e, kv * (e + 4) * 2 / 5) * device.flops / (2 * model.hidden * cf * ring_bw)
        rows.append(
            dict(
                ulysses=U,
                ring=R,
                **t,
                compute_s=compute,
                all_to_all_s=a2a_time,
                ring_exposed_s=exposed,
                total_s=compute + a2a_time + exposed,
                a2a_in_node=dpn % U == 0,
                ring_in_node=N <= dpn,
                ring_block=batch * seq / R,
                ring_block_to_hide=hide,
            )
        )
    return rows


def recommend_split(model, device, cluster: Cluster, seq, tolerance=0.02, **kw) -> tuple[dict, list[dict]]:
    """(best split, all splits).

    Only ulysses groups inside a node are candidates (Megatron's a2a+p2p rule: an all-to-all
    cannot hide behind compute, and across nodes it puts every device's data on the network
    at once). Among the candidates within ``tolerance`` of the least estimated time, the one
    that moves the fewest bytes wins: the model assumes perfect overlap, so a difference
    that small is not resolved by it, and fewer bytes leave more slack.
    """
    rows = mesh_splits(model, device, cluster, seq, **kw)
    candidates = [r for r in rows if r["a2a_in_node"]]
    fastest = min(r["total_s"] for r in candidates)
    close = [r for r in candidates if r["total_s"] <= fastest * (1 + tolerance)]
    best = min(close, key=lambda r: (r["all_to_all"] + r["ring_bytes"], -r["ulysses"]))
    return best, rows


def format_mesh_plan(model, device, cluster: Cluster, seq, **kw) -> str:
    """The (U, R) table, all-to-all volume next to the ring's, and why the best split wins."""
    model, device = get_model(model), get_device(device)
    best, rows = recommend_split(model, device, cluster, seq, **kw)
    gb = lambda x: f"{x / 1e9:8.3f}"
    ms = lambda x: f"{x * 1e3:9.2f}"
    lines = [
        f"Ulysses x ring on {cluster.nodes} node(s) x {cluster.devices_per_node} {device.name}, NVLink "
        f"{cluster.nvlink_bytes_per_s / 1e9:g} GB/s, network {cluster.internode_bytes_per_s / 1e9:g} GB/s per "
        f"device; {model.name}, S = {seq:,} tokens; sent per device per layer, forward + backward",
        f"  {'U x R':<9}{'a2a GB':>8}{'ring GB':>9}{'a2a ms':>9}{'ring ms':>9}{'compute':>9}{'total ms':>9}  links",
    ]
    for r in rows:
        links = (
            (f"a2a {'NVLink' if r['a2a_in_node'] else 'network'}" if r["ulysses"] > 1 else "no a2a")
            + ", "
            + (f"ring {'NVLink' if r['ring_in_node'] else 'network'}" if r["ring"] > 1 else "no ring")
        )
        mark = "  <- recommended" if r is best else ""
        lines.append(
            f"  {str(r['ulysses']) + ' x ' + str(r['ring']):<9}{gb(r['all_to_all'])}{gb(r['ring_bytes'])} "
            f"{ms(r['all_to_all_s'])}{ms(r['ring_exposed_s'])}{ms(r['compute_s'])}{ms(r['total_s'])}  "
            f"{links}{mark}"
        )
    U, R = best["ulysses"], best["ring"]
    exposed = "hidden" if best["ring_exposed_s"] == 0 else f"{best['ring_exposed_s'] * 1e3:.2f} ms exposed"
    why = [
        f"recommended: Ulysses {U} x ring {R}: ring_attention(..., group=<ring of {R}>, "
        f"ulysses_group=<{U} ranks{' in one node' if cluster.nodes > 1 else ''}>).",
        "why: all-to-alls cannot hide behind compute, so the ulysses group stays inside a node (NVLink); "
        f"a ring hop hides behind its step's compute once the ring block S/R (here {best['ring_block']:,.0f} "
        f"tokens) reaches about {best['ring_block_to_hide']:,.0f} tokens at this split "
        f"({exposed if R > 1 else 'no ring'}).",
        f"splits within 2% of the fastest in-node time are ranked by bytes moved; {U} x {R} moves "
        f"{(best['all_to_all'] + best['ring_bytes']) / 1e9:.2f} GB per device per layer.",
    ]
    cross = [r for r in rows if not r["a2a_in_node"]]
    if cross:
        why.append(
            "not considered: "
            + ", ".join(f"{r['ulysses']} x {r['ring']}" for r in cross)
            + " (all-to-all across nodes; their modelled times are shown for comparison)."
        )
    why.append(
        "U must divide the heads (" + ", ".join(str(r["ulysses"]) for r in rows) + " here); "
        "estimates assume ideal kernels, perfect overlap and no hop latency: compare splits, not absolute times."
    )
    return "\n".join(lines + why)


# ---------------------------------------------------------------- the paper's tables
PAPER_TABLE2 = {  # device: (min c, min s = 6c), thousands of tokens
    "a100-nvlink": (1.0, 6.2),
    "a100-ib": (24.5, 149.5),
    "tpu-v3": (1.1, 6.6),
    "tpu-v4": (1.0, 6.2),
    "tpu-v5e": (1.1, 6.3),
}

# (label, device, n_devices, {model: (vanilla, memeff, bpt, ring)}) in K tokens, paper Table 3
PAPER_TABLE3 = (
    ("8x A100 NVLink", "a100-nvlink", 8, {"3b": (4, 32, 64, 512), "7b": (2, 16, 32, 256), "13b": (2, 4, 16, 128)}),
    ("32x A100 InfiniBand", "a100-ib", 32, {"7b": (4, 64, 128, 4096), "13b": (4, 32, 64, 2048)}),
    ("TPUv3-512 (256 chips)", "tpu-v3", 256, {"7b": (1, 4, 8, 2048), "13b": (1, 2, 8, 1024)}),
    (
        "TPUv4-1024 (512 chips)",
        "tpu-v4",
        512,
        {"3b": (8, 16, 32, 16384), "7b": (4, 8, 16, 8192), "13b": (4, 8, 16, 4096), "30b": (2, 4, 8, 2048)},
    ),
    ("TPUv5e-256", "tpu-v5e", 256, {"3b": (4, 8, 32, 4096), "7b": (2, 8, 16, 2048)}),
)


def table3_rows(memory=DEFAULT_MEMORY):
    """[(setup, model, method, ours_k, paper_k)] for every Table 3 cell, ours rounded to pow2 K."""
    return [
        (label, m, meth, pow2_k(max_context(meth, m, dev, n, 1, memory)), paper[i])
        for label, dev, n, cells in PAPER_TABLE3
        for m, paper in cells.items()
        for i, meth in enumerate(METHODS)
    ]


def format_table2() -> str:
    lines = [
        "Table 2: min block c and per-device sequence 6c for overlap (K = 1000 tokens)",
        f"{'device':<12}{'TFLOPS':>8}{'GB':>6}{'GB/s':>7}{'c ours':>9}{'paper':>7}{'6c ours':>9}{'paper':>7}",
    ]
    for name, (pc, ps) in PAPER_TABLE2.items():
        d = DEVICES[name]
        lines.append(
            f"{name:<12}{d.flops / 1e12:>8.0f}{d.memory_bytes / 1e9:>6.0f}"
            f"{d.bandwidth_bytes_per_s / 1e9:>7.1f}{min_block_size(d) / 1e3:>9.2f}"
            f"{pc:>7.1f}{min_seq_per_device(d) / 1e3:>9.2f}{ps:>7.1f}"
        )
    lines.append("a100-ib: 312/12.5 = 24.96; the paper prints 24.5 (and 149.5 = 6 x 24.9).")
    return "\n".join(lines)


def format_table3(memory=DEFAULT_MEMORY) -> str:
    rows = table3_rows(memory)
    lines = [
        "Table 3: max context, K = 1024 tokens, ours (power of two) / paper",
        f"{'setup':<24}{'model':<6}" + "".join(f"{m:>14}" for m in METHODS),
    ]
    for i in range(0, len(rows), len(METHODS)):
        group = rows[i : i + len(METHODS)]
        lines.append(f"{group[0][0]:<24}{group[0][1]:<6}" + "".join(f"{f'{o}/{p}':>14}" for _, _, _, o, p in group))
    exact = sum(o == p for *_, o, p in rows)
    within = sum(p / 2 <= o <= 2 * p for *_, o, p in rows)
    lines.append(f"exact: {exact}/{len(rows)}; within 2x: {within}/{len(rows)}")
    return "\n".join(lines)


DECODE_HEADER_BYTES = 24  # decode_attention's header: problem code, signature and q digests (3 x int64)


def decode_plan(model, n_devices, context, batch=1, bytes_per_element=2, new_tokens=1) -> dict:
    """Inference over a sequence-sharded KV cache (ringwise.decode_attention): the cache each rank
    holds at `context` tokens (K and V of every layer, its 1/n share, rounded up), and the bytes of
    the one all-gather per layer and step: each rank sends its float32 (out, lse) for the new
    tokens plus the header, and receives the other ranks'; independent of the context."""
    model = get_model(model) if isinstance(model, str) else model
    positive("n_devices", n_devices, True), positive("context", context, True), positive("batch", batch, True)
    head_dim = model.hidden // model.n_heads
    per_token = 2 * model.n_layers * model.n_kv_heads * head_dim * bytes_per_element * batch
    rows = batch * model.n_heads * new_tokens
    sent = model.n_layers * (4 * rows * (head_dim + 1) + DECODE_HEADER_BYTES)
    return dict(
        kv_total_bytes=per_token * context,
        kv_per_rank_bytes=per_token * math.ceil(context / n_devices),
        sent_per_step_bytes=sent if n_devices > 1 else 0,
        received_per_step_bytes=sent * (n_devices - 1),
        collectives_per_step=model.n_layers if n_devices > 1 else 0,
    )


def format_decode_plan(model, n_devices, context, batch=1, bytes_per_element=2) -> str:
    d = decode_plan(model, n_devices, context, batch, bytes_per_element)
    gib = lambda x: f"{x / 2**30:.2f} GiB"
    return (
        f"decode at {context:,} tokens of context ({bytes_per_element:g}-byte K/V, batch {batch}): KV cache "
        f"{gib(d['kv_total_bytes'])} in all, {gib(d['kv_per_rank_bytes'])} per rank; per new token "
        f"{d['collectives_per_step']} all-gathers (one per layer), {d['sent_per_step_bytes'] / 2**10:.1f} KiB "
        f"sent and {d['received_per_step_bytes'] / 2**10:.1f} KiB received per rank, whatever the context"
    )


def plan_report(model, device, n_devices, batch=1, seq=None, memory=DEFAULT_MEMORY) -> str:
    """Readable plan: per-layer activations at ``seq``, overlap block, longest context per method."""
    model, device = get_model(model), get_device(device)
    positive("n_devices", n_devices, True), positive("batch", batch, True)
    c = min_block_size(device)
    asked = seq
    seq = positive("seq", max(32 * K, n_devices * K) if seq is None else seq, True)
    e = memory.bytes_per_element
    gib = lambda x: f"{x / 2**30:10.2f} GiB"
    lines = [
        f"plan: {model.name} ({model.n_params / 1e9:.2f}B params) on {n_devices} x "
        f"{device.name} ({device.flops / 1e12:g} TFLOP/s, {device.memory_bytes / 1e9:g} GB, "
        f"{device.bandwidth_bytes_per_s / 1e9:g} GB/s), batch {batch} per ring",
        f"overlap: block c >= F/B = {c:,.0f} tokens; per-device sequence >= 6c = "
        f"{6 * c:,.0f} tokens; ring context >= {6 * c * n_devices:,.0f} tokens",
        f"activation per layer at s = {seq:,} ({e:g} bytes/element; ring block s/n = "
        f"{seq / n_devices:,.0f}, others chunk {memory.chunk}):",
        f"  {'':<26}{'Table 1':>14}{'planner':>14}",
    ]
    for m in METHODS:
        block = seq / n_devices if m == "ring" else memory.chunk
        args = (m, batch, seq, model.hidden, model.n_heads, block, e)
        lines.append(
            f"  {METHOD_TITLES[m]:<26}"
            + gib(activation_bytes_per_layer(*args))
            + gib(activation_bytes_per_layer(*args, memory.score_copies))
        )
    lines.append("longest context that fits (ring: whole sequence over the ring):")
    for m in METHODS:
        s = max_context(m, model, device, n_devices, batch, memory)
        note = (
            "  (does not fit)"
            if not s
            else ""
            if m != "ring" or s >= 6 * c * n_devices
            else "  (too short to hide comm)"
        )
        lines.append(f"  {METHOD_TITLES[m]:<26}{s:>14,} tokens  ({pow2_k(s)}K pow2){note}")
    longest = max_context("ring", model, device, n_devices, batch, memory)
    if longest:
        parts = training_memory("ring", model, n_devices, longest, batch, memory)
        lines.append(
            "ring memory per device at that length: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items())
        )
        own = ringwise_activation_bytes(model, longest // n_devices, n_devices, batch, memory.bytes_per_element)
        same = training_memory("ring", model, n_devices, longest, batch, replace(memory, checkpoints_per_layer=1))
        lines.append(
            f"ringwise's own activation buffers at that length (counted; 1 checkpoint per layer): "
            f"{own['total'] / 2**30:.2f} GiB, against Table 1's accounting with 1 checkpoint per layer: "
            f"{(same['checkpoints'] + same['layer peak']) / 2**30:.2f} GiB"
        )
    # decode at the asked length, else at the longest trainable one
    lines.append(format_decode_plan(model, n_devices, asked or longest or seq, batch, bytes_per_element=2))  # bf16 K/V
    return "\n".join(lines)
