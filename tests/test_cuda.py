"""CUDA kernels and the ring on one GPU.

Tests without a mark run everywhere: the backend table, the argument lists built for the
CUDA ops (checked against the ops' schemas and run on meta tensors, which torch shapes
without a GPU). Tests marked `cuda` need a GPU (`make test-gpu`) and skip without one.
"""

import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CEILINGS,
    DTYPES,
    EPS,
    assemble,
    assert_within_budget,
    count_comms,
    document_mask,
    make_inputs,
    max_err,
    packed,
    reference_attention,
    run_attention,
)

import ringwise
from ringwise.attention import kernels
from ringwise.attention.kernels import (
    CudaCudnnKernel,
    CudaEfficientKernel,
    CudaFlashKernel,
    MaskedTile,
    ReferenceKernel,
    auto_backend,
    cudnn_backward_args,
    cudnn_forward_args,
    efficient_backward_args,
    efficient_forward_args,
    flash_backward_args,
    flash_forward_args,
    select_kernel,
)

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- backend selection (CPU)


@pytest.mark.parametrize(
    "facts,expected",
    [
        (("cuda", torch.bfloat16, 128, (9, 0), True), "cuda_cudnn"),  # Hopper
        (("cuda", torch.float16, 64, (8, 0), True), "cuda_cudnn"),  # Ampere, smallest cuDNN head_dim
        (("cuda", torch.bfloat16, 256, (9, 0), True), "cuda_cudnn"),
        (("cuda", torch.bfloat16, 72, (9, 0), True), "cuda_cudnn"),
        (("cuda", torch.bfloat16, 128, (9, 0), False), "cuda_flash"),  # no cuDNN 9
        (("cuda", torch.bfloat16, 32, (9, 0), True), "cuda_flash"),  # below cuDNN's head_dim range
        (("cuda", torch.bfloat16, 512, (9, 0), True), "cuda_efficient"),
        (("cuda", torch.float32, 128, (9, 0), True), "cuda_efficient"),  # cuDNN returns NaN for fp32
        (("cuda", torch.bfloat16, 128, (7, 5), True), "cuda_efficient"),  # Turing: no flash, no cuDNN attention
        (("cuda", torch.bfloat16, 20, (9, 0), True), "reference"),  # head_dim not a multiple of 8
        (("cuda", torch.float64, 128, (9, 0), True), "reference"),
        (("cpu", torch.bfloat16, 128), "aten_cpu"),
        (("cpu", torch.float64, 20), "aten_cpu"),
        (("mps", torch.float16, 64), "reference"),
    ],
)
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


def _bind(op, kwargs):
    """The named arguments, checked against the op's schema: every name is the schema's and every
    argument without a default is given (what torch checks when the kernels call op(**kwargs))."""
    schema = op.default._schema
    names = {a.name for a in schema.arguments}
    required = {a.name for a in schema.arguments if not a.has_default_value()}  # Tensor? too: None must be given
    assert set(kwargs) <= names, f"{schema.name}: unknown argument(s) {set(kwargs) - names}"
    assert required <= set(kwargs), f"{schema.name}: missing argument(s) {required - set(kwargs)}"
    return kwargs


def _blocks(device="meta", dtype=torch.bfloat16, b=2, h=4, hk=2, sq=48, sk=32, d=64):
    """(batch, heads, seq, dim) views of (batch, seq, heads, dim) storage, as the ring passes them."""
    q = torch.empty(b, sq, h, d, device=device, dtype=dtype).transpose(1, 2)
    k = torch.empty(b, sk, hk, d, device=device, dtype=dtype).transpose(1, 2)
    v = torch.empty(b, sk, hk, d, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v


def test_flash_args_fit_schema_dense_path():
    q, k, v = _blocks(hk=4)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="meta")
    fwd = _bind(aten._scaled_dot_product_flash_attention, flash_forward_args(q, k, v, True, 0.125))
    assert (fwd["dropout_p"], fwd["is_causal"], fwd["return_debug_mask"], fwd["scale"]) == (0.0, True, False, 0.125)
    bwd = _bind(
        aten._scaled_dot_product_flash_attention_backward, flash_backward_args(out, q, k, v, out, lse, False, 0.125)
    )
    # A defined cum_seq tensor selects flash's varlen path ("batch size must be positive").
    assert bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None
    assert (bwd["max_q"], bwd["max_k"], bwd["dropout_p"], bwd["is_causal"]) == (48, 32, 0.0, False)
    assert bwd["philox_seed"].dtype == torch.uint64 and bwd["philox_seed"].shape == (2,)
    assert bwd["philox_offset"].dtype == torch.uint64 and bwd["philox_offset"].shape == ()
    assert bwd["logsumexp"] is lse and bwd["query"] is q


def test_cudnn_args_fit_schema():
    q, k, v = _blocks()
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="meta")
    fwd = _bind(aten._scaled_dot_product_cudnn_attention, cudnn_forward_args(q, k, v, False, 0.125))
    assert fwd["attn_bias"] is None and fwd["compute_log_sumexp"] is True and fwd["dropout_p"] == 0.0
    bwd = _bind(
        aten._scaled_dot_product_cudnn_attention_backward, cudnn_backward_args(out, q, k, v, out, lse, False, 0.125)
    )
    assert bwd["attn_bias"] is None and bwd["cum_seq_q"] is None and bwd["cum_seq_k"] is None
    assert (bwd["max_q"], bwd["max_k"], bwd["scale"]) == (48, 32, 0.125)
    assert bwd["logsumexp"].shape == (2, 4, 48, 1)  # the op's own lse layout


def test_efficient_args_fit_schema():
    q, k, v = _blocks(hk=4, dtype=torch.float32)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device="meta")
    fwd = _bind(aten._scaled_dot_product_efficient_attention, efficient_forward_args(q, k, v, True, 0.125))
    assert fwd["attn_bias"] is None and fwd["compute_log_sumexp"] is True and fwd["is_causal"] is True
    bwd = _bind(
        aten._scaled_dot_product_efficient_attention_backward,
        efficient_backward_args(out, q, k, v, out, lse, False, 0.125),
    )
    assert bwd["logsumexp"].shape == (2, 4, 64)  # padded to a multiple of 32 rows, as the forward returns it
    assert bwd["grad_input_mask"] == [True, True, True, False] and bwd["attn_bias"] is None


def test_schema_check_catches_a_wrong_name():
    """The check above can fail: a misspelt or missing argument is reported."""
    kw = cudnn_forward_args(*_blocks(), False, 0.125)
    with pytest.raises(AssertionError, match="unknown argument"):
        _bind(aten._scaled_dot_product_cudnn_attention, dict(kw, causal=True))
    with pytest.raises(AssertionError, match="missing argument"):
        _bind(aten._scaled_dot_product_cudnn_attention, {k: x for k, x in kw.items() if k != "compute_log_sumexp"})


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


def test_efficient_kernel_shapes_on_meta():
    q, k, v = _blocks(dtype=torch.float32)
    kern = CudaEfficientKernel()
    out, lse = kern.forward(q, k, v, False, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 4, 48)
    dq, dk, dv = kern.backward(torch.empty_like(out), q, k, v, out, lse, False, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape  # GQA folded back


def test_masked_tile_binds_an_aligned_bias_on_meta():
    """A masked tile off CPU calls the efficient op with a (batch, heads, rows, keys) bias whose row
    stride is a multiple of 16 (the op's alignment), the same bias forward and backward; GQA folded."""
    q, k, v = _blocks(sk=29)
    keep = torch.ones(48, 29, dtype=torch.bool, device="meta")
    tile = MaskedTile(keep)
    bias = tile._bias(q)
    assert bias.shape == (2, 4, 48, 29) and bias.dtype == q.dtype and bias.stride()[:2] == (0, 0)
    assert bias.stride(2) % 16 == 0 and bias.stride(3) == 1
    fwd = _bind(aten._scaled_dot_product_efficient_attention, efficient_forward_args(q, k, v, False, 0.125, bias=bias))
    assert fwd["attn_bias"] is bias and fwd["is_causal"] is False
    out, lse = tile.forward(q, k, v, False, 0.125)
    assert out.shape == q.shape and lse.shape == (2, 4, 48)
    bwd = _bind(
        aten._scaled_dot_product_efficient_attention_backward,
        efficient_backward_args(out, q, k, v, out, lse, False, 0.125, bias=bias),
    )
    assert bwd["attn_bias"] is bias and bwd["grad_input_mask"] == [True, True, True, False]
    dq, dk, dv = tile.backward(torch.empty_like(out), q, k, v, out, lse, False, 0.125)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("docs", [None, (0, 1, 8, 9, 23, 24), (0, 5, 6, 24)], ids=["one-doc", "docs-a", "docs-b"])
def test_causal_tiles_are_square_and_diagonal(docs):
    """cuDNN's causal mask is only the ring's on square tiles: every causal tile the ring makes
    must be square with key j visible to query i exactly when j <= i (by global position)."""
    import itertools as it

    from ringwise.attention.layout import LAYOUTS, global_indices
    from ringwise.attention.tiles import Mask, step_tiles

    total, seen = 24, 0
    for layout, W in it.product(LAYOUTS, [1, 2, 3, 4]):
        if total % (2 * W):
            continue
        L = total // W
        for rank, src in it.product(range(W), range(W)):
            gq, gk = global_indices(layout, rank, W, total), global_indices(layout, src, W, total)
            for t in step_tiles(layout, rank, src, W, L, Mask(True, docs)):
                if not t.causal:
                    continue
                seen += 1
                assert t.q_len == t.k_len, (layout, W, rank, src, t)
                i = torch.arange(t.q_len)
                visible = gk[t.k_start + i][None, :] <= gq[t.q_start + i][:, None]
                assert torch.equal(visible, torch.ones(t.q_len, t.q_len, dtype=torch.bool).tril()), (layout, W, t)
    assert seen > 20


def test_cudnn_kernel_refuses_fp32_and_rectangular_causal():
    kern = CudaCudnnKernel()
    q, k, v = _blocks(dtype=torch.float32)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        kern.forward(q, k, v, False, 0.125)
    q, k, v = _blocks(sq=48, sk=32)
    with pytest.raises(ValueError, match="causal tile must be square, got 48 queries x 32 keys"):
        kern.forward(q, k, v, True, 0.125)


@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_kernel_runs_one_by_one_tiles_on_the_reference(monkeypatch, causal):
    """cuDNN refuses s_q = s_kv = 1 (an H200 run: document boundaries cut such tiles); those tiles
    run on the reference kernel, bit for bit, and cuDNN's op is never called for them."""

    def no_cudnn(*args, **kwargs):
        raise AssertionError("cuDNN's op was called for a 1 x 1 tile")

    monkeypatch.setattr(kernels.aten, "_scaled_dot_product_cudnn_attention", no_cudnn)
    monkeypatch.setattr(kernels.aten, "_scaled_dot_product_cudnn_attention_backward", no_cudnn)
    q, k, v = (t.normal_() for t in _blocks(device="cpu", sq=1, sk=1))
    dout = torch.randn_like(q)
    kern, ref = CudaCudnnKernel(), kernels.ReferenceKernel()
    out, lse = kern.forward(q, k, v, causal, 0.125)
    want_out, want_lse = ref.forward(q, k, v, causal, 0.125)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    for got, want in zip(
        kern.backward(dout, q, k, v, out, lse, causal, 0.125),
        ref.backward(dout, q, k, v, out, lse, causal, 0.125),
        strict=True,
    ):
        assert torch.equal(got, want)
    q, k, v = _blocks(device="cpu", sq=2, sk=2)  # any other tile goes to cuDNN
    with pytest.raises(AssertionError, match="cuDNN's op was called"):
        kern.forward(q, k, v, causal, 0.125)


# ---------------------------------------------------------------- GPU benchmark code (CPU smoke)


def test_bench_attention_device_rows_on_cpu():
    """The --device cuda bench's loop, run on CPU: times where an impl runs, the error where not."""
    from ringwise.bench.attention import attention_flops, device_rows

    rows = device_rows([64], 1, 2, 16, torch.bfloat16, "cpu", repeats=1)
    by = {(r["impl"], r["causal"]): r for r in rows}
    assert len(rows) == 8
    for causal in (True, False):
        for impl in ("ringwise", "sdpa_flash"):  # torch has a CPU flash kernel
            r = by[(impl, causal)]
            assert r["error"] is None and r["ms"] > 0
            assert r["tflops"] == pytest.approx(attention_flops(1, 64, 2, 16, causal) / (r["ms"] * 1e-3) / 1e12)
        assert "runs on cuda tensors" in by[("ringwise_flash", causal)]["error"]
        assert by[("sdpa_cudnn", causal)]["error"]
    assert (
        attention_flops(1, 1024, 32, 128, False)
        == 2 * attention_flops(1, 1024, 32, 128, True)
        == 3.5 * 4 * 32 * 1024**2 * 128
    )


@pytest.mark.parametrize("n,cap", [(0, None), (1, None), (13, None), (13, 8), (13, 10), (13, 13), (5, 64)])
def test_context_search_finds_the_largest_fitting_multiple(n, cap):
    from ringwise.bench.context import largest

    tried = []

    def ok(k):
        tried.append(k)
        return k <= n

    assert largest(ok, cap) == (min(n, cap) if cap else n)
    assert cap is None or max(tried) <= cap  # never probes past the cap


def test_context_gpu_model_flops():
    from ringwise.bench.context import GPU_MODEL, METHODS, train_flops
    from ringwise.model import Transformer, model_config

    cfg = model_config("llama-3b", **GPU_MODEL, **METHODS["bpt"])
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert 1.0e9 < n < 1.2e9  # "~1B"
    S = 32768
    attn = cfg.n_layers * 3.5 * 4 * S * S * 128 * 16 / 2
    assert train_flops(cfg, S) == pytest.approx(6 * (n - 32000 * 2048) * S + attn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no GPU")
def test_bench_device_cuda_without_gpu_says_so(tmp_path):
    from ringwise.cli import main

    for suite in ("attention", "compute", "context"):
        with pytest.raises(ValueError, match="--device cuda: torch sees no GPU"):
            main(["bench", suite, "--device", "cuda", "--out", str(tmp_path)])


def test_gpu_check_script_runs_every_step_and_logs_it(tmp_path):
    """scripts/gpu_check.sh, dry-run here (no GPU): every step runs under its limit, logs into
    OUT and lands in the summary; the GPU benches are skipped, said so, instead of timing the CPU.
    Its pytest step collects this file only (PYTEST_ADDOPTS): collecting the whole suite again
    is what the suite itself just did."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, PYTEST_ADDOPTS=str(root / "tests" / "test_cuda.py"))
    done = subprocess.run(
        ["bash", str(root / "scripts" / "gpu_check.sh"), str(tmp_path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert [line.split(":")[0] for line in summary.splitlines() if ": exit " in line] == ["env", "test-gpu"]
    assert "test-gpu: exit 0" in summary  # the cuda tests skip cleanly without a GPU
    assert " skipped" in (tmp_path / "test-gpu.log").read_text()
    assert "gpu: no" in (tmp_path / "env.log").read_text()
    for name in ["bench-attention", "bench-compute", "bench-context"]:  # they would refuse (tested above)
        assert f"{name}: skipped (torch sees no GPU)" in summary.splitlines()
        assert (tmp_path / f"{name}.log").exists()


# ---------------------------------------------------------------- on a GPU (make test-gpu)

HAS_CUDA = torch.cuda.is_available()


def gpu(fn):
    """Marked `cuda` (selected by make test-gpu) and skipped where torch sees no GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")(fn))


def _grads(fn, inputs, dout):
    xs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*xs)
    return (out.detach(), *torch.autograd.grad(out, xs, dout))


def sdpa_errors(case, q, k, v, dout, refs):
    """SDPA's own error vs float64 in the case's dtype on the GPU (torch picks its backend): the budget."""
    dt, causal = DTYPES[case["dtype"]], case["causal"]
    mask = document_mask(case.get("cu_seqlens"), q.shape[1])
    if mask is not None and causal:
        mask = mask & torch.ones_like(mask).tril()

    def sdpa(q, k, v):
        attn = None if mask is None else mask.cuda()
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn,
            is_causal=causal and mask is None,
            enable_gqa=True,
        )
        return o.transpose(1, 2)

    res = _grads(sdpa, [x.cuda().to(dt) for x in (q, k, v)], dout.cuda().to(dt))
    return {n: max_err(r.cpu(), refs[n]) for n, r in zip(("out", "dq", "dk", "dv"), res)}


def float64_refs(case, q, k, v, dout):
    mask = document_mask(case.get("cu_seqlens"), q.shape[1])
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = reference_attention(qr, kr, vr, case["causal"], mask=mask)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout)
    return dict(out=out.detach(), lse=lse, dq=dq, dk=dk, dv=dv)


KERNEL_CASES = [
    dict(
        backend=b,
        dtype=dt,
        causal=c,
        kv_heads=hk,
        head_dim=d,
        world=1,
        layout="contiguous",
        batch=2,
        heads=8,
        seq=250,
        seed=11,
    )
    for b, dt, c, hk, d in itertools.product(
        ["cuda_cudnn", "cuda_flash", "cuda_efficient"],
        ["float16", "bfloat16", "float32"],
        [False, True],
        [8, 2],
        [64, 128],
    )
    if not (b in ("cuda_cudnn", "cuda_flash") and dt == "float32")
]


@gpu
@pytest.mark.parametrize(
    "case",
    KERNEL_CASES,
    ids=lambda c: (
        f"{c['backend']}-{c['dtype']}-{'causal' if c['causal'] else 'full'}-h8/{c['kv_heads']}-d{c['head_dim']}"
    ),
)
def test_kernel_matches_float64_within_sdpa_error(case):
    q, k, v, dout = make_inputs(case)
    refs = float64_refs(case, q, k, v, dout)
    budget = sdpa_errors(case, q, k, v, dout, refs)
    dt = DTYPES[case["dtype"]]

    def ring(q, k, v):
        return ringwise.ring_attention(q, k, v, causal=case["causal"], backend=case["backend"])

    res = _grads(ring, [x.cuda().to(dt) for x in (q, k, v)], dout.cuda().to(dt))
    for name, r in zip(("out", "dq", "dk", "dv"), res):
        e = max_err(r.cpu(), refs[name])
        assert_within_budget(
            f"{name} (budget: SDPA's error)", e, budget[name], EPS[case["dtype"]], ceiling=CEILINGS[case["dtype"]]
        )


@gpu
def test_auto_picks_cudnn_on_ampere_and_later():
    dev = torch.device("cuda", torch.cuda.current_device())
    kern = ringwise.attention.kernels.select_kernel("auto", dev, torch.bfloat16, 128)
    if torch.cuda.get_device_capability(dev) >= (8, 0):
        assert kern.name == "cuda_cudnn", f"cuDNN {torch.backends.cudnn.version()}: auto chose {kern.name}"
    assert ringwise.attention.kernels.select_kernel("auto", dev, torch.float32, 128).name == "cuda_efficient"


def gpu_ring_case(case):
    """One rank of a ring on cuda:0 (every rank shares the GPU). The transport is left to
    "auto", which must stage the CUDA tensors through host memory on this gloo group."""
    torch.cuda.set_device(0)
    dt, layout = DTYPES[case["dtype"]], case["layout"]
    q, k, v, dout = make_inputs(case)
    ql, kl, vl = (ringwise.shard(x, 1, layout).to("cuda", dt).requires_grad_() for x in (q, k, v))
    with count_comms() as whole:
        with count_comms() as fwd:
            out, lse = ringwise.ring_attention(
                ql,
                kl,
                vl,
                causal=case["causal"],
                layout=layout,
                return_lse=True,
                cu_seqlens=case.get("cu_seqlens"),
                backend=case.get("backend", "auto"),
            )
        out.backward(ringwise.shard(dout, 1, layout).to("cuda", dt))
        torch.cuda.synchronize()
    res = dict(
        out=out.detach().cpu(),
        lse=lse.cpu(),
        dq=ql.grad.cpu(),
        dk=kl.grad.cpu(),
        dv=vl.grad.cpu(),
        fwd_hops=dict(fwd.hops),
        hops=dict(whole.hops),
        staged=dict(whole.staged),
    )
    # The same ring on CPU copies, sent directly: the hops the host-staged ring must match.
    direct = run_attention(dict(case, dtype="float32"), q, k, v, dout)
    res["direct_hops"] = (direct["fwd_hops"], dict(Counter(direct["fwd_hops"]) + Counter(direct["bwd_hops"])))
    return res


def _ring_cases():
    cases = []
    for i, (W, layout) in enumerate(itertools.product([2, 3, 4], ringwise.LAYOUTS)):
        seq = 96 * W
        base = dict(world=W, layout=layout, batch=2, heads=4, kv_heads=2, head_dim=64, seq=seq, seed=100 + i)
        cases.append(dict(base, dtype="bfloat16", causal=True, cu_seqlens=packed([1, 37, 5, seq - 43])))
        cases.append(dict(base, dtype="float16", causal=False))
    cases.append(
        dict(
            world=3,
            layout="zigzag",
            batch=1,
            heads=4,
            kv_heads=1,
            head_dim=64,
            seq=288,
            seed=7,
            dtype="float32",
            causal=True,
        )
    )  # cuda_efficient in the ring
    cases.append(
        dict(
            world=3,
            layout="striped",
            batch=1,
            heads=4,
            kv_heads=2,
            head_dim=128,
            seq=288,
            seed=8,
            dtype="bfloat16",
            causal=True,
            backend="cuda_flash",
        )
    )
    return cases


@gpu
@pytest.mark.parametrize(
    "case",
    _ring_cases(),
    ids=lambda c: (
        f"W{c['world']}-{c['layout']}-{c['dtype']}-{'causal' if c['causal'] else 'full'}"
        f"{'-docs' if c.get('cu_seqlens') else ''}-{c.get('backend', 'auto')}"
    ),
)
def test_ring_on_one_gpu_matches_float64(cluster, case):
    """W ranks on one GPU (gloo group, so host-staged hops): error <= 2 x SDPA's, hop counts as direct."""
    W = case["world"]
    results = cluster(W).run(gpu_ring_case, case, timeout=120)
    q, k, v, dout = make_inputs(case)
    refs = float64_refs(case, q, k, v, dout)
    budget = sdpa_errors(case, q, k, v, dout, refs)
    # lse: SDPA returns none, so the budget is the single-device kernel's own lse error
    dt = DTYPES[case["dtype"]]
    _, lse1 = ringwise.ring_attention(
        *(x.cuda().to(dt) for x in (q, k, v)),
        causal=case["causal"],
        return_lse=True,
        cu_seqlens=case.get("cu_seqlens"),
        backend=case.get("backend", "auto"),
    )
    budget["lse"] = max_err(lse1.cpu(), refs["lse"])
    for name in ("out", "lse", "dq", "dk", "dv"):
        got = assemble([r[name] for r in results], case["layout"], 2 if name == "lse" else 1)
        assert torch.isfinite(got).all(), name
        e = max_err(got, refs[name])
        assert_within_budget(name, e, budget[name], EPS[case["dtype"]], ceiling=CEILINGS[case["dtype"]])
    el = torch.tensor([], dtype=dt).element_size()
    kv_elems = case["batch"] * (case["seq"] // W) * case["kv_heads"] * case["head_dim"]
    for r in results:
        assert (r["fwd_hops"], r["hops"]) == r["direct_hops"]
        assert r["hops"]["dkv"] == W and r["fwd_hops"]["kv"] >= 1
        # every hop went through host memory: (k, v) in the input dtype, (dk, dv) in float32
        staged = (r["hops"]["kv"] * el + r["hops"]["dkv"] * 4) * 2 * kv_elems
        assert r["staged"] == {"to_host": staged, "to_device": staged}


# ---------------------------------------------------------------- masks on one GPU (docs/masks.md)


def gpu_mask_case(case):
    """One rank of a ring on cuda:0 with one of test_masks' masks (its masked tiles run on the reference
    kernel there, with their masks built on the GPU); out, lse and gradients back on CPU."""
    from helpers import options

    torch.cuda.set_device(0)
    dt, layout = DTYPES[case["dtype"]], case["layout"]
    q, k, v, dout = make_inputs(case)
    ql, kl, vl = (ringwise.shard(x, 1, layout).to("cuda", dt).requires_grad_() for x in (q, k, v))
    out, lse = ringwise.ring_attention(ql, kl, vl, layout=layout, return_lse=True, **options(case))
    out.backward(ringwise.shard(dout, 1, layout).to("cuda", dt))
    torch.cuda.synchronize()
    return dict(out=out.detach().cpu(), lse=lse.cpu(), dq=ql.grad.cpu(), dk=kl.grad.cpu(), dv=vl.grad.cpu())


def _mask_cases():
    from test_masks import KINDS, S

    base = dict(batch=1, heads=9, kv_heads=3, head_dim=128, seq=S, dtype="bfloat16")
    kinds = ("groups-window-docs", "bidirectional-docs", "chunk-window-docs", "mask_mod-sparse")
    return [
        dict(base, world=W, layout=layout, seed=1600 + i, **KINDS[kind])
        for i, (W, layout, kind) in enumerate(itertools.product([2, 3], ["zigzag", "contiguous"], kinds))
    ]


@gpu
@pytest.mark.parametrize("case", _mask_cases(), ids=lambda c: f"W{c['world']}-{c['layout']}-{c['seed']}")
def test_masks_on_one_gpu_match_float64(cluster, case):
    """Image groups with a window and documents, a bidirectional window, chunks and a mask_mod through a ring on
    one GPU (bf16, GQA 9:3, head_dim 128): within the error budget of float64 on the whole sequence."""
    from helpers import check_against_reference

    check_against_reference(case, cluster(case["world"]).run(gpu_mask_case, case, timeout=120))


# ---------------------------------------------------------------- Ulysses x ring on one GPU

DEVICE = "cuda"  # the device the GPU cases run on


def gpu_ulysses_case(case):
    """One rank of a 2 x 2 Ulysses x ring mesh on cuda:0 (gloo groups): the all-to-alls and the
    ring's hops both go through host memory ("auto" transport); out and grads back on CPU."""
    from ringwise.attention.ulysses import mesh_groups

    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    ug, rg = mesh_groups(*case["mesh"])
    dt, layout = DTYPES[case["dtype"]], case["layout"]
    q, k, v, dout = make_inputs(case)

    def piece(x):
        return ringwise.shard(x, 1, layout, group=rg, ulysses_group=ug).to(DEVICE, dt)

    ql, kl, vl = (piece(x).requires_grad_() for x in (q, k, v))
    out = ringwise.ring_attention(
        ql, kl, vl, causal=case["causal"], layout=layout, group=rg, ulysses_group=ug, cu_seqlens=case.get("cu_seqlens")
    )
    out.backward(piece(dout))
    return dict(
        out=out.detach().cpu(),
        dq=ql.grad.cpu(),
        dk=kl.grad.cpu(),
        dv=vl.grad.cpu(),
        u=torch.distributed.get_rank(ug),
        r=torch.distributed.get_rank(rg),
    )


@gpu
@pytest.mark.parametrize("layout", ringwise.LAYOUTS)
def test_ulysses_ring_on_one_gpu_matches_float64(cluster, layout):
    """A 2 x 2 mesh (GQA 8:2, packed documents, bf16) on one GPU: error <= 2 x SDPA's own error."""
    from ringwise.attention.layout import global_indices

    case = dict(
        mesh=(2, 2),
        world=4,
        layout=layout,
        batch=1,
        heads=8,
        kv_heads=2,
        head_dim=64,
        seq=384,
        seed=21,
        dtype="bfloat16",
        causal=True,
        cu_seqlens=packed([1, 150, 33, 200]),
    )
    results = cluster(4).run(gpu_ulysses_case, case, timeout=120)
    q, k, v, dout = make_inputs(case)
    refs = float64_refs(case, q, k, v, dout)
    budget = sdpa_errors(case, q, k, v, dout, refs)
    for name in ("out", "dq", "dk", "dv"):
        got = torch.empty_like(refs[name], dtype=torch.float32)
        for res in results:
            got.index_copy_(1, global_indices(layout, res["r"], 2, case["seq"], res["u"], 2), res[name].float())
        e = max_err(got, refs[name])
        assert_within_budget(name, e, budget[name], EPS[case["dtype"]], ceiling=CEILINGS[case["dtype"]])


# ---------------------------------------------------------------- transformers in bf16 on a GPU


def _hf_model(attn):
    """A LLaMA-shaped test model with head_dim 64 (cuDNN's range), weights rounded to bf16."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_dropout=0.0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(torch.bfloat16)


def _hf_ids(seq):
    return torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(1))


def hf_ring_run(seq):
    """One rank: the bf16 model on cuda:0 through the ring (auto: host-staged); grads summed over ranks."""
    import torch.distributed as dist

    import ringwise.integrations.transformers as rw

    torch.cuda.set_device(0)
    rw.use_ring(layout="zigzag")
    model = _hf_model("ringwise").to("cuda")
    batch = {n: t.cuda() for n, t in rw.shard_batch(_hf_ids(seq)).items()}
    labels = batch.pop("labels")
    logits = model(**batch).logits
    rw.causal_lm_loss(logits, labels).backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    return dict(logits=logits.detach().float().cpu(), grads=grads)


def _hf_single(seq, dtype, device):
    """The one-process SDPA model on the whole sequence."""
    model = _hf_model("sdpa").to(device, dtype)
    ids = _hf_ids(seq).to(device)
    logits = model(input_ids=ids).logits
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100).backward()
    return dict(
        logits=logits.detach().double().cpu(), grads={n: p.grad.double().cpu() for n, p in model.named_parameters()}
    )


@gpu
def test_transformers_bf16_ring_on_one_gpu(cluster):
    pytest.importorskip("transformers")
    from ringwise.attention.layout import global_indices

    seq, W = 256, 2
    results = cluster(W).run(hf_ring_run, seq, timeout=120)
    ref, bf16 = _hf_single(seq, torch.float64, "cpu"), _hf_single(seq, torch.bfloat16, "cuda")
    logits = torch.empty_like(ref["logits"])
    for r, res in enumerate(results):
        logits[:, global_indices("zigzag", r, W, seq)] = res["logits"].double()
    assert_within_budget(
        "logits",
        max_err(logits, ref["logits"]),
        max_err(bf16["logits"], ref["logits"]),
        1e-3,
        ceiling=CEILINGS["bfloat16"],
    )
    for n, g in results[0]["grads"].items():
        assert_within_budget(
            n,
            max_err(g, ref["grads"][n]),
            max_err(bf16["grads"][n], ref["grads"][n]),
            1e-3,
            ceiling=CEILINGS["bfloat16"],
        )


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_on_a_gpu_matches_float64(dtype):
    """decode_attention's local path on CUDA (the exact float math; no fused kernel there yet), one
    process: windows over random positions, sinks, GQA, a fully masked new token; within 2x the CPU
    run's error of the same dtype (or that error's floor) against float64."""
    from test_decode import BASE, kwargs, make_case, visible

    case = dict(BASE, world=1, seed=3, tq=3, dtype=dtype, window=5, sinks=True, masked_row=True)
    dt = DTYPES[dtype]
    q, k, v, key_pos, query_pos, sinks = make_case(case)
    ref, _ = reference_attention(q, k, v, mask=visible(key_pos, query_pos, 5), sinks=sinks)
    cpu, _ = ringwise.decode_attention(q.to(dt), k.to(dt), v.to(dt), **kwargs(case, key_pos, query_pos, sinks, dt))
    on_gpu = [x.cuda() for x in (q.to(dt), k.to(dt), v.to(dt))]
    kw = kwargs(case, key_pos.cuda(), query_pos.cuda(), sinks.cuda(), dt)
    out, lse = ringwise.decode_attention(*on_gpu, **kw)
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert_within_budget("out", max_err(out.cpu(), ref), max_err(cpu, ref), EPS[dtype], ceiling=CEILINGS[dtype])


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_masked_tile_on_a_gpu_matches_float64(dtype):
    """A masked tile on CUDA (the efficient op with an additive bias; GQA 9:3, head_dim 128, odd
    sizes, rows that see no key): out, lse and gradients within 2x the CPU fused kernel's error of
    the same dtype against the float64 reference (or that error's floor); blind rows out 0, lse -inf."""
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 9, 37, 128, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 1, 3, 61, 128, generator=g, dtype=torch.float64)
    keep = torch.rand(37, 61, generator=g) < 0.4
    keep[[4, 30]] = False
    ref_out, ref_lse = ReferenceKernel().forward(q, k, v, False, 0.1, keep=keep)
    final = torch.logaddexp(ref_lse, torch.zeros_like(ref_lse))  # as another tile would leave it: finite
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    ref_grads = ReferenceKernel().backward(dout, q, k, v, ref_out, final, False, 0.1, keep=keep)

    def run(device):
        x = [t.to(device, dt) for t in (q, k, v, dout)]
        tile = MaskedTile(keep.to(device))
        out, lse = tile.forward(*x[:3], False, 0.1)
        grads = tile.backward(x[3], *x[:3], ref_out.to(device, dt), final.to(device, torch.float32), False, 0.1)
        return out.cpu(), lse.cpu(), [t.cpu() for t in grads]

    cpu_out, cpu_lse, cpu_grads = run("cpu")
    out, lse, grads = run("cuda")
    assert torch.isneginf(lse[:, :, [4, 30]]).all() and (out[:, :, [4, 30]] == 0).all()
    seen = torch.isfinite(ref_lse)
    assert torch.equal(seen, torch.isfinite(lse))
    assert_within_budget("out", max_err(out, ref_out), max_err(cpu_out, ref_out), EPS[dtype], ceiling=CEILINGS[dtype])
    lse_err, cpu_lse_err = max_err(lse[seen], ref_lse[seen]), max_err(cpu_lse[seen], ref_lse[seen])
    assert_within_budget("lse", lse_err, cpu_lse_err, EPS[dtype], ceiling=CEILINGS[dtype])
    for name, a, b, r in zip(("dq", "dk", "dv"), grads, cpu_grads, ref_grads):
        scale = max(1.0, r.abs().max().item())  # gradients are not of unit scale: budget and ceiling scale with them
        assert_within_budget(name, max_err(a, r), max_err(b, r), EPS[dtype] * scale, ceiling=CEILINGS[dtype] * scale)
