"""The attention op's front door: checked once for the whole mesh, one operator for torch.compile.

`ring_attention` turns its options into an `AttentionSpec` (spec.py: normalised, the options
checked) and calls one custom operator, `torch.ops.ringwise.attention` (forward), with its
own autograd (`ringwise.attention_backward`), so dynamo traces a model around it as one
opaque call, and eager code runs the very same path. Both operators' schemas, their fake
rules and what the backward keeps are derived from the spec's fields. Process groups travel
by name.

Inside the operator, a validated call makes exactly one cross-rank collective before any
ring traffic: each rank's verdict (its problem: the options', the tensors', the mesh's, or
an objection the caller hands in, e.g. the transformers integration's) and its call's
signature are all-gathered, and every rank raises the same error if any rank objected or
the ranks disagree. On a (ulysses x ring) mesh that gather runs over the group that holds
the mesh's ranks (`mesh_group`, by default the default group: see ulysses.py). Then the call
is dispatched to the ring engine (ring.py) or, with a ulysses group of more than one rank,
to the Ulysses wrapper (ulysses.py), which calls the engine directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Optional, Protocol, Union, overload

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import checks
from .checks import MeshVerdict, Signature, Verdict
from .comm import Ring, all_gather_objects, resolve_transport
from .kernels import Kernel, acc_dtype, default_scale
from .ring import Engine, ring_backward, ring_forward, sink_grad
from .spec import NAMES, TENSORS, AttentionSpec, mask_mod_function, mask_mod_identity, process_group, schema_args
from .tiles import Mask, Spans
from .ulysses import SeqMesh, head_chunk_shapes, ulysses_backward, ulysses_forward

Tensor = torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class _Call:
    """One checked call: what the engine needs, and this rank's part of the verdict."""

    ring: Ring
    mesh: Optional[SeqMesh]  # None: no ulysses group; else this rank's place in the mesh
    engine: Optional[Engine]  # None when there is a problem
    problem: Optional[str]
    sig: Signature

    @property
    def ulysses_mesh(self) -> Optional[SeqMesh]:
        """The mesh where the Ulysses wrapper runs (a ulysses group of more than one rank), else None."""
        return self.mesh if self.mesh is not None and self.mesh.size > 1 else None

    def ready(self) -> Engine:
        """The engine of a call without a problem (a call with one raises it, as _prepare does)."""
        if self.engine is None:
            raise ValueError(f"ring_attention: {self.problem}")
        return self.engine


def _mesh(spec: AttentionSpec, transport: str) -> Optional[SeqMesh]:
    """This rank's place in the (ulysses x ring) mesh, or None without a ulysses group. A rank
    outside the mesh's own group is raised at once: no rank of that group waits for it."""
    if spec.ulysses_group is None:
        return None
    if not _distributed():
        raise ValueError("ring_attention: ulysses_group needs an initialised process group")
    mesh = SeqMesh(
        process_group(spec.ulysses_group), process_group(spec.group), transport, process_group(spec.mesh_group)
    )
    if not mesh.in_mesh_group:
        raise ValueError(
            f"ring_attention: this process (global rank {mesh.rank}) is not in mesh_group; pass the "
            "group that holds exactly the ranks of this rank's (ulysses x ring) mesh"
        )
    return mesh


def _check(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    positions: Optional[Tensor] = None,
    objection: Optional[str] = None,
) -> _Call:
    """Every check of this rank that needs the tensors or the groups, without communication;
    problems are recorded, never raised (except a rank outside its own group, which no other
    rank waits for). The options alone were checked by AttentionSpec.from_options."""
    problem = objection
    try:
        transport = resolve_transport(spec.transport)
    except ValueError as e:
        problem, transport = problem or str(e), "direct"
    mesh = _mesh(spec, transport)
    problem = problem or (mesh.membership_problem() if mesh is not None else None)
    # a mesh rank outside the ring still joins the verdict; its (never used) ring is the default group's
    ring = Ring(process_group(spec.group) if mesh is None or mesh.r >= 0 else None, transport)
    U = mesh.size if mesh is not None else 1
    problem = problem or checks.tensor_problem(q, k, v) or checks.sinks_problem(q, spec.sinks)
    docs: Optional[tuple[int, ...]] = None
    groups: Optional[Spans] = None
    kernel: Optional[Kernel] = None
    if not problem:
        if mesh is not None:
            problem = checks.ulysses_problem(q, k, spec.layout, U, ring.world_size)
        ring_len = q.shape[1] * U  # the ring runs on U pieces gathered
        problem = problem or checks.layout_problem(spec.layout, ring_len, ring.world_size)
        total = ring_len * ring.world_size
        if not problem:
            docs, problem = checks.documents(spec.cu_seqlens, spec.document_ids, total)
            docs = checks.chunked_bounds(docs, spec.chunk, total)
        if not problem:
            groups, problem = checks.group_spans(spec.group_ids, total, spec.causal, docs)
        if not problem:
            kernel, problem = checks.kernel_or_problem(spec.backend, q)
        u = (mesh.u, mesh.size) if mesh is not None else (0, 1)
        problem = problem or checks.position_problem(positions, spec.layout, ring.rank, ring.world_size, *u, q.shape[1])
    if problem:
        return _Call(ring, mesh, None, problem, ())
    assert kernel is not None, "kernel_or_problem gives a kernel or a problem"
    scale = default_scale(q.shape[-1]) if spec.softmax_scale is None else spec.softmax_scale
    sig = (("q shape", tuple(q.shape)), ("k/v shape", tuple(k.shape)), ("dtype", str(q.dtype))) + spec.signature(
        softmax_scale=repr(scale),
        cu_seqlens=docs,
        group_ids=groups,
        mask_mod=mask_mod_identity(spec.mask_mod),
        transport=ring.transport,
    )
    right = None if spec.causal else spec.window_right
    mask = Mask(spec.causal, docs, spec.window, right, groups, mask_mod_function(spec.mask_mod))
    engine = Engine(scale, spec.layout, ring, kernel, mask, spec.softcap)
    return _Call(ring, mesh, engine, None, sig)


def verdict(call: _Call) -> None:
    """Raise the same error on every rank, before any ring traffic: one all-gather of every
    rank's problem and signature, over the ring's group or the mesh's."""
    me: Verdict = {"rank": dist.get_rank() if _distributed() else 0, "problem": call.problem, "sig": call.sig}
    views: Optional[dict[int, MeshVerdict]] = None  # on a mesh: every rank's view of it, by global rank
    infos: Sequence[Verdict]
    # in global rank order, whatever the group's order
    if call.mesh is not None:
        mine: MeshVerdict = {**me, **call.mesh.ranks()}
        mesh_infos = sorted(all_gather_objects(mine, call.mesh.mesh_group), key=lambda i: i["rank"])
        views, infos = {i["rank"]: i for i in mesh_infos}, mesh_infos
    else:
        infos = sorted(
            all_gather_objects(me, call.ring.group) if call.ring.world_size > 1 else [me], key=lambda i: i["rank"]
        )
    where = "ring_attention (ulysses)" if call.mesh is not None else "ring_attention"
    for i in infos:
        if i["problem"]:
            raise ValueError(
                f"{where}: rank {i['rank']}: {i['problem']}"
                if len(infos) > 1 or _distributed()
                else f"{where}: {i['problem']}"
            )
    problem = checks.mesh_problem(views) if views is not None else None
    problem = problem or checks.signature_mismatch([i["sig"] for i in infos], [i["rank"] for i in infos])
    if problem:
        raise ValueError(f"{where}: {problem}")


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: AttentionSpec,
    positions: Optional[Tensor],
    objection: Optional[str],
    validate: bool,
) -> _Call:
    call = _check(q, k, v, spec, positions, objection)
    if validate:
        verdict(call)
    elif call.problem:  # the caller vouched for the arguments: a local error is all we can give
        raise ValueError(f"ring_attention: {call.problem}")
    return call


# -- the operators: schemas from the spec's fields ------------------------------------------------

_FORWARD_SCHEMA = (
    f"(Tensor q, Tensor k, Tensor v, {schema_args()}, Tensor? positions, str? objection, "
    "bool validate) -> (Tensor, Tensor, Tensor[])"
)
_BACKWARD_SCHEMA = (
    f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] saved, "
    f"{schema_args()}, bool sinks_grad) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _attention(q: Tensor, k: Tensor, v: Tensor, *rest: Any) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse, saved): saved holds the Ulysses head chunks the backward reuses (empty on a plain ring).
    rest: the spec's fields, then positions, objection, validate (typed by _FORWARD_SCHEMA)."""
    spec, (positions, objection, validate) = AttentionSpec.take(rest)
    call = _prepare(q, k, v, spec, positions, objection, validate)
    engine, mesh = call.ready(), call.ulysses_mesh
    if mesh is not None:
        return ulysses_forward(q, k, v, spec.sinks, mesh, engine)
    out, lse = ring_forward(q, k, v, engine, sinks=spec.sinks)
    return out, lse, []


_attention_op = torch.library.custom_op("ringwise::attention", _attention, mutates_args=(), schema=_FORWARD_SCHEMA)


def _ulysses_size(ulysses_group: Optional[str]) -> int:
    return dist.get_world_size(process_group(ulysses_group)) if ulysses_group is not None else 1


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, *rest: Any) -> tuple[Tensor, Tensor, list[Tensor]]:
    spec, _ = AttentionSpec.take(rest)
    B, L, H, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, H, L), dtype=acc_dtype(q.dtype))
    U = _ulysses_size(spec.ulysses_group)
    if U <= 1:
        return out, lse, []
    qh, kh, vh, oh, lh = head_chunk_shapes(tuple(q.shape), k.shape[2], U)
    return (
        out,
        lse,
        [q.new_empty(qh), k.new_empty(kh), v.new_empty(vh), q.new_empty(oh), q.new_empty(lh, dtype=acc_dtype(q.dtype))],
    )


def _attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: list[Tensor], *rest: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty when no sink gradient is asked for. On a Ulysses mesh
    the head chunks in `saved` are all it reads: q, out, lse are dout, and k, v views of dout with
    the kv heads' count (placeholders that cost no memory). rest: the spec's fields, then sinks_grad
    (typed by _BACKWARD_SCHEMA)."""
    spec, (sinks_grad,) = AttentionSpec.take(rest)
    call = _check(q, k, v, spec)  # the forward validated these arguments; this only rebuilds the engine
    engine, mesh = call.ready(), call.ulysses_mesh
    want_sinks = spec.sinks if sinks_grad else None
    dsinks: Optional[Tensor]
    if mesh is not None:
        dq, dk, dv, dsinks = ulysses_backward(dout, saved, want_sinks, k.shape[2], mesh, engine)
    else:
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, engine)
        dsinks = sink_grad(dout, out, lse, want_sinks) if want_sinks is not None else None

    def fresh(t: Tensor) -> Tensor:  # an op's outputs never alias its inputs
        return t if t._base is None else t.clone()

    return fresh(dq), fresh(dk), fresh(dv), (dsinks if dsinks is not None else q.new_empty(0))


_attention_backward_op = torch.library.custom_op(
    "ringwise::attention_backward", _attention_backward, mutates_args=(), schema=_BACKWARD_SCHEMA
)


@_attention_backward_op.register_fake
def _(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, saved: list[Tensor], *rest: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    spec, (sinks_grad,) = AttentionSpec.take(rest)
    sinks = spec.sinks
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad and sinks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


class _Context(Protocol):
    """The autograd context of the forward op, as _setup_context fills it and _backward reads it."""

    spec: AttentionSpec  # without its tensors (those are saved)
    n_inputs: int
    kv_heads: int
    ulysses: bool  # the head chunks are saved, nothing else
    needs_input_grad: tuple[bool, ...]
    saved_tensors: tuple[Optional[Tensor], ...]

    def mark_non_differentiable(self, *args: Tensor) -> None: ...

    def save_for_backward(self, *tensors: Optional[Tensor]) -> None: ...


def _setup_context(ctx: _Context, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, list[Tensor]]) -> None:
    """inputs: the forward op's arguments (typed by _FORWARD_SCHEMA)."""
    q, k, v, *rest = inputs
    spec, _ = AttentionSpec.take(rest)
    out, lse, saved = output
    ctx.spec = spec.without_tensors()  # the spec's tensors are kept by autograd, first
    ctx.n_inputs = len(inputs)
    ctx.kv_heads = k.shape[2]
    ctx.ulysses = bool(saved)
    # lse (and the head chunks) carry no gradient: the backward uses the final lse, it does not
    # differentiate through it, so a loss that reads lse must not get a silently partial gradient
    ctx.mark_non_differentiable(lse, *saved)
    kept = [getattr(spec, n) for n in TENSORS]
    if ctx.ulysses:  # the backward reads the head chunks alone: keep nothing else
        ctx.save_for_backward(*kept, *saved)
    else:
        ctx.save_for_backward(*kept, q, k, v, out, lse)


_SINKS = 3 + NAMES.index("sinks")  # the forward op's input that takes a gradient besides q, k, v


def _backward(
    ctx: _Context, dout: Tensor, _dlse: Optional[Tensor], _dsaved: Sequence[Optional[Tensor]]
) -> tuple[Optional[Tensor], ...]:
    kept = ctx.saved_tensors
    spec = ctx.spec.with_tensors(kept[: len(TENSORS)])
    rest = kept[len(TENSORS) :]
    dout = dout.contiguous()
    qkv_out_lse: tuple[Optional[Tensor], ...]  # the backward op's q, k, v, out, lse
    saved: list[Optional[Tensor]]
    if ctx.ulysses:
        kv = dout[:, :, : ctx.kv_heads]
        qkv_out_lse, saved = (dout, kv, kv, dout, dout), list(rest)
    else:
        qkv_out_lse, saved = rest, []
    sinks_grad = spec.sinks is not None and ctx.needs_input_grad[_SINKS]
    dq, dk, dv, dsinks = torch.ops.ringwise.attention_backward(dout, *qkv_out_lse, saved, *spec.op_args(), sinks_grad)
    grads: list[Optional[Tensor]] = [dq, dk, dv] + [None] * (ctx.n_inputs - 3)
    grads[_SINKS] = dsinks if sinks_grad else None
    return tuple(grads)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# -- the front door -------------------------------------------------------------------------------


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    return_lse: Literal[False] = False,
    validate: bool = True,
    objection: Optional[str] = None,
    position_ids: object = None,
    **options: object,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    return_lse: Literal[True],
    validate: bool = True,
    objection: Optional[str] = None,
    position_ids: object = None,
    **options: object,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    return_lse: bool,
    validate: bool = True,
    objection: Optional[str] = None,
    position_ids: object = None,
    **options: object,
) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    return_lse: bool = False,
    validate: bool = True,
    objection: Optional[str] = None,
    position_ids: object = None,
    **options: object,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """ring_attention (options: its keyword arguments), plus what integrations hand the verdict:
    `objection` (this rank's problem with the call, raised on every rank alike) and `position_ids`
    (checked to be the layout's global positions of this rank's tokens)."""
    spec, problem = AttentionSpec.from_options(options)
    if position_ids is not None and not isinstance(position_ids, Tensor):
        problem, position_ids = problem or "position_ids must be a tensor of global positions", None
    problem = objection or problem
    if not all(isinstance(x, Tensor) for x in (q, k, v)):
        _refuse_untyped(q, k, v, spec, validate)
    q, k, v = _autocast(q, k, v)
    out, lse, _ = torch.ops.ringwise.attention(q, k, v, *spec.op_args(), position_ids, problem, bool(validate))
    return (out, lse) if return_lse else out


def _autocast(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under torch.autocast, q, k and v in the autocast dtype, as SDPA runs there (autocast casts no custom op
    itself; a transformers model under a trainer's bf16 autocast hands float32 q and k, rotated in float32, with a
    bfloat16 v). The casts are differentiable: gradients come back in the inputs' own dtypes."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    q, k, v = (x.to(dtype) if x.is_floating_point() else x for x in (q, k, v))
    return q, k, v


def _refuse_untyped(q: object, k: object, v: object, spec: AttentionSpec, validate: bool) -> NoReturn:
    """q, k or v not a tensor cannot even enter the op: the same verdict, from here, on placeholders."""
    problem = checks.tensor_problem(q, k, v)
    placeholder = torch.zeros(1, 1, 1, 1)
    groups = AttentionSpec(
        layout="contiguous", group=spec.group, ulysses_group=spec.ulysses_group, mesh_group=spec.mesh_group
    )
    call = _check(placeholder, placeholder, placeholder, groups, objection=problem)
    if validate:
        verdict(call)
    raise ValueError(f"ring_attention: {problem}")


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Union[float, Tensor, None] = None,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    return_lse: Literal[False] = False,
    backend: str = "auto",
    validate: bool = True,
    cu_seqlens: Union[Sequence[int], Tensor, None] = None,
    document_ids: Union[Tensor, Sequence[int], None] = None,
    window: Union[int, tuple[int, int], None] = None,
    chunk: Optional[int] = None,
    group_ids: Union[Tensor, Sequence[int], None] = None,
    mask_mod: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    sinks: Optional[Tensor] = None,
    softcap: Union[float, Tensor, None] = None,
    ulysses_group: Optional[ProcessGroup] = None,
    transport: Optional[str] = None,
    mesh_group: Optional[ProcessGroup] = None,
) -> Tensor: ...


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Union[float, Tensor, None] = None,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    return_lse: Literal[True],
    backend: str = "auto",
    validate: bool = True,
    cu_seqlens: Union[Sequence[int], Tensor, None] = None,
    document_ids: Union[Tensor, Sequence[int], None] = None,
    window: Union[int, tuple[int, int], None] = None,
    chunk: Optional[int] = None,
    group_ids: Union[Tensor, Sequence[int], None] = None,
    mask_mod: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    sinks: Optional[Tensor] = None,
    softcap: Union[float, Tensor, None] = None,
    ulysses_group: Optional[ProcessGroup] = None,
    transport: Optional[str] = None,
    mesh_group: Optional[ProcessGroup] = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Union[float, Tensor, None] = None,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    return_lse: bool,
    backend: str = "auto",
    validate: bool = True,
    cu_seqlens: Union[Sequence[int], Tensor, None] = None,
    document_ids: Union[Tensor, Sequence[int], None] = None,
    window: Union[int, tuple[int, int], None] = None,
    chunk: Optional[int] = None,
    group_ids: Union[Tensor, Sequence[int], None] = None,
    mask_mod: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    sinks: Optional[Tensor] = None,
    softcap: Union[float, Tensor, None] = None,
    ulysses_group: Optional[ProcessGroup] = None,
    transport: Optional[str] = None,
    mesh_group: Optional[ProcessGroup] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: Union[float, Tensor, None] = None,
    layout: str = "zigzag",
    group: Optional[ProcessGroup] = None,
    return_lse: bool = False,
    backend: str = "auto",
    validate: bool = True,
    cu_seqlens: Union[Sequence[int], Tensor, None] = None,
    document_ids: Union[Tensor, Sequence[int], None] = None,
    window: Union[int, tuple[int, int], None] = None,
    chunk: Optional[int] = None,
    group_ids: Union[Tensor, Sequence[int], None] = None,
    mask_mod: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    sinks: Optional[Tensor] = None,
    softcap: Union[float, Tensor, None] = None,
    ulysses_group: Optional[ProcessGroup] = None,
    transport: Optional[str] = None,
    mesh_group: Optional[ProcessGroup] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Exact softmax attention over a sequence sharded across the ranks of `group`.

    q: (batch, local_seq, heads, head_dim); k, v: (batch, local_seq, kv_heads, head_dim),
    heads % kv_heads == 0. Each rank passes its shard in the given `layout` (see
    ringwise.shard); `causal` masks by *global* position. Returns out like q, and with
    return_lse also the float32 log-sum-exp (batch, heads, local_seq) (not differentiable: marked so,
    a loss that reads it gets an error, never a silently partial gradient).
    With world size 1 or no process group this is plain blockwise attention.
    cu_seqlens: packed documents, as global boundaries (0, len0, len0+len1, ..., total), the
    same on every rank; attention stays inside each document (causal within it if causal).
    Documents may have any lengths and span shards in every layout. document_ids: the same
    as per-token ids over the global sequence (each document contiguous), instead of cu_seqlens.
    window: query i sees keys i - window .. i (causal; global positions; flash-attn's
    window_size=(window, 0)); (left, right): keys i - left .. i + right (full attention, a
    bidirectional window; causal takes (left, 0)); ring steps with nothing in it make no hop.
    chunk: attention within chunks of `chunk` global positions (Llama 4's chunked layers:
    key j visible to query i iff j // chunk == i // chunk), as if each chunk were a document.
    group_ids (causal): per-token ids over the global sequence, >= 0 for a token in a group
    (each group contiguous, inside one document), < 0 for none; tokens of one group also see
    each other's later keys (Gemma 3's image tokens, a prefix-LM's prefix). mask_mod: any
    further mask, mask_mod(q_pos, k_pos) -> bool (True = visible) on broadcastable int64 tensors
    of global positions, a pure function, the same on every rank (compared by its qualified
    name); evaluated tile by tile, and ring steps it leaves empty on every rank are not sent
    (torch.compile breaks the graph at a call with mask_mod: the function is Python).
    The mask is ((causal and window) or same group) and same document and same chunk and
    mask_mod.
    sinks: (heads,) per-head sink logits (GPT-OSS), one extra key per row with a zero value;
    differentiable; the returned lse includes it. softcap: scores -> softcap * tanh(scores /
    softcap) (Gemma 2), on the reference kernel (backend 'auto' or 'reference').
    A row with no finite score gets out = 0 and lse = -inf; NaN inputs give NaN.
    validate=False skips the cross-rank argument check (one small all-gather per call).
    ulysses_group: Ulysses x ring (USP, see ulysses.py): inputs sharded with
    ringwise.shard(x, 1, layout, group, ulysses_group=ulysses_group); an all-to-all over
    ulysses_group trades sequence for heads before the ring over `group` and back after it.
    mesh_group (with ulysses_group): the group of exactly the mesh's ranks, where a validated
    call's verdict is one all-gather; None: the default group (the mesh that
    ulysses.mesh_groups builds). A mesh inside a larger job (data-parallel replicas) passes its own.
    transport: how hops travel, "direct", "host" (staged through pinned host memory over gloo,
    for several ranks on one GPU) or "auto" (None: $RINGWISE_TRANSPORT, else auto); see comm.py.
    Under torch.compile the whole call is one operator (torch.ops.ringwise.attention); pass
    cu_seqlens as a list of ints there (a tensor is read on the host).
    """
    return attention(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        group=group,
        return_lse=return_lse,
        backend=backend,
        validate=validate,
        cu_seqlens=cu_seqlens,
        document_ids=document_ids,
        window=window,
        chunk=chunk,
        group_ids=group_ids,
        mask_mod=mask_mod,
        sinks=sinks,
        softcap=softcap,
        ulysses_group=ulysses_group,
        transport=transport,
        mesh_group=mesh_group,
    )
