"""Exact attention of a few new queries against a sequence-sharded KV cache: one collective a call.

Every rank holds the same queries and its own shard of the cache (any global positions,
possibly none). Each rank attends its shard alone, giving a partial (out, lse) per query
row; then ONE all-gather of every rank's packed float32 (out, lse) (float64 for float64
inputs), and every rank merges the W partials in rank order with the same elementwise
operations, so the result is bit-identical on every rank. A shard that holds no visible key
has lse = -inf and weighs nothing; sinks join the softmax once, after the merge.

This is the Tree-Attention / vLLM-decode-context-parallel shape of the problem (not the
paper's K/V ring, which moves the whole cache every token): the bytes per call do not grow
with the context, only with batch x query rows x heads x head_dim.

Checks: the options are checked as ring_attention's are (checks.py: the same functions and
words). The first call in a group is checked in words (each rank's problems, its signature
and a digest of q, in one object all-gather, before any data moves), and the packed buffer's
size is agreed (`AGREEMENTS`, per group). Later calls carry a header in the data gather itself:
the rank's per-call problem (as its place in CALL_PROBLEMS, so every rank words it alike), a
hash of the signature and a digest of q; every rank reads every header before it merges. A rank whose
call differs from the agreed one (another query shape, an invalid argument) still sends a buffer
of the agreed size, whose header asks every rank for the worded check: so a problem on one rank
is raised on every rank alike, promptly, with one collective per call while the buffer's size
stays (options that change alike on every rank, such as a hybrid model's windows, cost nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional, TypedDict, Union, overload

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.types import Device

from . import checks
from .comm import all_gather_objects, all_gather_single
from .kernels import _weighted_values, acc_dtype, default_scale
from .merge import merge_into

Tensor = torch.Tensor
aten = torch.ops.aten

# The problems a call can have on one rank alone, with an unchanged signature (the cache shard is
# each rank's own); a header carries one as its place in CALL_PROBLEMS, 0 for none.
KEYS_DIFFER = "k, v and key_positions must have the same number of keys on each rank (batch, keys, kv_heads, head_dim)"
KV_MISMATCH = "k and v must match q's batch, head_dim, dtype and device, with kv_heads dividing q's heads"
BAD_KEY_POSITIONS = "key_positions must be a 1-D integer tensor on q's device"
Q_DIFFERS = "q differs between ranks: every rank must pass the same queries"
SIG_DIFFERS = "the ranks called decode_attention with different signatures (shapes, dtype or options)"
CALL_PROBLEMS = (None, KEYS_DIFFER, KV_MISMATCH, BAD_KEY_POSITIONS)
# header code: this rank's call is not the group's agreed one (or not valid): check in words
_RECHECK = len(CALL_PROBLEMS)


@dataclass(frozen=True)
class _Agreement:
    """What every rank of a group agreed on at its last worded check: the packed buffer a call sends."""

    numel: int
    dtype: torch.dtype
    device: torch.device


class _Agreements:
    """What each group's ranks agreed on at their last worded check: protocol state, the same on
    every rank of a group (each records it after the same collective), so that later calls need
    only the data gather. `forget` makes a group's next call check in words again."""

    def __init__(self) -> None:
        self._by_group: dict[Optional[str], _Agreement] = {}  # group name -> _Agreement

    @staticmethod
    def _key(group: Optional[ProcessGroup]) -> Optional[str]:
        name: Optional[str] = getattr(group or dist.group.WORLD, "group_name", None)
        return name

    def of(self, group: Optional[ProcessGroup]) -> Optional[_Agreement]:
        return self._by_group.get(self._key(group))

    def record(self, group: Optional[ProcessGroup], agreement: _Agreement) -> None:
        self._by_group[self._key(group)] = agreement

    def forget(self, group: Optional[ProcessGroup] = None, *, every: bool = False) -> None:
        """Forget the group's agreement (None: the default group's), or every group's."""
        if every:
            self._by_group.clear()
        else:
            self._by_group.pop(self._key(group), None)


AGREEMENTS = _Agreements()


def _digest(x: Optional[Tensor]) -> int:
    """An exact fingerprint of a tensor's bytes (a weighted sum mod a prime): equal tensors, equal digests."""
    if x is None:
        return 0
    b = x.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(1, b.numel() + 1, dtype=torch.int64, device=b.device) % 1_000_003
    return int(((b * w) % 2_147_483_647).sum().item()) % 2_147_483_647


def _hash_sig(sig: tuple[object, ...]) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(sig).encode()).digest()[:6], "little")


def _call_problem(q: Tensor, k: object, v: object, key_positions: object) -> Optional[str]:
    """What may be wrong on this rank alone (its cache shard), as one of CALL_PROBLEMS."""
    if not (isinstance(k, Tensor) and isinstance(v, Tensor)) or k.dim() != 4 or v.shape != k.shape:
        return KEYS_DIFFER
    if (
        k.shape[0] != q.shape[0]
        or k.shape[3] != q.shape[3]
        or k.dtype != q.dtype
        or v.dtype != q.dtype
        or k.device != q.device
        or v.device != q.device
        or k.shape[2] < 1
        or q.shape[2] % k.shape[2]
    ):
        return KV_MISMATCH
    if key_positions is not None:
        if (
            not isinstance(key_positions, Tensor)
            or key_positions.dim() != 1
            or key_positions.is_floating_point()
            or key_positions.device != q.device
        ):
            return BAD_KEY_POSITIONS
        if key_positions.shape[0] != k.shape[1]:
            return KEYS_DIFFER
    return None


def _signature_problem(
    q: object,
    softmax_scale: object,
    query_positions: object,
    window: object,
    sinks: object,
    softcap: object,
    chunk: object = None,
) -> Optional[str]:
    """What is wrong with the queries and the options (the same on every rank of a valid call):
    the options by ring_attention's own checks."""
    if not isinstance(q, Tensor) or q.dim() != 4 or not q.is_floating_point() or min(q.shape) < 1:
        return (
            f"q must be a floating point 4-D tensor (batch, new tokens, heads, head_dim), got {getattr(q, 'shape', q)}"
        )
    if query_positions is not None and (
        not isinstance(query_positions, Tensor)
        or query_positions.dim() != 1
        or query_positions.shape[0] != q.shape[1]
        or query_positions.is_floating_point()
    ):
        return f"query_positions must be a 1-D integer tensor of q's {q.shape[1]} new tokens"
    problem = (
        checks.window_problem(window)
        or checks.chunk_problem(chunk)
        or checks.softcap_problem(softcap)
        or checks.scale_problem(softmax_scale)
        or checks.sinks_problem(q, sinks)
    )
    if problem:
        return problem
    for name, value in (("window", window), ("chunk", chunk)):
        if value is not None and query_positions is None:
            return f"{name} needs query_positions and key_positions (it counts positions)"
    return None


def visible(
    key_positions: Optional[Tensor],
    query_positions: Optional[Tensor],
    window: Optional[int],
    chunk: Optional[int] = None,
) -> Optional[Tensor]:
    """(Tq, Sk) bool: key j visible to new token i (causal over global positions, within the window,
    in the query's chunk); None when every key is visible (no positions given)."""
    if key_positions is None or query_positions is None:
        return None
    d = query_positions[:, None] - key_positions[None, :]
    ok = d >= 0
    if window is not None:
        ok &= d <= window
    if chunk is not None:
        ok &= query_positions[:, None] // chunk == key_positions[None, :] // chunk
    return ok


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor], softcap: Optional[float]
) -> tuple[Tensor, Tensor]:
    """This rank's partial result: out (batch, heads, Tq, d) and lse (batch, heads, Tq) in the
    accumulator dtype, over its own keys. Query heads of one kv head are stacked as extra rows
    (b, kv_heads, group x Tq, d), so GQA reads each key once and nothing is expanded."""
    B, Tq, H, D = q.shape
    Hk, Sk = k.shape[2], k.shape[1]
    dt = acc_dtype(q.dtype)
    g = H // Hk
    if Sk == 0:
        return q.new_zeros(B, H, Tq, D, dtype=dt), torch.full((B, H, Tq), float("-inf"), dtype=dt, device=q.device)
    qg = q.permute(0, 2, 1, 3).reshape(B, Hk, g * Tq, D)  # rows: (head in group, new token)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hk, Sk, D)
    rows_mask = None if mask is None else mask.repeat(g, 1)  # (g*Tq, Sk)
    out: Optional[Tensor] = None
    lse: Tensor
    if (
        q.device.type == "cpu"
        and softcap is None
        and bool(torch.isfinite(q).all())
        and (rows_mask is None or bool(rows_mask.any(-1).all()))
    ):
        bias = (
            None
            if rows_mask is None
            else torch.zeros(rows_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~rows_mask, float("-inf"))
        )  # the fused kernel takes an additive mask of q's dtype
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qg, kt, vt, 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out.to(dt), lse.to(dt)
        if not bool(torch.isfinite(out).all() and torch.isfinite(lse).all()):
            out = None  # a non-finite key or value (the cache is not scanned up front): the exact path decides
    if out is None:  # masked rows, soft-capping, non-finite inputs, other devices: plain float math, exact semantics
        s = torch.matmul(qg.to(dt), kt.to(dt).transpose(-1, -2)) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if rows_mask is not None:
            s = s.masked_fill(~rows_mask, float("-inf"))
        m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(dt).min)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        out = _weighted_values(p, vt.to(dt)) / denom.clamp_min(torch.finfo(dt).tiny)
        lse = (m + torch.log(denom)).squeeze(-1)
    # back from (B, Hk, g*Tq, ...) rows to (B, H, Tq, ...): head h = kv head h // g, member h % g
    return out.reshape(B, Hk, g, Tq, D).reshape(B, H, Tq, D), lse.reshape(B, Hk, g, Tq).reshape(B, H, Tq)


def _header(code: int, sig_hash: int, q_digest: int, dt: torch.dtype, device: Device) -> Tensor:
    return torch.tensor([code, sig_hash, q_digest], dtype=torch.int64).view(dt).to(device)  # bit-exact


def _read_headers(parts: Tensor, n: int) -> list[tuple[int, int, int]]:
    """Every rank's header from the gathered (world, numel) buffer. Copied into a fresh tensor first: a row's
    offset into the gathered storage is arbitrary (odd for an odd payload), and int64 needs an aligned view."""
    heads = torch.empty((parts.shape[0], n), dtype=parts.dtype).copy_(parts[:, :n])  # one small host copy
    return [(code, sig_hash, q_digest) for code, sig_hash, q_digest in heads.view(torch.int64).tolist()]


class _Check(TypedDict):
    """One rank's part of a worded check."""

    rank: int
    problem: Optional[str]
    sig: tuple[object, ...]
    q: int  # its q's digest


def _worded_check(
    group: Optional[ProcessGroup], problem: Optional[str], sig: tuple[object, ...], q_digest: int
) -> None:
    """Every rank's problem in words, its signature and its q digest, in one object all-gather: raises the same
    error on every rank, or returns when all agree. Runs at a group's first call and whenever a header asks."""
    mine: _Check = {"rank": dist.get_rank(), "problem": problem, "sig": sig, "q": q_digest}
    infos = all_gather_objects(mine, group)
    for i in infos:
        if i["problem"]:
            raise ValueError(f"decode_attention: rank {i['rank']}: {i['problem']}")
    for i in infos[1:]:
        if i["sig"] != infos[0]["sig"]:
            raise ValueError(
                f"decode_attention: rank {i['rank']}: {SIG_DIFFERS}: "
                f"{i['sig']} vs rank {infos[0]['rank']} {infos[0]['sig']}"
            )
        if i["q"] != infos[0]["q"]:
            raise ValueError(f"decode_attention: rank {i['rank']}: {Q_DIFFERS}")


def _packed_numel(q: Tensor) -> int:
    """Elements a rank sends for queries q: header, out (B, H, Tq, D) and lse (B, H, Tq), in the accumulator dtype."""
    B, Tq, H, D = q.shape
    header = 3 * torch.iinfo(torch.int64).bits // torch.finfo(acc_dtype(q.dtype)).bits  # _header's 3 int64s
    return header + B * H * Tq * (D + 1)


def _gather(packed: Tensor, world: int, group: Optional[ProcessGroup]) -> Tensor:
    parts = torch.empty(world * packed.numel(), dtype=packed.dtype, device=packed.device)
    all_gather_single(parts, packed, group=group)
    return parts.view(world, -1)


def _raise_from_headers(headers: Sequence[tuple[int, int, int]], ranks: Sequence[int]) -> None:
    """The same error on every rank from what every rank reads alike: a call problem, or differing calls."""
    for r, (c, _, _) in zip(ranks, headers):
        if c:
            raise ValueError(f"decode_attention: rank {r}: {CALL_PROBLEMS[c]}")
    for r, (_, s, d) in zip(ranks, headers):
        if s != headers[0][1]:
            raise ValueError(f"decode_attention: rank {r}: {SIG_DIFFERS}")
        if d != headers[0][2]:
            raise ValueError(f"decode_attention: rank {r}: {Q_DIFFERS}")


@overload
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    softmax_scale: Optional[float] = None,
    key_positions: Optional[Tensor] = None,
    query_positions: Optional[Tensor] = None,
    window: Optional[int] = None,
    chunk: Optional[int] = None,
    sinks: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: Literal[False] = False,
) -> Tensor: ...


@overload
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    softmax_scale: Optional[float] = None,
    key_positions: Optional[Tensor] = None,
    query_positions: Optional[Tensor] = None,
    window: Optional[int] = None,
    chunk: Optional[int] = None,
    sinks: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    softmax_scale: Optional[float] = None,
    key_positions: Optional[Tensor] = None,
    query_positions: Optional[Tensor] = None,
    window: Optional[int] = None,
    chunk: Optional[int] = None,
    sinks: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: bool,
) -> Union[Tensor, tuple[Tensor, Tensor]]: ...


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: Optional[ProcessGroup] = None,
    softmax_scale: Optional[float] = None,
    key_positions: Optional[Tensor] = None,
    query_positions: Optional[Tensor] = None,
    window: Optional[int] = None,
    chunk: Optional[int] = None,
    sinks: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of the new tokens q (batch, Tq, heads, d), the same on every rank, against the
    whole cache, of which this rank holds k, v (batch, keys, kv_heads, d) at global
    key_positions (keys,). With positions, key j is visible to new token i iff
    key_pos[j] <= query_pos[i] (and query_pos[i] - key_pos[j] <= window, and both in one chunk
    of `chunk` positions: Llama 4's chunked layers); without, every key is. Returns out (batch,
    Tq, heads, d) in q's dtype, identical on every rank, and with return_lse the float32
    (float64) lse (batch, heads, Tq) that includes the sinks."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size(group) if distributed else 1
    problem = _signature_problem(q, softmax_scale, query_positions, window, sinks, softcap, chunk)
    mine = None if problem else _call_problem(q, k, v, key_positions)  # this rank's cache shard's problem
    if world == 1 and (problem or mine):
        raise ValueError(f"decode_attention: {problem or mine}")
    sig: tuple[object, ...] = (
        ()
        if problem
        else (
            tuple(q.shape),
            str(q.dtype),
            q.device.type,
            softmax_scale,
            window,
            chunk,
            softcap,
            sinks is not None,
            key_positions is not None,
            query_positions is not None,
            return_lse,
        )
    )
    q_digest = 0 if problem else _digest(q)
    if world > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        agreed = AGREEMENTS.of(group)
        if agreed is None:  # a group's first call: every problem worded, from every rank, before data moves
            _worded_check(group, problem or mine, sig, q_digest)
        elif problem or _packed_numel(q) != agreed.numel or acc_dtype(q.dtype) != agreed.dtype:
            # this rank cannot send the buffer the group agreed on (another query shape or dtype, an invalid
            # argument): it sends one of the agreed size that says so, and every rank, reading every header,
            # runs the worded check (the same error everywhere, or a new agreement when all ranks changed their
            # call alike); no rank waits on a collective alone
            marker = torch.zeros(agreed.numel, dtype=agreed.dtype, device=agreed.device)
            head = _header(_RECHECK, 0, 0, agreed.dtype, agreed.device)
            marker[: head.numel()] = head
            _gather(marker, world, group)
            _worded_check(group, problem or mine, sig, q_digest)
    B, Tq, H, D = q.shape
    dt = acc_dtype(q.dtype)
    scale = default_scale(D) if softmax_scale is None else float(softmax_scale)
    if mine:
        out = q.new_zeros(B, H, Tq, D, dtype=dt)
        lse = torch.full((B, H, Tq), float("-inf"), dtype=dt, device=q.device)
    else:
        mask = visible(key_positions, query_positions, window, chunk)
        out, lse = local_attention(q, k, v, scale, mask, softcap)
    if world > 1:
        head = _header(CALL_PROBLEMS.index(mine), _hash_sig(sig), q_digest, dt, q.device)
        packed = torch.cat([head, out.reshape(-1), lse.reshape(-1)])
        AGREEMENTS.record(group, _Agreement(packed.numel(), dt, q.device))
        parts = _gather(packed, world, group)
        headers = _read_headers(parts, head.numel())
        if any(c == _RECHECK for c, _, _ in headers):  # another rank's call changed: check in words, as it does
            _worded_check(group, mine, sig, q_digest)
            raise AssertionError("unreachable: a rank that asks for the check has a problem or another signature")
        _raise_from_headers(headers, ranks)
        n_out = out.numel()
        out = torch.zeros_like(out)
        lse = torch.full_like(lse, float("-inf"))
        for p in parts:  # rank order, elementwise: the same bits on every rank
            body = p[head.numel() :]
            merge_into(out, lse, body[:n_out].view(B, H, Tq, D), body[n_out:].view(B, H, Tq))
    if sinks is not None:
        total = torch.logaddexp(lse, sinks.detach().to(dt)[None, :, None])
        keep = torch.where(torch.isneginf(lse), torch.zeros_like(lse), torch.exp(lse - total))  # NaN stays NaN
        out, lse = out * keep[..., None], total
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out
