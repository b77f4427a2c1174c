"""CUDA kernels and the ring on one GPU.

Tests without a mark run everywhere: the backend table, the argument lists built for the
CUDA ops (checked against the ops' schemas and run on meta tensors, which torch shapes
without a GPU). Tests marked `cuda` need a GPU (`make test-gpu`) and skip without one.
"""
import pytest
import torch

from ringwise.attention import kernels
from ringwise.attention.kernels import (
    CudaCudnnKernel, CudaFlashKernel, auto_backend, cudnn_backward_args, cudnn_forward_args,
    flash_backward_args, flash_forward_args, select_kernel,
)

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- backend selection (CPU)

@pytest.mark.parametrize("facts,expected", [
    (("cuda", torch.bfloat16, 128, (9, 0), True), "cuda_cudnn"),   # Hopper
    (("cuda", torch.float16, 64, (8, 0), True), "cuda_cudnn"),     # Ampere, smallest cuDNN head_dim
    (("cuda", torch.bfloat16, 256, (9, 0), True), "cuda_cudnn"),
    (("cuda", torch.bfloat16, 72, (9, 0), True), "cuda_cudnn"),
    (("cuda", torch.bfloat16, 128, (9, 0), False), "cuda_flash"),  # no cuDNN 9
    (("cuda", torch.bfloat16, 32, (9, 0), True), "cuda_flash"),    # below cuDNN's head_dim range
    (("cuda", torch.bfloat16, 512, (9, 0), True), "cuda_efficient"),
    (("cuda", torch.float32, 128, (9, 0), True), "cuda_efficient"),  # cuDNN returns NaN for fp32
    (("cuda", torch.bfloat16, 128, (7, 5), True), "cuda_efficient"),  # Turing: no flash, no cuDNN attention
    (("cuda", torch.bfloat16, 20, (9, 0), True), "reference"),     # head_dim not a multiple of 8
    (("cuda", torch.float64, 128, (9, 0), True), "reference"),
    (("cpu", torch.bfloat16, 128), "aten_cpu"),
    (("cpu", torch.float64, 20), "aten_cpu"),
    (("mps", torch.float16, 64), "reference"),
])
def test_auto_backend_table(facts, expected):
    assert auto_backend(*facts) == expected


def test_auto_is_decided_once_per_device_dtype_head_dim(monkeypatch):
    calls = []

    def capability(device):
        calls.append(device)
        return (9, 0)

    monkeypatch.setattr(kernels, "_AUTO_CACHE", {})
    monkeypatch.setattr(kernels, "_cuda_capability", capability)
    monkeypatch.setattr(kernels, "_cudnn_sdpa_available", lambda: True)
    dev = torch.device("cuda", 0)
    for _ in range(3):
        assert isinstance(select_kernel("auto", dev, torch.bfloat16, 128), CudaCudnnKernel)
    assert len(calls) == 1
    assert select_kernel("auto", dev, torch.float32, 128).name == "cuda_efficient"
    assert select_kernel("auto", torch.device("cuda", 1), torch.bfloat16, 128).name == "cuda_cudnn"
    assert len(calls) == 3


def test_named_backends_check_device_and_dtype():
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"backend='cuda_cudnn' takes float16/bfloat16 tensors, got torch.float32"):
        select_kernel("cuda_cudnn", cuda, torch.float32, 128)
    with pytest.raises(ValueError, match="backend='cuda_flash' takes float16/bfloat16"):
        select_kernel("cuda_flash", cuda, torch.float32, 128)
    with pytest.raises(ValueError, match="runs on cuda tensors, got cpu"):
        select_kernel("cuda_cudnn", torch.device("cpu"), torch.bfloat16, 128)
    assert select_kernel("cuda_efficient", cuda, torch.float32, 128).name == "cuda_efficient"
    assert select_kernel("cuda_cudnn", cuda, torch.bfloat16, 128).name == "cuda_cudnn"


# ---------------------------------------------------------------- op arguments vs schemas (CPU)

def _bind(op, args, kwargs):
    """Schema argument name -> value; fails if the call does not fit the schema's signature."""
    schema = op.default._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    kw_only = {a.name for a in schema.arguments if a.kwarg_only}
    assert len(args) == len(positional), f"{schema.name}: {len(args)} positional args for {len(positional)}"
    assert set(kwargs) <= kw_only, f"{schema.name}: unknown keyword(s) {set(kwargs) - kw_only}"
    return {a.name: x for a, x in zip(positional, args)} | kwargs


def _blocks(device="meta", dtype=torch.bfloat16, b=2, h=4, hk=2, sq=48, sk=32, d=64):
    """(batch, heads, seq, dim) views of (batch, seq, heads, dim) storage, as the ring passes them."""
    q = torch.empty(b, sq, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.empty(b, sk, hk, d, device=device, dtype=dtype).transpose(1, 2)
    v = torch.empty(b, sk, hk, d, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def test_flash_args_fit_schema_dense_path():
    q, k, v = _blocks(hk=4)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="meta")
    fwd = _bind(aten._scaled_dot_product_flash_attention, *flash_forward_args(q, k, v, True, 0.125))
    assert (fwd["dropout_p"], fwd["is_causal"], fwd["return_debug_mask"], fwd["scale"]) == (0.0, True, False, 0.125)
    bwd = _bind(aten._scaled_dot_product_flash_attention_backward,
                *flash_backward_args(out, q, k, v, out, lse, False, 0.125))
    # A defined cum_seq tensor selects flash's varlen path ("batch size must be positive").
    assert bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None
    assert (bwd["max_q"], bwd["max_k"], bwd["dropout_p"], bwd["is_causal"]) == (48, 32, 0.0, False)
    assert bwd["philox_seed"].dtype == torch.uint64 and bwd["philox_seed"].shape == (2,)
    assert bwd["philox_offset"].dtype == torch.uint64 and bwd["philox_offset"].shape == ()
    assert bwd["logsumexp"] is lse and bwd["query"] is q


def test_cudnn_args_fit_schema():
    q, k, v = _blocks()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="meta")
    fwd = _bind(aten._scaled_dot_product_cudnn_attention, *cudnn_forward_args(q, k, v, False, 0.125))
    assert fwd["attn_bias"] is None and fwd["compute_log_sumexp"] is True and fwd["dropout_p"] == 0.0
    bwd = _bind(aten._scaled_dot_product_cudnn_attention_backward,
                *cudnn_backward_args(out, q, k, v, out, lse, False, 0.125))
    assert bwd["attn_bias"] is None and bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None
    assert (bwd["max_q"], bwd["max_k"], bwd["scale"]) == (48, 32, 0.125)
    assert bwd["logsumexp"].shape == (2, 4, 48, 1)  # the op's own lse layout


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_kernel_shapes_on_meta(causal):
    """The calls bind and shape as on a GPU: lse (B, H, S) out, GQA dK/dV with kv_heads."""
    sk = 48 if causal else 32
    q, k, v = _blocks(sk=sk)
    kern = CudaCudnnKernel()
    out, lse = kern.forward(q, k, v, causal, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 4, 48) and lse.dtype == torch.float32
    dq, dk, dv = kern.backward(torch.empty_like(out), q, k, v, out, lse.contiguous(), causal, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_flash_kernel_shapes_on_meta():
    q, k, v = _blocks()
    kern = CudaFlashKernel()
    out, lse = kern.forward(q, k, v, False, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 4, 48)
    dq, dk, dv = kern.backward(torch.empty_like(out), q, k, v, out, lse, False, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape  # GQA folded back


def test_cudnn_kernel_refuses_fp32_and_rectangular_causal():
    kern = CudaCudnnKernel()
    q, k, v = _blocks(dtype=torch.float32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        kern.forward(q, k, v, False, 0.125)
    q, k, v = _blocks(sq=48, sk=32)
    with pytest.raises(ValueError, match="causal tile must be square, got 48 queries x 32 keys"):
        kern.forward(q, k, v, True, 0.125)
