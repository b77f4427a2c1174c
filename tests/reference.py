"""The oracle: float64 softmax attention on the whole, unsharded sequence."""
import torch


def reference_attention(q, k, v, causal=False, scale=None, mask=None):
    """q (b, s, h, d), k/v (b, s, hk, d); float64; mask: bool (s_q, s_k), True = visible."""
    q, k, v = (x.double() for x in (q, k, v))
    h, hk = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(h // hk, 2), v.repeat_interleave(h // hk, 2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    visible = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        visible = visible.tril()
    if mask is not None:
        visible = visible & mask
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()
