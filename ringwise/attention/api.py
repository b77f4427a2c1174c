"""The attention op's front door: checked once for the whole mesh, one operator for torch.compile.

`ring_attention` turns its arguments into the schema of one custom operator,
`torch.ops.ringwise.attention` (forward) with its own autograd (`ringwise.attention_backward`),
so dynamo traces a model around it as one opaque call, and eager code runs the very same
path. Process groups travel by name.

Inside the operator, a validated call makes exactly one cross-rank collective before any
ring traffic: each rank's verdict (every check of checks.py, plus an objection the caller
hands in, e.g. the transformers integration's) and argument signature are all-gathered, and
every rank raises the same error if any rank objected or the ranks disagree. On a
(ulysses x ring) mesh that gather runs over the group holding the mesh (registered by
ulysses.mesh_groups or the training mesh); groups built by hand are checked with one gather
per group. Then the call is dispatched to the ring engine (ring.py) or, with a ulysses group
of more than one rank, to the Ulysses wrapper (ulysses.py), which calls the engine directly.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import checks
from .comm import Ring, resolve_transport
from .kernels import acc_dtype, default_scale
from .ring import ring_backward, ring_forward, sink_grad
from .ulysses import Mesh, head_chunk_shapes, mesh_group, ulysses_backward, ulysses_forward

Tensor = torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


_NOT_A_MEMBER = ""  # the name a rank outside a group passes for it (torch's NON_GROUP_MEMBER)


def _group(name: Optional[str]):
    if name is None:
        return None
    if name == _NOT_A_MEMBER:
        return dist.GroupMember.NON_GROUP_MEMBER
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _group_name(group, what: str) -> Optional[str]:
    """Process groups cross into the op by name (a rank outside the group passes _NOT_A_MEMBER and
    the op's checks word it). Not a group at all: raised here, on this rank alone, since there is
    no group to tell."""
    if group is None:
        return None
    if _distributed() and group is dist.GroupMember.NON_GROUP_MEMBER:
        return _NOT_A_MEMBER
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise ValueError(f"ring_attention: {what} must be a torch.distributed ProcessGroup or None, "
                         f"got {type(group).__name__}")
    return name


@dataclass
class _Call:
    """One checked call: what the engine needs, and this rank's part of the verdict."""

    ring: Ring
    mesh: Optional[Mesh]  # None: no ulysses group; else this rank's place in the mesh
    engine: dict  # ring_forward / ring_backward keyword arguments (no sinks)
    problem: Optional[str]
    sig: tuple

    @property
    def ulysses(self) -> bool:
        """The Ulysses wrapper runs (a ulysses group of more than one rank)."""
        return self.mesh is not None and self.mesh.size > 1


def _check(q, k, v, sinks, document_ids, positions, cu_seqlens, causal, scale, layout, group, ulysses_group,
           backend, window, softcap, transport, objection) -> _Call:
    """Every check of this rank, without communication; problems are recorded, never raised
    (except a rank outside its own group, which no other rank waits for)."""
    problem = objection
    try:
        transport = resolve_transport(transport)
    except ValueError as e:
        problem, transport = problem or str(e), "direct"
    mesh = None
    if ulysses_group is not None:
        if not _distributed():
            raise ValueError("ring_attention: ulysses_group needs an initialised process group")
        mesh = Mesh(ulysses_group, group, transport)
        if mesh.u < 0 and mesh.r < 0:
            raise ValueError(
                f"ring_attention: this process (global rank {mesh.rank}) is in neither ulysses_group nor group; "
                "every rank of the mesh must be in one ulysses group and one ring group "
                "(build them with ringwise.attention.ulysses.mesh_groups or a DeviceMesh)")
        problem = problem or mesh.membership_problem()
    # a mesh rank outside the ring still joins the verdict; its (never used) ring is the default group's
    ring = Ring(group if mesh is None or mesh.r >= 0 else None, transport)
    U = mesh.size if mesh is not None else 1
    problem = (problem or checks.tensor_problem(q, k, v) or checks.sinks_problem(q, sinks)
               or checks.scalar_problem(causal, scale, window, softcap, backend))
    docs = kernel = None
    if not problem:
        if mesh is not None:
            problem = checks.ulysses_problem(q, k, layout, U, ring.world_size)
        ring_len = q.shape[1] * U  # the ring runs on U pieces gathered
        problem = problem or checks.layout_problem(layout, ring_len, ring.world_size)
        if not problem:
            docs, problem = checks.documents(cu_seqlens, document_ids, ring_len * ring.world_size)
        if not problem:
            kernel, problem = checks.kernel_or_problem(backend, q)
        u = (mesh.u, mesh.size) if mesh is not None else (0, 1)
        problem = problem or checks.position_problem(positions, layout, ring.rank, ring.world_size, *u, q.shape[1])
    scale = None if problem else (default_scale(q.shape[-1]) if scale is None else float(scale))
    sig = () if problem else (
        ("q shape", tuple(q.shape)), ("k/v shape", tuple(k.shape)), ("dtype", str(q.dtype)),
        ("causal", bool(causal)), ("layout", layout), ("cu_seqlens", docs), ("window", window),
        ("sinks", sinks is not None), ("softcap", softcap), ("scale", repr(scale)), ("backend", backend),
        ("transport", ring.transport))
    engine = dict(causal=bool(causal), scale=scale, layout=layout, ring=ring, kernel=kernel, docs=docs,
                  window=None if window is None else int(window), softcap=None if softcap is None else float(softcap))
    return _Call(ring, mesh, engine, problem, sig)


def _gather(obj, group) -> list:
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, obj, group=group)
    return parts


def _mesh_infos(me: dict, mesh: Mesh) -> list[dict]:
    """Every mesh rank's info: one gather over the registered mesh group, else one per group."""
    registered, group = mesh_group(mesh.ulysses_group, mesh.group)
    if registered:
        return _gather(me, group)
    infos = _gather(me, mesh.ulysses_group) if mesh.u >= 0 else [me]
    if mesh.r >= 0:
        infos = [i for part in _gather(infos, mesh.group) for i in part]
    return infos


def verdict(call: _Call) -> None:
    """Raise the same error on every rank, before any ring traffic: one all-gather of every
    rank's problem and signature (see the module docstring for hand-built Ulysses groups)."""
    me = dict(rank=dist.get_rank() if _distributed() else 0, problem=call.problem, sig=call.sig)
    if call.mesh is not None:
        infos = _mesh_infos(dict(me, **call.mesh.ranks()), call.mesh)
    elif call.ring.world_size > 1:
        infos = _gather(me, call.ring.group)
    else:
        infos = [me]
    infos = sorted({i["rank"]: i for i in infos}.values(), key=lambda i: i["rank"])
    where = "ring_attention (ulysses)" if call.mesh is not None else "ring_attention"
    for i in infos:
        if i["problem"]:
            raise ValueError(f"{where}: rank {i['rank']}: {i['problem']}" if len(infos) > 1 or _distributed()
                             else f"{where}: {i['problem']}")
    problem = checks.mesh_problem({i["rank"]: i for i in infos}) if call.mesh is not None else None
    problem = problem or checks.signature_mismatch([i["sig"] for i in infos], [i["rank"] for i in infos])
    if problem:
        raise ValueError(f"{where}: {problem}")


def _prepare(args: dict, validate: bool) -> _Call:
    call = _check(**args)
    if validate:
        verdict(call)
    elif call.problem:  # the caller vouched for the arguments: a local error is all we can give
        raise ValueError(f"ring_attention: {call.problem}")
    return call


_ARGS = ("q", "k", "v", "sinks", "document_ids", "positions", "cu_seqlens", "causal", "scale", "layout", "group",
         "ulysses_group", "backend", "window", "softcap", "transport", "objection")


def _bind(q, k, v, sinks, document_ids, positions, cu_seqlens, causal, scale, layout, group, ulysses_group, backend,
          window, softcap, transport, objection) -> dict:
    values = locals()
    args = {n: values[n] for n in _ARGS}
    args["group"], args["ulysses_group"] = _group(group), _group(ulysses_group)
    return args


@torch.library.custom_op("ringwise::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], document_ids: Optional[Tensor],
                  positions: Optional[Tensor], cu_seqlens: Optional[list[int]], causal: bool, scale: Optional[float],
                  layout: str, group: Optional[str], ulysses_group: Optional[str], backend: str, window: Optional[int],
                  softcap: Optional[float], transport: Optional[str], objection: Optional[str],
                  validate: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse, saved): saved holds the Ulysses head chunks the backward reuses (empty on a plain ring)."""
    args = _bind(q, k, v, sinks, document_ids, positions, cu_seqlens, causal, scale, layout, group, ulysses_group,
                 backend, window, softcap, transport, objection)
    call = _prepare(args, validate)
    if call.ulysses:
        return ulysses_forward(q, k, v, sinks, call.mesh, call.engine)
    out, lse = ring_forward(q, k, v, sinks=sinks, **call.engine)
    return out, lse, []


def _ulysses_size(ulysses_group: Optional[str]) -> int:
    return dist.get_world_size(_group(ulysses_group)) if ulysses_group is not None else 1


@_attention_op.register_fake
def _(q, k, v, sinks, document_ids, positions, cu_seqlens, causal, scale, layout, group, ulysses_group, backend,
      window, softcap, transport, objection, validate):
    B, L, H, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, H, L), dtype=acc_dtype(q.dtype))
    U = _ulysses_size(ulysses_group)
    if U <= 1:
        return out, lse, []
    qh, kh, vh, oh, lh = head_chunk_shapes(tuple(q.shape), k.shape[2], U)
    return out, lse, [q.new_empty(qh), k.new_empty(kh), v.new_empty(vh), q.new_empty(oh),
                      q.new_empty(lh, dtype=acc_dtype(q.dtype))]


@torch.library.custom_op("ringwise::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           sinks: Optional[Tensor], saved: list[Tensor], document_ids: Optional[Tensor],
                           cu_seqlens: Optional[list[int]], causal: bool, scale: Optional[float], layout: str,
                           group: Optional[str], ulysses_group: Optional[str], backend: str, window: Optional[int],
                           softcap: Optional[float], transport: Optional[str],
                           sinks_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty when no sink gradient is asked for. On a Ulysses mesh
    the head chunks in `saved` are all it reads: q, out, lse are dout, and k, v views of dout with
    the kv heads' count (placeholders that cost no memory)."""
    args = _bind(q, k, v, sinks, document_ids, None, cu_seqlens, causal, scale, layout, group, ulysses_group,
                 backend, window, softcap, transport, None)
    call = _check(**args)  # the forward validated these arguments; this only rebuilds the engine's
    want_sinks = sinks if sinks_grad else None
    if call.ulysses:
        dq, dk, dv, dsinks = ulysses_backward(dout, saved, want_sinks, k.shape[2], call.mesh, call.engine)
    else:
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, **call.engine)
        dsinks = sink_grad(dout, out, lse, sinks) if want_sinks is not None else None
    fresh = lambda t: t if t._base is None else t.clone()  # noqa: E731  (an op's outputs never alias)
    return fresh(dq), fresh(dk), fresh(dv), (dsinks if dsinks is not None else q.new_empty(0))


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, sinks, saved, document_ids, cu_seqlens, causal, scale, layout, group, ulysses_group,
      backend, window, softcap, transport, sinks_grad):
    dsinks = sinks.new_empty(sinks.shape) if sinks_grad and sinks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


# the forward op's arguments in schema order, and those its backward takes again
_OP_ARGS = _ARGS[:16] + ("objection", "validate")
_SCALARS = ("document_ids", "cu_seqlens", "causal", "scale", "layout", "group", "ulysses_group", "backend", "window",
            "softcap", "transport")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_OP_ARGS, inputs, strict=True))
    out, lse, saved = output
    ctx.scalars = {n: args[n] for n in _SCALARS}
    ctx.kv_heads = args["k"].shape[2]
    ctx.has_sinks = args["sinks"] is not None
    ctx.ulysses = bool(saved)
    # lse (and the head chunks) carry no gradient: the backward uses the final lse, it does not
    # differentiate through it, so a loss that reads lse must not get a silently partial gradient
    ctx.mark_non_differentiable(lse, *saved)
    if ctx.ulysses:  # the backward reads the head chunks alone: keep nothing else
        ctx.save_for_backward(args["sinks"], *saved)
    else:
        ctx.save_for_backward(args["sinks"], args["q"], args["k"], args["v"], out, lse)


def _backward(ctx, dout, _dlse, _dsaved):
    sinks, *rest = ctx.saved_tensors
    dout = dout.contiguous()
    if ctx.ulysses:
        kv = dout[:, :, :ctx.kv_heads]
        q, k, v, out, lse, saved = dout, kv, kv, dout, dout, rest
    else:
        q, k, v, out, lse, saved = *rest, []
    sinks_grad = ctx.has_sinks and ctx.needs_input_grad[3]
    dq, dk, dv, dsinks = torch.ops.ringwise.attention_backward(
        dout, q, k, v, out, lse, sinks, saved, sinks_grad=sinks_grad, **ctx.scalars)
    return (dq, dk, dv, dsinks if sinks_grad else None) + (None,) * (len(_OP_ARGS) - 4)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _scale_value(scale):
    """softmax_scale as the schema's float (a 1-element real tensor is read once), or a problem."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        scale = scale.item()
    if scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)):
        return (None if scale is None else float(scale)), None
    return None, f"softmax_scale must be a real number or None (1/sqrt(head_dim)), got {scale!r}"


def attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None, return_lse=False,
              backend="auto", validate=True, cu_seqlens=None, document_ids=None, window=None, sinks=None,
              softcap=None, ulysses_group=None, transport=None, objection=None, position_ids=None):
    """ring_attention, plus what integrations hand the verdict: `objection` (this rank's problem
    with the call, raised on every rank alike) and `position_ids` (checked to be the layout's
    global positions of this rank's tokens)."""
    problems = [objection]
    scale, p = _scale_value(softmax_scale)
    problems.append(p)
    group_name, ulysses_name = _group_name(group, "group"), _group_name(ulysses_group, "ulysses_group")
    if window is not None and not (isinstance(window, numbers.Integral) and not isinstance(window, bool)):
        problems.append(checks.scalar_problem(causal, None, window, None, "auto"))
        window = None
    if softcap is not None and not (isinstance(softcap, numbers.Real) and not isinstance(softcap, bool)):
        problems.append(checks.scalar_problem(causal, None, None, softcap, "auto"))
        softcap = None
    if not isinstance(layout, str) or not isinstance(backend, str):
        problems.append(f"layout and backend are names (str), got layout={layout!r}, backend={backend!r}")
        layout, backend = str(layout), str(backend)
    if transport is not None and not isinstance(transport, str):
        problems.append(f"transport must be a name (str) or None, got {transport!r}")
        transport = None
    cu, p = _bounds_value(cu_seqlens)
    problems.append(p)
    if document_ids is not None and not isinstance(document_ids, torch.Tensor):
        try:  # a list or array of ids
            document_ids = torch.as_tensor(document_ids)
        except (TypeError, ValueError, RuntimeError):
            problems.append(f"document_ids must be a 1-D integer tensor over the global sequence, got "
                            f"{type(document_ids).__name__}")
            document_ids = None
    try:
        causal = bool(causal)
    except (TypeError, ValueError, RuntimeError):
        problems.append(f"causal must be True or False, got {causal!r}")
        causal = False
    tensors = dict(q=q, k=k, v=v, sinks=sinks, document_ids=document_ids, position_ids=position_ids)
    untyped = [n for n, x in tensors.items() if x is not None and not isinstance(x, torch.Tensor)]
    if untyped or any(x is None for x in (q, k, v)):
        _refuse_untyped(untyped, q, k, v, sinks, document_ids, group, ulysses_group, validate)
    problem = next((p for p in problems if p), None)
    out, lse, _ = torch.ops.ringwise.attention(
        q, k, v, sinks, document_ids, position_ids, cu, causal, scale, layout, group_name, ulysses_name,
        backend, None if window is None else int(window), None if softcap is None else float(softcap), transport,
        problem, bool(validate))
    return (out, lse) if return_lse else out


def _bounds_value(cu) -> tuple[Optional[list[int]], Optional[str]]:
    """cu_seqlens as the schema's list of ints (a tensor, list, tuple or array of integers), or a problem."""
    if cu is None:
        return None, None
    bad = "cu_seqlens must be a 1-D integer tensor or a list of ints"
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
            return None, bad
        return cu.tolist(), None
    try:
        items = list(cu)
    except TypeError:
        return None, f"{bad}, got {type(cu).__name__}"
    bounds = []
    for b in items:
        if isinstance(b, torch.Tensor) and b.dim() == 0 and not (b.is_floating_point() or b.is_complex()
                                                                  or b.dtype == torch.bool):
            b = b.item()
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            return None, bad
        bounds.append(int(b))
    return bounds, None


def _refuse_untyped(untyped, q, k, v, sinks, document_ids, group, ulysses_group, validate) -> None:
    """Arguments that cannot even enter the op (not tensors): the same verdict, from here."""
    if "sinks" in untyped:
        problem = checks.sinks_problem(q, sinks) if isinstance(q, torch.Tensor) else None
        problem = problem or f"sinks must be a 1-D tensor of one logit per query head, got {type(sinks).__name__}"
    elif "document_ids" in untyped:
        problem = checks.bounds_from_document_ids(document_ids)[1]
    elif "position_ids" in untyped:
        problem = "position_ids must be a tensor of global positions"
    else:
        problem = checks.tensor_problem(q, k, v)
    placeholder = torch.zeros(1, 1, 1, 1)
    call = _check(placeholder, placeholder, placeholder, None, None, None, None, False, None, "contiguous", group,
                  ulysses_group, "auto", None, None, None, problem)
    if validate:
        verdict(call)
    raise ValueError(f"ring_attention: {problem}")


def ring_attention(q, k, v, *, causal=False, softmax_scale=None, layout="zigzag", group=None, return_lse=False,
                   backend="auto", validate=True, cu_seqlens=None, document_ids=None, window=None, sinks=None,
                   softcap=None, ulysses_group=None, transport=None):
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
    window (causal only): query i sees keys i - window .. i (global positions; flash-attn's
    window_size=(window, 0)); ring steps with nothing in the window make no hop.
    sinks: (heads,) per-head sink logits (GPT-OSS), one extra key per row with a zero value;
    differentiable; the returned lse includes it. softcap: scores -> softcap * tanh(scores /
    softcap) (Gemma 2), on the reference kernel (backend 'auto' or 'reference').
    A row with no finite score gets out = 0 and lse = -inf; NaN inputs give NaN.
    validate=False skips the cross-rank argument check (one small all-gather per call).
    ulysses_group: Ulysses x ring (USP, see ulysses.py): inputs sharded with
    ringwise.shard(x, 1, layout, group, ulysses_group=ulysses_group); an all-to-all over
    ulysses_group trades sequence for heads before the ring over `group` and back after it.
    transport: how hops travel, "direct", "host" (staged through pinned host memory over gloo,
    for several ranks on one GPU) or "auto" (None: $RINGWISE_TRANSPORT, else auto); see comm.py.
    Under torch.compile the whole call is one operator (torch.ops.ringwise.attention); pass
    cu_seqlens as a list of ints there (a tensor is read on the host).
    """
    return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, group=group,
                     return_lse=return_lse, backend=backend, validate=validate, cu_seqlens=cu_seqlens,
                     document_ids=document_ids, window=window, sinks=sinks, softcap=softcap,
                     ulysses_group=ulysses_group, transport=transport)
