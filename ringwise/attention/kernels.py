"""Single-device block attention: (q, k, v) -> (out, lse) and the matching backward.

Every kernel takes tensors laid out (batch, heads, seq, head_dim), k/v possibly with fewer
heads than q (query head h reads key/value head h // (heads // kv_heads)), and returns
``lse`` as float32 (float64 for float64 inputs). The backward receives the *final* out and
lse of the whole ring, so that each block's gradient is its exact share of the total:
P = exp(S - lse_final), dS = P * (dP - rowsum(dO * O_final)).

Backends:
  aten_cpu        torch's fused CPU flash kernel (runs at the matmul peak, any float dtype)
  cuda_cudnn      torch's cuDNN attention op (fp16/bf16 only; GQA native; 1.7x flash on an H200)
  cuda_flash      torch's CUDA flash-attention op (fp16/bf16)
  cuda_efficient  torch's CUDA memory-efficient op (fp32 too)
  reference       pure PyTorch, chunked over queries, any device and dtype; the test oracle
                  for the fused kernels and the fallback for everything else; also the
                  kernel for band tiles (narrow sliding windows), soft-capping and
                  non-finite inputs
Flipped(kernel) runs a fused kernel on reversed rows and keys: the anti-causal squares of a
sliding window's far edge. Nothing here knows about processes or rings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Optional, Protocol, Union

import torch

Tensor = torch.Tensor
aten = torch.ops.aten

BACKENDS = ("auto", "aten_cpu", "cuda_cudnn", "cuda_flash", "cuda_efficient", "reference")


class Kernel(Protocol):
    """What the ring asks of a tile kernel: (batch, heads, seq, head_dim) tensors in, k/v possibly
    with fewer heads than q; forward gives (out, lse), backward (dq, dk, dv)."""

    name: str

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]: ...

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]: ...


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators, lse and gradients in transit: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _fold_kv_grad(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, s, d = g.shape
    return g if h == kv_heads else g.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _weighted_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p @ v, except that keys of weight 0 (masked out) add nothing even if their value is
    inf or NaN, so a row's output never depends on keys it cannot see (nor on the tiling)."""
    bad = ~torch.isfinite(v).all(-1).flatten(0, -2).all(0) if v.numel() else None
    if bad is None or not bad.any():
        return torch.matmul(p, v)
    good, bad = torch.nonzero(~bad).flatten(), torch.nonzero(bad).flatten()
    pb, vb = p[..., bad, None], v[..., bad, :].unsqueeze(-3)  # (..., rows, nbad, 1), (..., 1, nbad, d)
    return torch.matmul(p[..., good], v[..., good, :]) + (pb * vb).masked_fill(pb == 0, 0.0).sum(-2)


class ReferenceKernel:
    """Plain PyTorch attention in row chunks: bounded memory, exact -inf and NaN handling.

    Besides causal it takes what the fused kernels lack: band=(lo, hi)
    (key j visible to query i iff lo <= i - j <= hi, the ring's sliding-window edge tiles),
    keep (a (rows, keys) bool mask, True = visible: the ring's masked tiles off the CPU)
    and softcap=c (scores -> c * tanh(scores / c), Gemma 2), so it is the kernel for those.
    A row with no visible key gets out = 0 and lse = -inf; NaN inputs give NaN.
    """

    name = "reference"

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk

    def _blocks(
        self, n_rows: int, n_keys: int, causal: bool, band: Optional[tuple[int, int]]
    ) -> Iterator[tuple[slice, slice]]:
        """(rows, keys) slices: row chunks, each with only the key range it can see, so a
        narrow band costs rows x (chunk + band width), not rows x keys."""
        chunk = self.chunk if band is None else max(64, min(self.chunk, band[1] - band[0] + 1))
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            k0, k1 = 0, min(n_keys, r1) if causal else n_keys
            if band is not None:
                k0, k1 = max(k0, r0 - band[1]), min(k1, r1 - band[0])
            yield slice(r0, r1), slice(k0, max(k0, k1))

    @staticmethod
    def _scores(
        q: Tensor,
        k: Tensor,
        scale: float,
        causal: bool,
        rows: slice,
        keys: slice,
        band: Optional[tuple[int, int]] = None,
        softcap: Optional[float] = None,
        keep: Optional[Tensor] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Masked scores of `rows` against `keys`, and d(capped)/d(raw) when softcap is set (else None)."""
        s = torch.matmul(q[:, :, rows], k[:, :, keys].transpose(-1, -2)) * scale
        dcap = None
        if softcap is not None:
            s = torch.tanh(s / softcap)
            dcap = 1 - s * s
            s = s * softcap
        if causal or band is not None:
            i = torch.arange(rows.start, rows.stop, device=q.device)[:, None]
            j = torch.arange(keys.start, keys.stop, device=q.device)[None, :]
            hidden = torch.zeros(i.shape[0], j.shape[1], dtype=torch.bool, device=q.device)
            if causal:
                hidden |= j > i
            if band is not None:
                hidden |= (i - j < band[0]) | (i - j > band[1])
            s = s.masked_fill(hidden, float("-inf"))
        if keep is not None:
            s = s.masked_fill(~keep[rows, keys], float("-inf"))
        return s, dcap

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        causal: bool,
        scale: float,
        band: Optional[tuple[int, int]] = None,
        softcap: Optional[float] = None,
        keep: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        dt = acc_dtype(q.dtype)
        qf, kf, vf = q.to(dt), _expand_kv(k, q.shape[1]).to(dt), _expand_kv(v, q.shape[1]).to(dt)
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=dt, device=q.device)
        for rows, keys in self._blocks(q.shape[2], k.shape[2], causal, band):
            if keys.start == keys.stop:
                continue  # rows that see no key: out 0, lse -inf
            s, _ = self._scores(qf, kf, scale, causal, rows, keys, band, softcap, keep)
            # finite even for empty rows; NaN stays NaN (clamp_min propagates it)
            m = s.amax(-1, keepdim=True).clamp_min(torch.finfo(dt).min)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            pv = _weighted_values(p, vf[:, :, keys])
            out[:, :, rows] = (pv / denom.clamp_min(torch.finfo(dt).tiny)).to(q.dtype)
            lse[:, :, rows] = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
        return out, lse

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        causal: bool,
        scale: float,
        band: Optional[tuple[int, int]] = None,
        softcap: Optional[float] = None,
        keep: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dt = acc_dtype(q.dtype)
        heads = q.shape[1]
        qf, kf, vf = q.to(dt), _expand_kv(k, heads).to(dt), _expand_kv(v, heads).to(dt)
        dq = torch.zeros_like(qf)
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        delta = (dout.to(dt) * out.to(dt)).sum(-1)
        for rows, keys in self._blocks(q.shape[2], k.shape[2], causal, band):
            if keys.start == keys.stop:
                continue
            s, dcap = self._scores(qf, kf, scale, causal, rows, keys, band, softcap, keep)
            lse_rows = lse[:, :, rows, None].to(dt)
            p = torch.where(torch.isneginf(lse_rows), torch.zeros_like(s), torch.exp(s - lse_rows))
            do = dout[:, :, rows].to(dt)
            dv[:, :, keys] += torch.matmul(p.transpose(-1, -2), do)
            ds = p * (torch.matmul(do, vf[:, :, keys].transpose(-1, -2)) - delta[:, :, rows, None])
            if dcap is not None:
                ds = ds * dcap
            dq[:, :, rows] = torch.matmul(ds, kf[:, :, keys]) * scale
            dk[:, :, keys] += torch.matmul(ds.transpose(-1, -2), qf[:, :, rows]) * scale
        kvh = k.shape[1]
        return dq, _fold_kv_grad(dk, kvh), _fold_kv_grad(dv, kvh)


class AtenCpuKernel:
    """torch's fused CPU flash-attention kernel; handles GQA natively.

    Finite inputs only: rows whose scores are all -inf get lse = 0 (not -inf), and NaN in q
    or the scale can come back finite on tiles under 16 rows. The ring sends blocks with
    non-finite inputs to the reference kernel instead (see ring.py).
    """

    name = "aten_cpu"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
        return dq, dk, dv


class Flipped:
    """A fused kernel on reversed rows and keys: its causal square (key j visible iff j <= i)
    becomes the anti-causal square j >= i, the far edge of a sliding window. The flips copy
    O(n * head_dim) per tile, against the O(n^2 * head_dim) of the attention itself."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.name = f"flipped {kernel.name}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        assert not causal, "Flipped computes anti-causal squares (call it with causal=False)"
        out, lse = self.kernel.forward(q.flip(2), k.flip(2), v.flip(2), True, scale)
        return out.flip(2), lse.flip(-1)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert not causal, "Flipped computes anti-causal squares (call it with causal=False)"
        dq, dk, dv = self.kernel.backward(
            dout.flip(2), q.flip(2), k.flip(2), v.flip(2), out.flip(2), lse.flip(-1).contiguous(), True, scale
        )
        return dq.flip(2), dk.flip(2), dv.flip(2)


class MaskedTile:
    """A fused kernel on a tile with a visibility mask (keep: (rows, keys) bool, True = visible),
    passed as an additive bias of -inf: torch's CPU flash kernel (attn_mask) on CPU, the CUDA
    memory-efficient op (attn_bias, every float dtype, GQA expanded) on CUDA. A row that sees no
    key gets out 0 and lse -inf (the fused kernels return lse 0 or NaN there, which a merge would
    take as real). The backward gets the ring's final lse, finite on every row, so the -inf bias
    zeroes a blind row's probabilities there."""

    name = "masked"

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep

    def _bias(self, q: Tensor) -> Tensor:
        """(rows, keys) on CPU; on CUDA (batch, heads, rows, keys) views of a row-padded buffer: the
        efficient op needs every bias stride but the last aligned to 16 elements."""
        rows, keys = self.keep.shape
        if q.device.type == "cpu":
            return torch.zeros((rows, keys), dtype=q.dtype, device=q.device).masked_fill(~self.keep, float("-inf"))
        padded = torch.zeros((rows, keys + (-keys) % 16), dtype=q.dtype, device=q.device)
        padded[:, :keys].masked_fill_(~self.keep, float("-inf"))
        return padded[:, :keys].expand(q.shape[0], q.shape[1], rows, keys)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        assert not causal, "a masked tile carries its whole mask (call it with causal=False)"
        bias = self._bias(q)
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=bias, scale=scale
            )
        else:
            k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
            out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
                **efficient_forward_args(q, k, v, False, scale, bias=bias)
            )
            lse = lse[:, :, : q.shape[2]]
        blind = ~self.keep.any(-1)
        if q.device.type != "cpu" or bool(blind.any()):  # no host sync on CUDA: fill unconditionally
            out = out.masked_fill(blind[:, None], 0.0)
            lse = lse.masked_fill(blind, float("-inf"))
        return out, lse

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        assert not causal, "a masked tile carries its whole mask (call it with causal=False)"
        bias = self._bias(q)
        if q.device.type == "cpu":
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=scale
            )
            return dq, dk, dv
        kvh = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            **efficient_backward_args(dout.contiguous(), q, k, v, out, lse, False, scale, bias=bias)
        )
        return dq, _fold_kv_grad(dk, kvh), _fold_kv_grad(dv, kvh)


_HALF = (torch.float16, torch.bfloat16)
# pure memoization (nobody reads the tensors): never cleared, never needs to be
_DROPOUT_STATE: dict[tuple[str, torch.dtype, tuple[int, ...]], Tensor] = {}


def _unused_rng_state(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A philox seed/offset for a backward without dropout: read by nobody (the ops read it
    only when dropout_p > 0), so left uninitialised; made once per device."""
    key = (str(device), dtype, shape)
    t = _DROPOUT_STATE.get(key)
    if t is None:
        t = _DROPOUT_STATE[key] = torch.empty(shape, dtype=dtype, device=device)
    return t


# Arguments for the CUDA ops, by the names in their schemas (`torch.ops.aten.<op>.default._schema`):
# torch binds them by name, so a torch that reorders or adds defaulted arguments still gets the
# right call, and one that renames an argument raises (printing the schema) instead of silently
# binding a value to the wrong slot. One function per op, so the tests check each against its
# schema (and run it on meta tensors) without a GPU.


def flash_forward_args(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, object]:
    """aten._scaled_dot_product_flash_attention: no dropout, no debug mask."""
    return dict(query=q, key=k, value=v, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)


def flash_backward_args(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> dict[str, object]:
    """The dense (not varlen) backward: cum_seq_q/k must be None (a defined tensor selects varlen)
    and max_q/max_k the block lengths; the philox seed (2,) and offset () are uint64 and unused
    at dropout 0, as the forward makes them."""
    return dict(
        grad_out=dout,
        query=q,
        key=k,
        value=v,
        out=out,
        logsumexp=lse,
        cum_seq_q=None,
        cum_seq_k=None,
        max_q=q.shape[2],
        max_k=k.shape[2],
        dropout_p=0.0,
        is_causal=causal,
        philox_seed=_unused_rng_state(q.device, torch.uint64, (2,)),
        philox_offset=_unused_rng_state(q.device, torch.uint64, ()),
        scale=scale,
    )


def cudnn_forward_args(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> dict[str, object]:
    """aten._scaled_dot_product_cudnn_attention: no bias, lse computed, no dropout."""
    return dict(
        query=q,
        key=k,
        value=v,
        attn_bias=None,
        compute_log_sumexp=True,
        dropout_p=0.0,
        is_causal=causal,
        return_debug_mask=False,
        scale=scale,
    )


def cudnn_backward_args(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> dict[str, object]:
    """lse goes back as the op made it, (B, H, S, 1); no bias, dense (None cum_seq), no dropout
    (the forward's int64 (1,) seed/offset are unused)."""
    seed = _unused_rng_state(q.device, torch.int64, (1,))
    return dict(
        grad_out=dout,
        query=q,
        key=k,
        value=v,
        out=out,
        logsumexp=lse.unsqueeze(-1),
        philox_seed=seed,
        philox_offset=seed,
        attn_bias=None,
        cum_seq_q=None,
        cum_seq_k=None,
        max_q=q.shape[2],
        max_k=k.shape[2],
        dropout_p=0.0,
        is_causal=causal,
        scale=scale,
    )


def efficient_forward_args(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, bias: Optional[Tensor] = None
) -> dict[str, object]:
    """aten._scaled_dot_product_efficient_attention: lse computed, no dropout; bias: an additive
    (batch, heads, rows, keys) mask or None."""
    return dict(
        query=q, key=k, value=v, attn_bias=bias, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, scale=scale
    )


def efficient_backward_args(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    bias: Optional[Tensor] = None,
) -> dict[str, object]:
    """lse padded to a multiple of 32 rows as the forward returns it; the forward's bias, no bias
    gradient; the int64 () seed/offset are unused without dropout."""
    seed = _unused_rng_state(q.device, torch.int64, ())
    lse = torch.nn.functional.pad(lse, (0, (-lse.shape[-1]) % 32)).contiguous()
    return dict(
        grad_out_=dout,
        query=q,
        key=k,
        value=v,
        attn_bias=bias,
        out=out,
        logsumexp=lse,
        philox_seed=seed,
        philox_offset=seed,
        dropout_p=0.0,
        grad_input_mask=[True, True, True, False],
        is_causal=causal,
        scale=scale,
    )


class CudaCudnnKernel:
    """torch's cuDNN attention op (fp16/bf16 only: fp32 returns NaN). GQA native.

    Its causal mask on a rectangular block is not the ring's alignment, so causal tiles must
    be square (the tiling only makes square diagonal causal tiles). cuDNN refuses a tile of one
    query and one key ("s_q = s_kv = 1 is not supported", seen on an H200 where document
    boundaries cut such tiles): those run on the reference kernel, which is exact for any shape.
    """

    name = "cuda_cudnn"

    @staticmethod
    def unsupported_shape(q: Tensor, k: Tensor) -> bool:
        return q.shape[2] == 1 and k.shape[2] == 1

    @staticmethod
    def _check(q: Tensor, k: Tensor, causal: bool) -> None:
        if q.dtype not in _HALF:
            raise ValueError(
                f"backend='cuda_cudnn' takes float16/bfloat16, got {q.dtype} (cuDNN returns NaN "
                "for float32); use backend='auto' or 'cuda_efficient'"
            )
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(
                f"cuda_cudnn: a causal tile must be square, got {q.shape[2]} queries x "
                f"{k.shape[2]} keys (cuDNN aligns rectangular causal masks differently)"
            )

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        self._check(q, k, causal)
        if self.unsupported_shape(q, k):
            return _KERNELS["reference"].forward(q, k, v, causal, scale)
        res = aten._scaled_dot_product_cudnn_attention(**cudnn_forward_args(q, k, v, causal, scale))
        return res[0], res[1].squeeze(-1)

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check(q, k, causal)
        if self.unsupported_shape(q, k):
            return _KERNELS["reference"].backward(dout, q, k, v, out, lse, causal, scale)
        if dout.stride() != out.stride():  # cuDNN wants dO laid out like O
            dout, out = dout.contiguous(), out.contiguous()
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            **cudnn_backward_args(dout, q, k, v, out, lse, causal, scale)
        )
        return dq, dk, dv


class CudaFlashKernel:
    """torch's CUDA flash-attention op (fp16/bf16). GQA is expanded per block."""

    name = "cuda_flash"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        res = aten._scaled_dot_product_flash_attention(**flash_forward_args(q, k, v, causal, scale))
        return res[0], res[1]

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        kvh = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            **flash_backward_args(dout.contiguous(), q, k, v, out, lse, causal, scale)
        )
        return dq, _fold_kv_grad(dk, kvh), _fold_kv_grad(dv, kvh)


class CudaEfficientKernel:
    """torch's CUDA memory-efficient attention op; its lse is padded to 32 rows."""

    name = "cuda_efficient"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(**efficient_forward_args(q, k, v, causal, scale))
        return out, lse[:, :, : q.shape[2]]

    def backward(
        self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        kvh = k.shape[1]
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            **efficient_backward_args(dout.contiguous(), q, k, v, out, lse, causal, scale)
        )
        return dq, _fold_kv_grad(dk, kvh), _fold_kv_grad(dv, kvh)


_KERNELS: dict[str, Kernel] = {
    "aten_cpu": AtenCpuKernel(),
    "cuda_cudnn": CudaCudnnKernel(),
    "cuda_flash": CudaFlashKernel(),
    "cuda_efficient": CudaEfficientKernel(),
    "reference": ReferenceKernel(),
}
# What each fused backend needs: (device type, dtypes or None for any float dtype).
_NEEDS: dict[str, tuple[str, Optional[tuple[torch.dtype, ...]]]] = {
    "aten_cpu": ("cpu", None),
    "cuda_cudnn": ("cuda", _HALF),
    "cuda_flash": ("cuda", _HALF),
    "cuda_efficient": ("cuda", _HALF + (torch.float32,)),
}


def auto_backend(
    device_type: str, dtype: torch.dtype, head_dim: int, capability: tuple[int, int] = (0, 0), cudnn_sdpa: bool = False
) -> str:
    """The fastest backend for these facts (a pure table; see select_kernel).

    On an H200 cuDNN ran fwd+bwd 1.65-1.75x faster than flash, and flash 2.3x faster than
    efficient. cuDNN and flash need sm80+, fp16/bf16 and head_dim a multiple of 8
    (cuDNN: 64..256; flash: <= 256).
    """
    if device_type == "cpu":
        return "aten_cpu"
    if device_type != "cuda":
        return "reference"
    aligned = head_dim % 8 == 0
    if dtype in _HALF and capability >= (8, 0) and aligned:
        if cudnn_sdpa and 64 <= head_dim <= 256:
            return "cuda_cudnn"
        if head_dim <= 256:
            return "cuda_flash"
    if dtype in _HALF + (torch.float32,) and capability >= (5, 0) and aligned:
        return "cuda_efficient"
    return "reference"


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return major, minor


def _cudnn_sdpa_available() -> bool:
    """cuDNN's fused attention (the op torch calls) needs cuDNN 9."""
    cudnn = torch.backends.cudnn
    # torch leaves cudnn.is_available and cudnn.version unannotated
    return bool(cudnn.is_available()) and (cudnn.version() or 0) >= 90000  # type: ignore[no-untyped-call]


# (device type, index, dtype, head_dim) -> backend name: pure memoization of auto_backend, whose answer
# depends on those and the device's fixed capability alone, so it never needs clearing.
_AUTO_CACHE: dict[tuple[str, Optional[int], torch.dtype, int], str] = {}


def select_kernel(backend: str, device: Union[torch.device, str], dtype: torch.dtype, head_dim: int) -> Kernel:
    """The named kernel (checked against device and dtype), or for "auto" the fastest one
    that supports (device, dtype, head_dim): decided once per such triple and cached, from
    the device's capability, never by trying ops and catching their errors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if backend != "auto":
        want, dtypes = _NEEDS.get(backend, (None, None))
        if want is not None and dev.type != want:
            raise ValueError(f"backend={backend!r} runs on {want} tensors, got {dev.type}; use backend='auto'")
        if dtypes is not None and dtype not in dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(
                f"backend={backend!r} takes {names} tensors, got {dtype}; use backend='auto' or cast q, k, v"
            )
        return _KERNELS[backend]
    key = (dev.type, dev.index, dtype, head_dim)
    name = _AUTO_CACHE.get(key)
    if name is None:
        if dev.type == "cuda":
            name = auto_backend("cuda", dtype, head_dim, _cuda_capability(dev), _cudnn_sdpa_available())
        else:
            name = auto_backend(dev.type, dtype, head_dim)
        _AUTO_CACHE[key] = name
    return _KERNELS[name]


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
