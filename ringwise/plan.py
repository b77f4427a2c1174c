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
        Device("h100", 989e12, 81559 * 2**20, 450e9),  # 80 GB HBM3: nvidia-smi reports 81,559 MiB
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
    head_dim = getattr(model, "head_dim", model.hidden // model.n_heads)
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


# ---------------------------------------------------------------- the memory ledger (ringwise finetune)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # ringwise.train.config.DTYPES' names
LOSS_CHUNK = 1024  # ringwise.train.pretrained.LOSS_CHUNK: tokens per vocabulary projection in the loss
MIN_FFN_TILE = 256  # ringwise.integrations.hf_tiling.MIN_TILE: the automatic tile's floor
GIB = 2**30


@dataclass(frozen=True)
class ModelConfig:
    """A transformers decoder as the ledger counts it: what `read_config` takes from a config.json.

    Widths are per token: q = heads x head_dim, k = kv_heads x head_dim, v = kv_heads x v_head_dim,
    attention output = heads x v_head_dim. A mixture-of-experts layer routes each token to
    ``experts_per_token`` of ``experts`` experts of width ``expert_intermediate`` (plus shared
    experts of ``shared_intermediate`` in all); ``moe_layers`` of the layers are such, the rest dense.
    ``attention_params``: one layer's attention weights where they are not q, k, v, o projections
    (DeepSeek's MLA); None: counted from the widths."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    v_head_dim: int = 0  # 0: head_dim
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0
    attention_params: int | None = None
    rope_dim: int = 0  # rotary dimensions per head (0: head_dim; DeepSeek's MLA: qk_rope_head_dim)

    def __post_init__(self):
        for f in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim", "intermediate", "vocab"):
            positive(f"{self.name}: {f}", getattr(self, f), integer=True)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: {self.n_heads} heads do not divide into {self.n_kv_heads} kv heads")
        if self.experts and not (0 < self.experts_per_token <= self.experts and self.expert_intermediate > 0):
            raise ValueError(
                f"{self.name}: {self.experts} experts need 1..{self.experts} experts per token and a positive "
                f"expert width (got {self.experts_per_token}, {self.expert_intermediate})"
            )
        if not 0 <= self.moe_layers <= self.n_layers or (self.moe_layers and not self.experts):
            raise ValueError(f"{self.name}: {self.moe_layers} MoE layers of {self.n_layers} ({self.experts} experts)")

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def k_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def v_width(self) -> int:
        return self.n_kv_heads * self.v_dim

    @property
    def o_width(self) -> int:
        return self.n_heads * self.v_dim

    def _attention_params(self) -> int:
        if self.attention_params is not None:
            return self.attention_params
        return self.hidden * (self.q_width + self.k_width + self.v_width + self.o_width)

    @property
    def dense_layer_params(self) -> int:
        return self._attention_params() + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def moe_layer_params(self) -> int:
        experts = 3 * self.hidden * (self.experts * self.expert_intermediate + self.shared_intermediate)
        return self._attention_params() + experts + self.hidden * self.experts + 2 * self.hidden

    @property
    def layer_params(self) -> int:
        """The largest layer's weights (FSDP2 gathers one layer at a time)."""
        return max(self.dense_layer_params, self.moe_layer_params if self.moe_layers else 0)

    @property
    def root_params(self) -> int:
        """The weights outside the decoder layers (FSDP2's root unit): embeddings, output matrix, final norm."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    @property
    def n_params(self) -> int:
        dense = (self.n_layers - self.moe_layers) * self.dense_layer_params
        moe = self.moe_layers * self.moe_layer_params
        return dense + moe + self.root_params

    def weight_shapes(self) -> list[tuple[int, int]]:
        """Every parameter tensor as (rows, elements per row): FSDP2 shards the rows (dim 0). transformers'
        layouts: nn.Linear's (out, in), norms' (hidden,), experts as (experts, ...) tensors (transformers 5
        fuses each layer's gate and up projections, and its down projections); MLA's projections stand as one
        (attention_params, 1) tensor. The shapes add up to n_params."""
        h, f = self.hidden, self.intermediate
        if self.attention_params is not None:
            attention = [(self.attention_params, 1)]
        else:
            attention = [(self.q_width, h), (self.k_width, h), (self.v_width, h), (h, self.o_width)]
        norms = [(h, 1), (h, 1)]
        shapes = (attention + [(f, h), (f, h), (h, f)] + norms) * (self.n_layers - self.moe_layers)
        if self.moe_layers:
            E, fe, fs = self.experts, self.expert_intermediate, self.shared_intermediate
            shared = [(fs, h), (fs, h), (h, fs)] if fs else []
            shapes += (attention + [(E, h), (E, 2 * fe * h), (E, h * fe)] + shared + norms) * self.moe_layers
        return shapes + [(self.vocab, h)] * (1 if self.tied else 2) + [(h, 1)]


CONFIG_PRESETS = {  # transformers config.json sizes of models the planner knows by name (what read_config reads)
    "llama-3.1-8b": (
        "Llama-3.1-8B",
        dict(
            model_type="llama",
            num_hidden_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
    ),
}
LLAMA_PRESETS = tuple(LLAMA) + tuple(CONFIG_PRESETS)


def checkpoint_folder(spec) -> str | None:
    """The checkpoint folder --model names (a config.json's folder), or None for a preset."""
    import os

    spec = str(spec)
    if os.path.isdir(spec):
        return spec
    return (os.path.dirname(spec) or ".") if os.path.isfile(spec) else None


def shape_of(model: ModelConfig) -> ModelShape:
    """The paper model's view of a config (the Ulysses x ring split counts hidden-wide all-to-alls)."""
    return ModelShape(
        model.name, model.n_layers, model.hidden, model.n_heads, model.n_kv_heads, model.intermediate, model.vocab
    )


def config_from_preset(name) -> ModelConfig:
    """A preset as a ModelConfig: one of CONFIG_PRESETS (a transformers config), or a LLaMA preset of
    ringwise.presets (head_dim = hidden / heads, untied)."""
    key = str(name).lower().replace("_", "-")
    if key in CONFIG_PRESETS:
        title, cfg = CONFIG_PRESETS[key]
        return model_config(cfg, title)
    s = get_model(name)
    return ModelConfig(
        s.name, s.n_layers, s.hidden, s.n_heads, s.n_kv_heads, s.hidden // s.n_heads, s.ffn_hidden, s.vocab
    )


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def model_config(cfg: dict, name: str = "model") -> ModelConfig:
    """A ModelConfig from a transformers config dict (a VLM's text_config is the decoder's).

    Keys read (the first present wins): num_hidden_layers; hidden_size; num_attention_heads;
    num_key_value_heads (else the heads); head_dim (else hidden / heads; DeepSeek's MLA:
    qk_nope_head_dim + qk_rope_head_dim, v_head_dim); intermediate_size; vocab_size;
    tie_word_embeddings. Experts: num_experts | num_local_experts | n_routed_experts, with
    num_experts_per_tok and moe_intermediate_size (else intermediate_size: Mixtral, GPT-OSS, Llama 4);
    shared experts from shared_expert_intermediate_size (Qwen2-MoE), n_shared_experts (DeepSeek) or
    Llama 4's one; which layers: first_k_dense_replace (DeepSeek), decoder_sparse_step and
    mlp_only_layers (Qwen MoE), interleave_moe_layer_step (Llama 4), else all.
    Raises ValueError naming every missing key."""
    if isinstance(cfg.get("text_config"), dict):
        cfg, name = cfg["text_config"], f"{name} (text_config)"
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in cfg]
    experts = int(_first(cfg, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0)
    dense_width = _first(cfg, "intermediate_size_mlp", "intermediate_size")
    expert_width = _first(cfg, "moe_intermediate_size", "intermediate_size") if experts else 0
    if dense_width is None:
        missing.append("intermediate_size")
    if experts and "num_experts_per_tok" not in cfg:
        missing.append("num_experts_per_tok")
    if missing:
        raise ValueError(
            f"{name}: its config lacks {', '.join(missing)} (the planner needs the decoder's sizes: a transformers "
            "config.json of a causal LM, or a VLM's with a text_config)"
        )
    L, h, H = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    kv = _first(cfg, "num_key_value_heads", default=H)
    mla = cfg.get("kv_lora_rank") is not None
    attention_params = None
    if mla:  # DeepSeek-V2/V3: low-rank q and kv, values of v_head_dim
        nope, rope, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
        head_dim, v_head_dim, kv, rope_dim = nope + rope, dv, H, rope
        q_lora = cfg.get("q_lora_rank")
        q = h * H * head_dim if not q_lora else h * q_lora + q_lora * H * head_dim
        kv_params = h * (cfg["kv_lora_rank"] + rope) + cfg["kv_lora_rank"] * H * (nope + dv)
        attention_params = q + kv_params + H * dv * h
    else:
        head_dim = _first(cfg, "head_dim", default=h // H)
        v_head_dim, rope_dim = 0, 0
    moe_layers, shared = 0, 0
    if experts:
        if "first_k_dense_replace" in cfg:
            moe_layers = L - min(L, int(cfg["first_k_dense_replace"]))
        elif "interleave_moe_layer_step" in cfg:
            step = int(cfg["interleave_moe_layer_step"] or 1)
            moe_layers = L // step
        else:
            step = int(cfg.get("decoder_sparse_step") or 1)
            only = set(cfg.get("mlp_only_layers") or ())
            moe_layers = sum(1 for i in range(L) if i not in only and (i + 1) % step == 0)
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        shared += int(cfg.get("n_shared_experts") or 0) * int(expert_width)
        if cfg.get("model_type") in ("llama4_text", "llama4"):
            shared += int(expert_width)  # Llama 4: one shared expert beside the routed ones
    return ModelConfig(
        name=name,
        n_layers=L,
        hidden=h,
        n_heads=H,
        n_kv_heads=kv,
        head_dim=head_dim,
        intermediate=dense_width,
        vocab=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
        v_head_dim=v_head_dim,
        experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        expert_intermediate=int(expert_width or 0),
        shared_intermediate=shared,
        moe_layers=moe_layers,
        attention_params=attention_params,
        rope_dim=rope_dim,
    )


def read_config(path) -> ModelConfig:
    """The ModelConfig of a transformers config.json, or of a checkpoint folder holding one."""
    import json
    import os

    file = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
    if not os.path.isfile(file):
        raise ValueError(f"--model {path}: no such config.json (give a transformers config.json or its folder)")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {path}: a config.json holds a JSON object, not {type(cfg).__name__}")
    base = os.path.basename(file)
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) if base == "config.json" else base
    return model_config(cfg, name)


def resolve_model(spec) -> ModelConfig:
    """--model: a ModelConfig, a LLaMA preset's name, or a config.json / checkpoint folder."""
    import os

    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, ModelShape):
        return ModelConfig(
            spec.name,
            spec.n_layers,
            spec.hidden,
            spec.n_heads,
            spec.n_kv_heads,
            spec.hidden // spec.n_heads,
            spec.ffn_hidden,
            spec.vocab,
        )
    if os.path.exists(str(spec)) or str(spec).endswith(".json") or os.sep in str(spec):
        return read_config(spec)
    return config_from_preset(spec)


def mode_problems(checkpoint_layers, save_attention, offload_activations, ffn_tile) -> list[str]:
    """What finetune's flag check refuses among these memory flags (its words), one line each."""
    found = [
        f"--{flag} needs --checkpoint-layers (it changes what a checkpointed layer keeps)"
        for flag, on in (("save-attention", save_attention), ("offload-activations", offload_activations))
        if on and not checkpoint_layers
    ]
    if ffn_tile is not None and (not isinstance(ffn_tile, int) or isinstance(ffn_tile, bool) or ffn_tile < 0):
        found.append(f"--ffn-tile {ffn_tile}: must be a positive number of tokens, or 0 (untiled)")
    return found


@dataclass(frozen=True)
class MemoryModes:
    """The memory flags of `ringwise finetune` (ringwise/train/config.py), with their names."""

    checkpoint_layers: bool = False
    save_attention: bool = False
    offload_activations: bool = False
    ffn_tile: int | None = None  # None: automatic (the hidden size, at least MIN_FFN_TILE); 0: untiled
    offload_params: bool = False  # the model state in host memory (FSDP2's CPUOffloadPolicy), the optimizer on the CPU

    def __post_init__(self):
        found = mode_problems(self.checkpoint_layers, self.save_attention, self.offload_activations, self.ffn_tile)
        if found:
            raise ValueError("; ".join(found))

    def tile(self, model: ModelConfig) -> int:
        """Tokens per feed-forward tile; 0: untiled."""
        return max(model.hidden, MIN_FFN_TILE) if self.ffn_tile is None else self.ffn_tile

    def flags(self) -> list[str]:
        names = ("checkpoint_layers", "save_attention", "offload_activations", "offload_params")
        out = [f"--{f.replace('_', '-')}" for f in names if getattr(self, f)]
        return out + ([] if self.ffn_tile is None else ["--ffn-tile", str(self.ffn_tile)])


OFFLOAD_IN_FLIGHT = 2  # layers' inputs on the device while offloaded: the one in use, the one below (prefetched)
SEQUENCE_INT64 = 3  # int64 tensors per local token through the step: token ids, labels, positions


def _pow2(n: float) -> int:
    """n bytes as the pinned (page-locked) host allocator reserves them: rounded up to a power of two (torch's
    CachingHostAllocator, by default; see ledger)."""
    n = int(math.ceil(n))
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _ffn_per_token(model: ModelConfig, e: float, moe: bool) -> tuple[float, float]:
    """(saved, gradient) bytes one token's feed-forward holds in its backward.

    Dense SwiGLU (transformers' LlamaMLP: down(act(gate(x)) * up(x))): saved gate (act's input), up,
    act(gate) and their product (down's input), 4 x intermediate; in backward, while mul's grads are made,
    d(product), d(act), d(up) (3 x intermediate) exist with gate, up and act still saved: 2 x intermediate
    more than the saved. MoE: per routed token the same for its expert's width, plus the token's copies
    in and out of the expert (2 x hidden), and the router's logits and probabilities (2 x experts); the
    shared experts as a dense SwiGLU of their total width."""
    if not moe:
        return 4 * model.intermediate * e, 2 * model.intermediate * e
    k, fe, fs = model.experts_per_token, model.expert_intermediate, model.shared_intermediate
    saved = k * (4 * fe + 2 * model.hidden) * e + 4 * fs * e + 2 * model.experts * e
    return saved, 2 * (k * fe + fs) * e


def _norm_per_token(h: int, e: float, tiled: bool, input_kept: bool) -> float:
    """Bytes one token's norm keeps for backward (transformers' LlamaRMSNorm: x32 = x.to(float32);
    x32 * rsqrt(mean(x32^2) + eps), cast to the compute dtype; weight * that).

    Untiled: pow and mul keep x32 (4h: a copy, or in fp32 the input itself, free when `input_kept`),
    rsqrt its fp32 output (4), the weight's mul the normalised tensor in the compute dtype (h x e); the
    output (h x e) is kept by the module that follows. Tiled (hf_tiling, under non-reentrant checkpoint):
    those exist for one tile; the output stays whole, and so does the input, which the tiles'
    checkpoints keep (free when `input_kept`)."""
    if tiled:
        return h * e + (0 if input_kept else h * e)
    return (0 if input_kept and e == 4 else 4 * h) + 2 * h * e + 4


def device_terms(model, dtype="bf16", world=1, modes=MemoryModes(), device_type="cuda") -> dict:
    """Per local token, the bytes on the device by term: what one layer keeps through the step, and each
    backward moment's working set. Every term is a tensor read off the code (h = hidden, e = the compute
    dtype's bytes, H = heads; widths as ModelConfig's), and was checked against a census of the live
    tensors at each moment of a `ringwise finetune` step on CPU (benchmarks/plan_ledger.py --census):

    * kept per layer (--checkpoint-layers): the layer's input, h x e (offloaded by --offload-activations);
      --save-attention adds its attention output and fp32 lse (heads x v_head_dim x e + 4H), which stay on
      the device even when offloading (torch keeps them in the checkpoint's own storage, which saved-tensor
      hooks do not see). Without checkpointing a layer keeps its whole activations (attention part, second
      norm, untiled feed-forward saved).
    * sequence inputs, kept through the step: the rotary cos and sin (2 x rope dims x e, computed once and
      passed to every layer) and the int64 token ids, labels and positions (24 bytes).
    * the norms (_norm_per_token): untiled, transformers' RMSNorm keeps a float32 version of its input (a
      copy, or in fp32 the input itself), its normalised output in the compute dtype and its output, plus its
      fp32 rstd; tiled (hf_tiling, same switch as --ffn-tile), its output, and its input where no layer
      checkpoint holds it (the tiles' checkpoints keep it).
    * attention part (the recomputed layer's saved activations): the first norm; rotary's outputs q and k
      and the projection's v (the ring saves them as they are: rotary's outputs come out in the (tokens,
      heads) layout, so the op's contiguous() copies nothing), the attention output and its fp32 lse (not
      under --save-attention: the layer keeps those).
    * "ffn" moment, a feed-forward tile's backward (tiled) or the SwiGLU's product's backward (untiled):
      the attention part, the second norm (its input, the residual after attention, is kept by its tiles'
      checkpoints), the layer's output gradient (h x e); tiled, the second norm output's gradient, into which
      each tile's input gradient is accumulated (h x e; a tile's intermediates are a constant); untiled, the
      feed-forward's saved tensors and gradients (_ffn_per_token).
    * "ffn input gradient" moment (tiled): a tile's input gradient leaves its slice's backward as a
      zero-padded tensor of the whole shard, added into the accumulator: 3 h x e with the layer's output
      gradient, and no tile's intermediates.
    * "attention" moment: the attention part, the residual gradient and the attention output's gradient
      (h x e + o x e), the ring's float32 dQ and dK/dV accumulators (4(q + k + v)), the lse's gradient,
      which autograd materialises as zeros (4H), the compute-dtype dQ, dK, dV that the tile kernel returns
      for its rows and columns (the whole shard's on one rank; on a zigzag ring a tile has all the rows and
      half the columns, or the reverse) and then the ring (e(q + k + v)); on CUDA in bf16/fp16 (cuDNN's
      kernel, ringwise's choice there), cuDNN's backward workspace for the tile's rows, 8q + 4H bytes per
      row (two float32 query-wide buffers and float32 row sums: measured on an H200, cuDNN 9.19, torch
      2.11; `device_type`); on a ring (W > 1) the visiting K, V (double buffered from W = 3, one pair at
      W = 2) and the travelling dK/dV: the accumulator in flight and its receive buffer (2 x 4(k + v)).
    * "loss" moment, a loss chunk's backward: the final norm and the hidden's gradient (h x e; the chunk's
      logits are a constant); "loss input gradient" moment: a chunk's gradient, zero-padded to the shard,
      with the accumulator (2h x e).
    """
    model = resolve_model(model)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    positive("world", world, integer=True)
    e, h, H = DTYPE_BYTES[dtype], model.hidden, model.n_heads
    q, k, v, o = model.q_width, model.k_width, model.v_width, model.o_width
    tiled = modes.tile(model) > 0
    norm = _norm_per_token(h, e, tiled, input_kept=False)
    first_norm = _norm_per_token(h, e, tiled, input_kept=modes.checkpoint_layers)
    attention_out = o * e + 4 * H
    attention_part = first_norm + (q + k + v) * e + (0 if modes.save_attention else attention_out)
    ffn_saved, ffn_grads = _ffn_per_token(model, e, model.moe_layers > 0)
    inputs = {
        "rotary cos and sin": 2 * (model.rope_dim or model.head_dim) * e,
        "token ids, labels, positions": 8 * SEQUENCE_INT64,
    }
    ring = 0 if world == 1 else min(2, world - 1) * (k + v) * e + 2 * 4 * (k + v)
    # the layer being recomputed keeps its saved activations; without checkpointing every layer keeps them
    part = {"attention part": attention_part} if modes.checkpoint_layers else {}
    second = {"second norm": norm} if modes.checkpoint_layers else {}
    ffn = {**part, **second, "layer output gradient": h * e}
    if tiled:
        ffn["second norm output's gradient"] = h * e
    else:
        ffn.update({"ffn saved": ffn_saved} if modes.checkpoint_layers else {})
        ffn["ffn gradients"] = ffn_grads
    # the tile kernel's backward: its dQ, dK, dV for the tile's rows and columns (one tile of the whole shard on
    # one rank; zigzag's largest on a ring: all rows and half the columns, or the reverse) and, cuDNN's, its
    # workspace for the rows; after the tiles, the ring's own outputs in the compute dtype, e(q + k + v)
    shapes = ((1, 1),) if world == 1 else ((1, 0.5), (0.5, 1))
    cudnn = device_type == "cuda" and dtype != "fp32" and 64 <= model.head_dim <= 256
    kernel = max(
        max(e * (r * q + c * (k + v)) + (r * (8 * q + 4 * H) if cudnn else 0) for r, c in shapes),
        e * (q + k + v),
    )
    working = {
        "ffn": ffn,
        "attention": {
            **part,
            "residual gradient and dout": (h + o) * e,
            "ring's fp32 dQ, dK, dV": 4 * (q + k + v),
            "lse gradient (zeros)": 4 * H,
            ("kernel's dQ, dK, dV and cuDNN workspace" if cudnn else "kernel's dQ, dK, dV"): kernel,
            **({"ring buffers in flight": ring} if ring else {}),
        },
    }
    if tiled:
        working["ffn input gradient"] = {**part, **second, "output, accumulated and tile gradients": 3 * h * e}
    every_layer = attention_part + norm + (0 if tiled else ffn_saved)  # what an uncheckpointed layer keeps
    return dict(
        layer_input=h * e if modes.checkpoint_layers else 0,
        attention_kept=attention_out if modes.checkpoint_layers and modes.save_attention else 0,
        every_layer=0 if modes.checkpoint_layers else every_layer,
        inputs=inputs,
        working=working,
        loss={"final norm": norm, "hidden gradient": h * e},
        loss_input_gradient={"final norm": norm, "hidden gradient and a chunk's": 2 * h * e},
        ffn_saved=ffn_saved,
        ffn_grads=ffn_grads,
    )


@dataclass(frozen=True)
class Ledger:
    """One training step's memory per rank (`ringwise finetune` of ``model``), term by term, at each moment
    (phase) of the step whose peak can be the step's (see `ledger`)."""

    model: ModelConfig
    dtype: str
    world: int
    modes: MemoryModes
    stored_per_token: dict  # bytes per local token kept through the step (device), at the top layer's backward
    phases_per_token: dict  # {phase: {term: bytes per local token on the device}}, kept terms included
    phase_constants: dict  # {phase: {term: bytes}} independent of the length, model state included
    model_state: float  # bytes per rank: FSDP2 shards of fp32 weights, gradients, AdamW m and v (16 a parameter)
    host_per_token: float  # bytes per local token in host memory (offloaded checkpoints), before pinned rounding
    host_constant: float = 0.0  # host bytes per rank of any length: the model state under --offload-params
    host_terms: tuple = ()  # ((term, bytes), ...) of host_constant

    def phase_bytes(self, phase: str, tokens: float) -> float:
        """Device bytes at the peak of `phase` with `tokens` local tokens."""
        return sum(self.phase_constants[phase].values()) + sum(self.phases_per_token[phase].values()) * tokens

    def peak(self, tokens: float) -> tuple[float, str]:
        """(device bytes, the phase that peaks) at `tokens` local tokens."""
        return max((self.phase_bytes(p, tokens), p) for p in self.phases_per_token)

    def bytes_per_token(self, phase: str | None = None) -> float:
        """Device bytes per local token: of `phase`, or of the phase with the most per token (the one
        that peaks at long contexts)."""
        phases = [phase] if phase else list(self.phases_per_token)
        return max(sum(self.phases_per_token[p].values()) for p in phases)

    def slope(self, short: int, long: int) -> float:
        """Bytes per token of the peak between two local lengths (what a two-length measurement sees)."""
        return (self.peak(long)[0] - self.peak(short)[0]) / (long - short)

    def host_bytes(self, tokens: float) -> float:
        """Host bytes per rank at `tokens` local tokens: the model state under --offload-params and every layer's
        offloaded checkpoint, each a pinned tensor rounded up to a power of two."""
        per_layer = self.host_per_token / self.model.n_layers
        return self.host_constant + (self.model.n_layers * _pow2(tokens * per_layer) if per_layer else 0)

    def max_tokens_per_rank(self, device_bytes: float, host_bytes: float | None = None, ranks_per_host=1) -> int:
        """Most local tokens whose peak fits `device_bytes` (and whose host memory, `ranks_per_host` ranks of
        it, fits `host_bytes`), even (zigzag cuts a rank's share in two); 0 if none."""
        if max(self.phase_bytes(p, 0) for p in self.phases_per_token) > device_bytes:
            return 0
        n = min(
            int((device_bytes - self.phase_bytes(p, 0)) / (self.phase_bytes(p, 1) - self.phase_bytes(p, 0)))
            for p in self.phases_per_token
            if self.phase_bytes(p, 1) > self.phase_bytes(p, 0)
        )
        if host_bytes is not None and (self.host_constant or self.host_per_token):
            fits = lambda m: self.host_bytes(m) * ranks_per_host <= host_bytes  # noqa: E731
            if not fits(0):
                return 0
            if not fits(n):
                lo, hi = 0, n  # fits(lo), not fits(hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
                n = lo
        return max(n - n % 2, 0)


def ledger(model, world=1, dtype="bf16", modes=MemoryModes(), device_type="cuda") -> Ledger:
    """The memory ledger of `ringwise finetune` on ``world`` ranks (one ring over them all).

    Its phases are the moments of the step whose peak can be the step's: a loss chunk's backward (every layer's
    checkpoint kept) and its input gradient; each layer moment of device_terms (ffn, ffn input gradient,
    attention) at layers L-1, L-2, 1 and 0. Backward reaches the top layer first (every checkpoint kept, no
    gradient shard yet) and layer 0 last (one checkpoint, the other layers' gradient shards); each layer done
    frees a checkpoint and adds a gradient shard, the same bytes every layer, so between layers L-2 and 1 the
    peak is at one end; the top layer holds no reduce-scatter input of a layer above, layer 0 prefetches no
    layer below and, offloaded, has none below to fetch. Then the end of backward (the root unit's
    reduce-scatter) and the optimizer step. Checked against allocations: benchmarks/plan_ledger.py (--census on
    CPU; --device cuda, on an H200, within 64 MiB of four peaks, the bytes per token exact; BENCHMARKS.md).
    Constants (bytes, not per token), from ringwise/train/mesh.py's shard_model, pretrained.py and torch's
    FSDP2 (torch/distributed/fsdp/_fully_shard):

    * model state: FSDP2 keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes a
      parameter) in 1/world shards; the weights and moments are there through the step, a unit's gradient
      shard from its reduce-scatter on (zero_grad(set_to_none=True) frees them after each step). The optimizer
      step adds AdamW's temporary: on CUDA (`device_type`) the foreach implementation's, the size of all the
      parameters (torch._foreach_sqrt of v); on a CPU, which runs AdamW a tensor at a time, the largest shard's.
      --offload-params (FSDP2's CPUOffloadPolicy) keeps all of it in host memory: the device holds none, and
      each unit's fp32 reduce-scatter output only until its copy to the host.
    * gathered weights: FSDP2 gathers one decoder layer at a time in the compute dtype and, on more than
      one rank, prefetches the next in backward (2 layers; one rank makes its unsharded weights from its
      shard when the layer runs: 1); the layer's gradients exist in the compute dtype, and below the top
      layer the layer above's fp32 reduce-scatter input is held until this layer's reduce-scatter. The root
      unit (embeddings, final norm, output matrix) is gathered through the step (FSDP2 does not reshard the
      root after forward), and the output matrix's gradient waits in the compute dtype until the root's
      reduce-scatter at the end: its gradients in the compute dtype, its fp32 reduce-scatter input and, on one
      rank, where FSDP2 copies the input divided by the gradient divide factor (ringwise sets 1.0) instead of
      reducing it, that quotient as a temporary beside the input and the output.
    * loss: a chunk of LOSS_CHUNK tokens' logits through the vocabulary: fp32 log-probabilities kept,
      their gradient and the logits' gradient in backward (3 fp32 copies), plus the compute-dtype logits
      where that is not fp32.
    * tiled feed-forward: one tile's saved tensors and gradients (T tokens of the FFN per-token terms).

    Host, per rank (pinned memory is what torch's CUDA host allocator gives: each allocation rounded up to a
    power of two, unless PYTORCH_CUDA_ALLOC_CONF's pinned_max_round_threshold says otherwise):
    * --offload-activations: each layer's input, one pinned tensor a layer (ringwise.checkpointing).
    * --offload-params: each parameter's fp32 shard and its gradient, pinned (FSDP2 pins the shards; the
      gradients arrive by non-blocking copies, which pin), AdamW's m and v (pageable, like the parameters they
      are made from: zeros_like does not pin), and the CPU step's one temporary of the largest shard.
    """
    model = resolve_model(model)
    positive("world", world, integer=True)
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type {device_type!r}: 'cuda' or 'cpu'")
    t = device_terms(model, dtype, world, modes, device_type)
    e, W, L = DTYPE_BYTES[dtype], world, model.n_layers
    P, root = model.layer_params, model.root_params
    off = modes.offload_params
    state = {} if off else {"fp32 weights and AdamW moments (shards)": model.n_params * 12 / W}
    kept_root = {"root unit gathered": root * e, "output matrix gradient": model.vocab * model.hidden * e}

    def kept(below: int | None) -> dict:
        """Per-token bytes the layers keep while backward is at layer `below` (None: the loss, before any):
        layers 0..below keep their checkpoints, the others are done."""
        layers = L if below is None else below + 1
        if not modes.checkpoint_layers:
            return {"every layer's activations": layers * t["every_layer"]}
        inputs = layers
        if modes.offload_activations:  # on the device: the layer's input, fetched, and the one below, prefetched
            inputs = 0 if below is None else min(OFFLOAD_IN_FLIGHT, layers)
        out = {"layer checkpoints": inputs * t["layer_input"]}
        if t["attention_kept"]:
            out["kept attention outputs"] = layers * t["attention_kept"]
        return {k: v for k, v in out.items() if v}

    tile = modes.tile(model)
    ffn_tile = {"ffn tile": tile * (t["ffn_saved"] + t["ffn_grads"])} if tile else {}
    per_token: dict[str, dict] = {}
    constants: dict[str, dict] = {}
    prefetched = {} if W == 1 else {"top layer, prefetched": P * e}
    per_token["loss"] = {**kept(None), **t["inputs"], **t["loss"]}
    constants["loss"] = {
        **state,
        **kept_root,
        **prefetched,
        "logits chunk": LOSS_CHUNK * model.vocab * (12 + (e if e != 4 else 0)),
    }
    per_token["loss input gradient"] = {**kept(None), **t["inputs"], **t["loss_input_gradient"]}
    constants["loss input gradient"] = {**state, **kept_root, **prefetched}
    layer_params = model.n_params - root
    for i in sorted({L - 1, max(L - 2, 0), min(1, L - 1), 0}, reverse=True):
        fixed = {**state}
        if not off and i < L - 1:
            fixed["gradient shards of the layers above"] = layer_params * (L - 1 - i) / L * 4 / W
        fixed.update(kept_root)
        fixed["gathered layers"] = (2 if W > 1 and i > 0 else 1) * P * e  # this one and, on a ring, the next
        fixed["layer gradients"] = P * e
        if i < L - 1:
            fixed["reduce-scatter input above"] = P * 4
        for moment, terms in t["working"].items():
            name = f"{moment}, layer {i}"
            per_token[name] = {**kept(i), **t["inputs"], **terms}
            constants[name] = {**fixed, **(ffn_tile if moment == "ffn" else {})}
    per_token["end of backward"] = {"token ids, labels, positions": t["inputs"]["token ids, labels, positions"]}
    constants["end of backward"] = {
        **state,
        **({} if off else {"gradient shards": model.n_params * 4 / W}),
        "root reduce-scatter input": root * 4,
        # one rank's "reduce-scatter" is a copy of the input divided by the divide factor: a temporary
        **({"root gradients": root * e} if W > 1 else {"root reduce-scatter input, divided": root * 4}),
        **({"root reduce-scatter output": root * 4 / W} if off else {}),
    }
    shards = [math.ceil(rows / W) * cols for rows, cols in model.weight_shapes()]
    if not off:
        per_token["optimizer step"] = {}
        constants["optimizer step"] = {
            "fp32 weights, gradients, AdamW moments (shards)": model.n_params * 16 / W,
            "AdamW temporary": 4 * (sum(shards) if device_type == "cuda" else max(shards)),
        }
    host_terms: tuple = ()
    if off:
        pinned = sum(_pow2(n * 4) for n in shards)
        host_terms = (
            ("fp32 weight shards, pinned", pinned),
            ("fp32 gradient shards, pinned", pinned),
            ("AdamW m and v", 8 * sum(shards)),
            ("CPU AdamW temporary", 4 * max(shards)),
        )
    stored = {**kept(L - 1), **t["inputs"]}
    return Ledger(
        model=model,
        dtype=dtype,
        world=world,
        modes=modes,
        stored_per_token=stored,
        phases_per_token=per_token,
        phase_constants=constants,
        model_state=model.n_params * 16 / world,
        host_per_token=L * t["layer_input"] if modes.offload_activations else 0,
        host_constant=sum(b for _, b in host_terms),
        host_terms=host_terms,
    )


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _ranks(n: int) -> str:
    return f"{n} rank{'s' if n != 1 else ''}"


def _describe(model: ModelConfig) -> str:
    moe = (
        f", {model.moe_layers} MoE layers of {model.experts} experts ({model.experts_per_token} per token, width "
        f"{model.expert_intermediate}{f', shared {model.shared_intermediate}' if model.shared_intermediate else ''})"
        if model.moe_layers
        else ""
    )
    return (
        f"{model.name} ({model.n_params / 1e9:.2f}B params; {model.n_layers} layers, hidden {model.hidden}, "
        f"{model.n_heads} heads / {model.n_kv_heads} kv of {model.head_dim}, ffn {model.intermediate}, vocab "
        f"{model.vocab}{', tied' if model.tied else ''}{moe})"
    )


def finetune_command(model_path: str, n_devices: int, ranks_per_host: int, tokens: int, dtype: str, modes) -> str:
    """The `ringwise finetune` command line that trains at `tokens` global tokens with these memory modes."""
    nodes = max(1, n_devices // ranks_per_host)
    launch = (
        f"torchrun --nproc-per-node {min(n_devices, ranks_per_host)}"
        + (f" --nnodes {nodes}" if nodes > 1 else "")
        + " -m ringwise.cli finetune"
        if n_devices > 1
        else "ringwise finetune"
    )
    return " ".join(
        [launch, "--model", model_path, "--text DATA --seq-len", str(tokens), "--dtype", dtype, *modes.flags()]
    )


def ledger_report(
    model,
    device,
    n_devices,
    dtype="bf16",
    modes=MemoryModes(checkpoint_layers=True),
    host_bytes=None,
    ranks_per_host=None,
    reserve_bytes=2 * GIB,
    model_path="PATH",
) -> str:
    """The ledger in words: every input, bytes per token on device and host, model state, the one-layer
    working set, the longest context and the `ringwise finetune` command that trains at it."""
    model, device = resolve_model(model), get_device(device)
    positive("n_devices", n_devices, integer=True)
    ranks_per_host = min(n_devices, 8) if ranks_per_host is None else positive("ranks_per_host", ranks_per_host, True)
    led = ledger(model, n_devices, dtype, modes)
    usable = device.memory_bytes - reserve_bytes
    tile = modes.tile(model)
    flags = " ".join(modes.flags()) or "(no memory flags: every layer keeps its activations)"
    lines = [
        f"plan: {_describe(model)}",
        f"inputs: {n_devices} x {device.name} ({_gib(device.memory_bytes)}, {_gib(reserve_bytes)} reserved for "
        f"the CUDA context and allocator: {_gib(usable)} usable), one ring over all {n_devices}; {dtype} compute; "
        f"{flags}; feed-forward {f'tiled by {tile} tokens' if tile else 'untiled'}"
        f"{' (automatic: the hidden size)' if modes.ffn_tile is None and tile else ''}; model state "
        + ("in host memory" if modes.offload_params else "on the device")
        + "; host memory "
        + (f"{host_bytes / 1e9:g} GB per {_ranks(ranks_per_host)}" if host_bytes is not None else "not limited")
        + f"; loss chunks of {LOSS_CHUNK} tokens",
    ]
    state = (
        f"model state per rank: {_gib(led.model_state)} ({model.n_params / 1e9:.2f}B params x 16 bytes (fp32 "
        f"weights, gradients, AdamW m and v) / {n_devices} FSDP2 shards)"
    )
    if modes.offload_params:
        state += " in host memory (--offload-params; the optimizer step runs on the CPU): " + ", ".join(
            f"{name} {_gib(b)}" for name, b in led.host_terms
        )
    else:
        state += " on the device"
    lines.append(state)
    phase = max(led.phases_per_token, key=lambda p: led.bytes_per_token(p))
    lines.append(
        f"device bytes per local token: {led.bytes_per_token():,.0f} (the backward's {phase} moment, the one that "
        "grows fastest):"
    )
    for name, v in led.phases_per_token[phase].items():
        where = "kept through the step" if name in led.stored_per_token else "one layer's working set"
        lines.append(f"  {name:<40}{v:>10,.0f}  {where}")
    others = ", ".join(f"{p} {led.bytes_per_token(p):,.0f}" for p in led.phases_per_token if p != phase)
    lines.append(f"  (other moments' bytes per token: {others})")
    lines.append(
        f"host bytes per local token: {led.host_per_token:,.0f}"
        + (
            " (every layer's checkpoint, offloaded: one pinned tensor a layer, rounded up to a power of two)"
            if led.host_per_token
            else " (nothing offloaded)"
        )
    )
    n = led.max_tokens_per_rank(usable, host_bytes, ranks_per_host)
    if not n:
        need = max(led.phase_bytes(p, 0) for p in led.phases_per_token)
        if need <= usable:  # the device holds the constants: host memory does not
            lines.append(
                f"longest context: none fits: the host needs {led.host_constant * ranks_per_host / 1e9:,.0f} GB for "
                f"the model state of {_ranks(ranks_per_host)}, of {host_bytes / 1e9:g} GB"
            )
        else:
            lines.append(
                f"longest context: none fits: model state and constants need {_gib(need)} per device of "
                f"{_gib(usable)} usable (more devices shard the model state further; --offload-params keeps it in "
                "host memory)"
            )
        return "\n".join(lines)
    peak, at = led.peak(n)
    by_device = led.max_tokens_per_rank(usable)
    limit = "host memory" if by_device > n + 1 else f"device memory ({at} moment)"
    lines += [
        f"one-layer working set at {n:,} local tokens ({at} moment): "
        + _gib(
            sum(v for name, v in led.phases_per_token[at].items() if name not in led.stored_per_token) * n
            + led.phase_constants[at].get("ffn tile", 0)
        ),
        "constants: " + ", ".join(f"{k} {_gib(v)}" for k, v in led.phase_constants[at].items()),
        f"longest context: {n * n_devices:,} tokens ({n:,} per rank; limited by {limit}); peak {_gib(peak)} per "
        f"device"
        + (
            f", host {led.host_bytes(n) * ranks_per_host / 1e9:,.0f} GB per {_ranks(ranks_per_host)}"
            if led.host_per_token or led.host_constant
            else ""
        ),
        "reach it: " + finetune_command(model_path, n_devices, ranks_per_host, n * n_devices, dtype, modes),
    ]
    return "\n".join(lines)


MODES_COMPARED = (
    MemoryModes(ffn_tile=0),
    MemoryModes(checkpoint_layers=True, ffn_tile=0),
    MemoryModes(checkpoint_layers=True),
    MemoryModes(checkpoint_layers=True, save_attention=True),
    MemoryModes(checkpoint_layers=True, offload_activations=True),
    MemoryModes(checkpoint_layers=True, save_attention=True, offload_activations=True),
    MemoryModes(checkpoint_layers=True, offload_params=True),
    MemoryModes(checkpoint_layers=True, offload_activations=True, offload_params=True),
    MemoryModes(checkpoint_layers=True, save_attention=True, offload_activations=True, offload_params=True),
)


def modes_table(model, device, n_devices, dtype="bf16", host_bytes=None, ranks_per_host=None, reserve_bytes=2 * GIB):
    """The longest context under each memory mode (MODES_COMPARED), one line each."""
    model, device = resolve_model(model), get_device(device)
    ranks_per_host = min(n_devices, 8) if ranks_per_host is None else ranks_per_host
    usable = device.memory_bytes - reserve_bytes
    lines = ["longest context by memory mode (same inputs):"]
    for modes in MODES_COMPARED:
        led = ledger(model, n_devices, dtype, modes)
        n = led.max_tokens_per_rank(usable, host_bytes, ranks_per_host)
        label = " ".join(modes.flags()) or "(none)"
        lines.append(f"  {label:<78}{n * n_devices:>14,} tokens  {led.bytes_per_token():>9,.0f} B/token")
    return "\n".join(lines)
