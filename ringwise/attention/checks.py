"""Every argument check of the attention ops, as pure functions that return a problem or None.

Nothing here communicates or raises for a bad argument: api.py gathers each rank's verdict
in one collective and raises the same error on every rank, so a problem found on one rank
can never leave the others waiting in the ring. The checks catch only the errors they raise
themselves (`ValueError` from the layout and kernel tables); anything else is a bug and
propagates as it is.

The option checks (`option_problem` and the per-option ones it calls) are shared by
ring_attention (spec.py runs them once per call, on the normalised options) and
decode_attention; `parse_bounds` is the one reader of document boundaries (cu_seqlens),
for the op and for SeqShard.shard_batch alike.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Protocol, TypedDict, TypeGuard, cast

import torch

from .kernels import BACKENDS, Kernel, select_kernel
from .layout import check_layout, check_local_len, global_indices

Tensor = torch.Tensor
# ((name, value), ...): what every rank of a call must pass alike (AttentionSpec.signature, api._check)
Signature = tuple[tuple[str, object], ...]


class Verdict(TypedDict):
    """One rank's part of a call's verdict, which api.verdict gathers from every rank."""

    rank: int
    problem: Optional[str]
    sig: Signature


class MeshView(TypedDict):
    """A rank's view of its (ulysses x ring) mesh (ulysses.SeqMesh.ranks): its ulysses rank u and ring
    rank r (-1 where it is not a member), and the global ranks of its ulysses group and of its ring."""

    u: int
    r: int
    ulysses: list[int]
    ring: list[int]


class MeshVerdict(Verdict, MeshView):
    """A rank's verdict on a (ulysses x ring) mesh: its own, and its view of the mesh."""


def _integer_tensor(x: object) -> TypeGuard[Tensor]:
    return isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def parse_bounds(
    cu_seqlens: object, total: int | None = None, what: str | None = None
) -> tuple[tuple[int, ...] | None, str | None]:
    """Document boundaries (flash-attn's cu_seqlens: 0, len0, len0+len1, ..., total) from a 1-D
    integer tensor or a sequence of ints, as a tuple; or the problem with them. With `total`,
    also checked to start at 0, end at `total` (`what` words that length) and strictly increase."""
    bad = "cu_seqlens must be a 1-D integer tensor or a list of ints"
    items: list[object]
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or not _integer_tensor(cu_seqlens):
            return None, bad
        items = cu_seqlens.tolist()
    else:
        try:
            items = list(cast("Iterable[object]", cu_seqlens))  # what is not iterable raises TypeError here
        except TypeError:
            return None, f"{bad}, got {type(cu_seqlens).__name__}"
    bounds = []
    for b in items:
        if _integer_tensor(b) and b.dim() == 0:
            b = b.item()
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            return None, bad
        bounds.append(int(b))
    if total is None:
        return tuple(bounds), None
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        what = what or f"global sequence length {total} (local length x ranks)"
        shown = str(bounds) if len(bounds) <= 6 else f"{bounds[:4]}...{bounds[-2:]}"
        return None, f"cu_seqlens must start at 0 and end at the {what}, got {shown}"
    if any(b >= c for b, c in zip(bounds, bounds[1:])):
        return None, f"cu_seqlens must be strictly increasing (documents of length >= 1), got {bounds}"
    return tuple(bounds), None


def bounds_from_document_ids(document_ids: object) -> tuple[list[int] | None, str | None]:
    """Per-token document ids of the global sequence -> cu_seqlens; each document contiguous."""
    if (
        not isinstance(document_ids, torch.Tensor)
        or document_ids.dim() != 1
        or document_ids.is_floating_point()
        or document_ids.is_complex()
        or document_ids.numel() == 0
    ):
        return None, "document_ids must be a 1-D integer tensor over the global sequence"
    ids = document_ids.cpu()
    starts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    docs = ids[[0] + starts]
    if len(torch.unique(docs)) != len(docs):
        return None, "document_ids must keep each document contiguous (an id reappears after another one)"
    return [0] + starts + [len(ids)], None


def tensor_problem(q: object, k: object, v: object) -> str | None:
    tensors: list[Tensor] = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name} must be a 4-D tensor (batch, seq, heads, head_dim), got {getattr(x, 'shape', type(x))}"
        tensors.append(x)
    return _shape_problem(*tensors)


def _shape_problem(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """tensor_problem of three 4-D tensors."""
    if not q.is_floating_point():
        return f"q, k, v must be floating point, got {q.dtype}"
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            return f"{name}.dtype={x.dtype} differs from q.dtype={q.dtype}; cast all three to one dtype"
        if x.device != q.device:
            return f"{name} is on {x.device} but q is on {q.device}; move all three to one device"
        for dim, what in ((0, "batch"), (1, "sequence length"), (3, "head_dim")):
            if x.shape[dim] != q.shape[dim]:
                return (
                    f"{name} has {what} {x.shape[dim]} but q has {q.shape[dim]} "
                    f"(q {tuple(q.shape)}, {name} {tuple(x.shape)}); shapes are (batch, seq, heads, head_dim)"
                )
    if k.shape[2] != v.shape[2]:
        return f"k has {k.shape[2]} heads but v has {v.shape[2]}; they must match"
    for name, n in (("q heads", q.shape[2]), ("k/v heads (kv_heads)", k.shape[2]), ("head_dim", q.shape[3])):
        if n < 1:
            return f"{name} is {n}; shapes are (batch, seq, heads, head_dim) with every size >= 1"
    if q.shape[2] % k.shape[2]:
        return (
            f"q has {q.shape[2]} heads, not a multiple of the {k.shape[2]} key/value heads; "
            "GQA/MQA needs heads % kv_heads == 0"
        )
    if q.shape[1] == 0:
        return "the local sequence is empty"
    return None


def _real(x: object) -> TypeGuard[numbers.Real]:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def scale_problem(scale: object) -> str | None:
    if scale is not None and not _real(scale):
        return f"softmax_scale must be a real number or None (1/sqrt(head_dim)), got {scale!r}"
    return None


def window_problem(window: object) -> str | None:
    """A window side alone: an int >= 0 or None."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        return (
            f"window must be an int >= 0 (keys at most `window` positions before the query, "
            f"flash-attn's window_size=(window, 0)), a pair (left, right) of them, or None, got {window!r}"
        )
    return None


def window_sides_problem(window: Optional[int], right: Optional[int], causal: bool) -> str | None:
    """The window's two sides together: causal attention sees nothing after the query; a window
    on full attention gives both sides."""
    if causal and right:
        return f"causal attention sees no key after the query, but window=({window}, {right}); use ({window}, 0)"
    if not causal and window is not None and right is None:
        return (
            f"window={window} on full attention needs its reach after the query too: window=(left, right), "
            "key j visible iff i - left <= j <= i + right (or causal=True for a left window)"
        )
    if not causal and right is not None and window is None:
        return f"window=(None, {right}): give the window's left side too, window=(left, right)"
    return None


def chunk_problem(chunk: object) -> str | None:
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        return (
            f"chunk must be an int >= 1 (attention within chunks of `chunk` global positions, "
            f"Llama 4's chunked layers) or None, got {chunk!r}"
        )
    return None


def chunked_bounds(docs: tuple[int, ...] | None, chunk: int | None, total: int) -> tuple[int, ...] | None:
    """Document bounds cut at every multiple of `chunk` as well: attention within a chunk of a
    document is attention within the pieces they leave."""
    if chunk is None:
        return docs
    return tuple(sorted(set(docs or (0, total)) | set(range(0, total, chunk)) | {total}))


def group_spans(
    group_ids: Optional[Tensor], total: int, causal: bool, docs: tuple[int, ...] | None
) -> tuple[tuple[tuple[int, int], ...] | None, str | None]:
    """(the groups' global (start, stop) spans, problem) from per-token group ids of the global
    sequence (>= 0: in that group, < 0: in none); each group contiguous and inside one document."""
    if group_ids is None:
        return None, None
    if not causal:
        return None, "group_ids add keys to causal attention; with causal=False every key is visible already"
    if group_ids.dim() != 1 or not _integer_tensor(group_ids) or group_ids.numel() != total:
        return None, f"group_ids must be a 1-D integer tensor over the global sequence ({total} tokens)"
    ids = group_ids.cpu()
    cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    starts, stops = [0] + cuts, cuts + [total]
    spans = [(a, b) for a, b in zip(starts, stops) if int(ids[a]) >= 0]
    seen = [int(ids[a]) for a, _ in spans]
    if len(set(seen)) != len(seen):
        return None, "group_ids must keep each group contiguous (an id >= 0 reappears after another one)"
    if docs is not None:
        for a, b in spans:
            if bisect.bisect_right(docs, a) != bisect.bisect_right(docs, b - 1):
                return None, f"the group at positions {a}..{b - 1} crosses a document or chunk boundary"
    return tuple(spans), None


def softcap_problem(softcap: object, backend: object = "auto") -> str | None:
    if softcap is None:
        return None
    # cast: typeshed's numbers.Real declares only < and <=, every real type compares both ways
    if not _real(softcap) or not 0 < cast(float, softcap) < math.inf:
        return f"softcap must be a finite number > 0 (scores -> softcap * tanh(scores / softcap)), got {softcap!r}"
    if backend not in ("auto", "reference"):
        return (
            f"softcap is computed by the reference kernel only, but backend={backend!r}; "
            "use backend='auto' or 'reference'"
        )
    return None


def backend_problem(backend: object) -> str | None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        return f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}"
    return None


class Options(Protocol):
    """The options option_problem reads: an AttentionSpec's (spec.py sits above this module and imports it)."""

    @property
    def causal(self) -> bool: ...
    @property
    def softmax_scale(self) -> Optional[float]: ...
    @property
    def backend(self) -> str: ...
    @property
    def window(self) -> Optional[int]: ...
    @property
    def window_right(self) -> Optional[int]: ...
    @property
    def chunk(self) -> Optional[int]: ...
    @property
    def softcap(self) -> Optional[float]: ...


def option_problem(spec: Options) -> str | None:
    """What is wrong with the options alone (no tensors, no groups): spec is an AttentionSpec."""
    return (
        scale_problem(spec.softmax_scale)
        or window_problem(spec.window)
        or window_problem(spec.window_right)
        or window_sides_problem(spec.window, spec.window_right, spec.causal)
        or chunk_problem(spec.chunk)
        or softcap_problem(spec.softcap, spec.backend)
        or backend_problem(spec.backend)
    )


def sinks_problem(q: Tensor, sinks: object) -> str | None:
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != q.shape[2]:
        return (
            f"sinks must be a 1-D tensor of one logit per query head ({q.shape[2]}), "
            f"got {getattr(sinks, 'shape', type(sinks))}"
        )
    if not sinks.is_floating_point() or sinks.device != q.device:
        return f"sinks must be a floating point tensor on {q.device}, got {sinks.dtype} on {sinks.device}"
    return None


def layout_problem(layout: str, local_len: int, world_size: int) -> str | None:
    try:
        check_layout(layout)
        check_local_len(local_len, layout, world_size)
    except ValueError as e:
        return str(e)
    return None


def position_problem(
    positions: Optional[Tensor],
    layout: str,
    rank: int,
    world_size: int,
    ulysses_rank: int,
    ulysses_size: int,
    local_len: int,
) -> str | None:
    """positions (..., local_len): the global positions the caller gave its tokens (e.g. RoPE's)."""
    if positions is None:
        return None
    wrong = not isinstance(positions, torch.Tensor) or positions.dim() == 0 or positions.shape[-1] != local_len
    if not wrong:
        try:
            want = global_indices(
                layout, rank, world_size, local_len * world_size * ulysses_size, ulysses_rank, ulysses_size
            )
        except ValueError as e:  # a length this layout cannot split: no positions are right
            return str(e)
        wrong = not bool((positions.cpu() == want).all())
    return not_global_positions(layout) if wrong else None


def not_global_positions(layout: str) -> str:
    return (
        f"position_ids are not the global positions of this rank's tokens in layout={layout!r} "
        "(restarting positions for packed documents, or local positions); pass the position_ids that "
        "ringwise.integrations.transformers.shard_batch returns, and documents as ringwise_cu_seqlens"
    )


def kernel_or_problem(backend: str, q: Tensor) -> tuple[Optional[Kernel], Optional[str]]:
    """(kernel, None) or (None, problem): the kernel that backend names for q's device and dtype."""
    try:
        return select_kernel(backend, q.device, q.dtype, q.shape[-1]), None
    except ValueError as e:
        return None, str(e)


def documents(
    cu_seqlens: Optional[list[int]], document_ids: Optional[Tensor], total: int
) -> tuple[tuple[int, ...] | None, str | None]:
    """(global document bounds or None, problem or None) from either way of passing documents."""
    if cu_seqlens is not None and document_ids is not None:
        return None, "pass cu_seqlens or document_ids, not both"
    if document_ids is not None:
        cu_seqlens, problem = bounds_from_document_ids(document_ids)
        if problem:
            return None, problem
    if cu_seqlens is None:
        return None, None
    return parse_bounds(cu_seqlens, total)


def signature_mismatch(sigs: Sequence[Signature], ranks: Sequence[int]) -> str | None:
    """sigs: each rank's ((name, value), ...) signature, in rank order; the first difference, worded."""
    first = sigs[0]
    for r, s in zip(ranks, sigs):
        if s != first:
            diffs = [f"{n}: rank {ranks[0]} {a} vs rank {r} {b}" for (n, a), (_, b) in zip(first, s) if a != b]
            return (
                "every rank must pass the same batch, local sequence length, heads, dtype and options (causal, "
                "layout, documents, window, chunk, groups, sinks, softcap, softmax_scale, backend, transport; "
                "shard the global sequence with ringwise.shard); " + "; ".join(diffs)
            )
    return None


def valid_degrees(heads: int) -> list[int]:
    return [d for d in range(1, heads + 1) if heads % d == 0]


def ulysses_problem(q: Tensor, k: Tensor, layout: str, ulysses_size: int, ring_size: int) -> str | None:
    """What a (ulysses x ring) mesh adds to the ring's checks: heads that split, an even zigzag shard."""
    H, U = q.shape[2], ulysses_size
    if H % U:
        return (
            f"the ulysses group has {U} ranks, which does not divide the {H} query heads; "
            f"valid ulysses degrees for {H} heads: {', '.join(map(str, valid_degrees(H)))}"
        )
    if layout == "zigzag" and ring_size > 1 and (q.shape[1] * U) % 2:
        return (
            "layout='zigzag' needs an even ring shard (local length x ulysses size); pad the global "
            "sequence with ringwise.pad_to_multiple(x, dim, layout='zigzag', group=group, "
            "ulysses_group=ulysses_group) or pass pad=True to ringwise.shard"
        )
    return None


def mesh_problem(infos: Mapping[int, MeshView]) -> str | None:
    """What is wrong with a (ulysses x ring) mesh, judged alike from every rank's view.

    infos: global rank -> dict(u, r, ulysses (its group's global ranks), ring (likewise)).
    """
    first = infos[min(infos)]
    U, R = len(first["ulysses"]), len(first["ring"])
    for g in sorted(infos):
        i = infos[g]
        if (len(i["ulysses"]), len(i["ring"])) != (U, R):
            return (
                f"the groups do not form one mesh: rank {min(infos)} has ulysses {U} x ring {R} but rank {g} "
                f"has {len(i['ulysses'])} x {len(i['ring'])}; every rank needs the same U and R"
            )
    for g in sorted(infos):
        i = infos[g]
        shared = sorted(set(i["ulysses"]) & set(i["ring"]))
        if shared != [g]:
            return (
                f"the groups do not tile the ranks: rank {g}'s ulysses_group {i['ulysses']} and group "
                f"{i['ring']} share ranks {shared}; they must cross in exactly that rank (a U x R mesh)"
            )
        for n in i["ring"]:
            if n in infos and infos[n]["u"] != i["u"]:
                return (
                    f"ranks {g} and {n} share a ring group but are ulysses ranks {i['u']} and {infos[n]['u']}: "
                    "a ring must join ranks that hold the same head chunk (same ulysses rank)"
                )
        for n in i["ulysses"]:
            if n in infos and infos[n]["r"] != i["r"]:
                return (
                    f"ranks {g} and {n} share a ulysses group but are ring ranks {i['r']} and {infos[n]['r']}: "
                    "a ulysses group must hold one ring shard (same ring rank)"
                )
    if len(infos) != U * R:
        return (
            f"the groups do not tile the ranks: {len(infos)} ranks reached, a {U} x {R} mesh has {U * R}; "
            "a mesh that is not the whole default group is checked over its own group: pass "
            "mesh_group= (ring_attention, SeqShard), the group of exactly its ranks"
        )
    return None
