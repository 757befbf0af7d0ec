"""Quantised attention: ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``.

Both are written out as their projections and the two attention products (scores ``Q K^T``
and ``softmax(scores) V``), each a quantised site; softmax, masking and dropout stay FP32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from muppet_fx.ops import quant_linear, quant_matmul

__all__ = ["AttentionSites", "quant_mha", "quant_sdpa", "mha_unsupported_reason"]


class AttentionSites:
    """The sites of one attention block: ``prefix`` + role. Those every call uses are created
    here, with their weights for an ``nn.MultiheadAttention`` ``mha``: a site created on first
    use inside a ``torch.compile`` trace would change a guard and compile the graph again.
    ``self_attention``: whether ``mha`` is called with one tensor as query, key and value (the
    packed projection then runs as one product, :func:`quant_mha`)."""

    def __init__(self, state, prefix: str, op: str, mha: nn.MultiheadAttention | None = None,
                 self_attention: bool = True):
        self.state, self.prefix, self.op = state, prefix, op
        if mha is None:
            roles = {}
        elif mha._qkv_same_embed_dim and self_attention:
            roles = {"in_proj": mha.in_proj_weight}
        elif mha._qkv_same_embed_dim:  # row blocks of the packed weight: q_proj reports it whole
            roles = {"q_proj": mha.in_proj_weight, "k_proj": None, "v_proj": None}
        else:
            roles = {"q_proj": mha.q_proj_weight, "k_proj": mha.k_proj_weight, "v_proj": mha.v_proj_weight}
        roles.update(qk=None, av=None)
        if mha is not None:
            roles["out_proj"] = mha.out_proj.weight
        for role, weight in roles.items():
            self.state.site(f"{prefix}{role}", self._op(role), None, weight)

    def _op(self, role: str) -> str:
        return self.op if role in ("qk", "av") else "linear"

    def __getitem__(self, role: str):
        return self.state.site(f"{self.prefix}{role}", self._op(role))


def _merge_masks(attn_mask, key_padding_mask, is_causal, L, S, batch_heads, heads, device):
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        attn_mask = ~attn_mask  # True = masked, as nn.MultiheadAttention's bool masks
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, device=device).masked_fill(attn_mask, float("-inf"))
        mask = mask.reshape(-1, L, S) if mask.dim() == 3 else mask.reshape(1, L, S)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        kpm = torch.zeros(kpm.shape, device=device).masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else kpm
        kpm = kpm.reshape(-1, 1, 1, S).expand(-1, heads, 1, S).reshape(batch_heads, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def _attend(sites, q, k, v, mask, dropout_p, training):
    """q, k, v: (..., L|S, head_dim), q already scaled. Returns (out, weights)."""
    scores = quant_matmul(sites["qk"], q, k.transpose(-2, -1))
    empty = None
    if mask is not None:
        # rows with every key masked attend to nothing (zero weights), as in PyTorch's
        # scaled_dot_product_attention; softmax alone would make them NaN, and one NaN spreads
        # to the whole tensor through its shared exponent
        empty = (mask == float("-inf")).all(-1, keepdim=True)
        scores = scores + mask.masked_fill(empty, 0.0)
    weights = torch.softmax(scores, dim=-1)
    if empty is not None:
        weights = weights.masked_fill(empty, 0.0)
    if dropout_p > 0.0 and training:
        weights = F.dropout(weights, p=dropout_p)
    return quant_matmul(sites["av"], weights, v), weights


def mha_unsupported_reason(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not routed"
    return None


def quant_mha(sites: AttentionSites, module: nn.MultiheadAttention, query: Tensor, key: Tensor,
              value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
              attn_mask: Tensor | None = None, average_attn_weights: bool = True,
              is_causal: bool = False):
    """``nn.MultiheadAttention.forward`` with quantised projections and attention products."""
    if not sites.state.quantised or sites.state.suspended:
        return nn.MultiheadAttention.forward(module, query, key, value, key_padding_mask,
                                             need_weights, attn_mask, average_attn_weights, is_causal)
    m = module
    self_attention = query is key and key is value  # decide before any transpose
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif m.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    L, N, E = query.shape
    S, H = key.shape[0], m.num_heads
    hd = E // H
    b = m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if m._qkv_same_embed_dim and self_attention:
        q, k, v = quant_linear(sites["in_proj"], query, m.in_proj_weight, b).chunk(3, dim=-1)
    elif m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.chunk(3)
        q = quant_linear(sites["q_proj"], query, wq, bq)
        k = quant_linear(sites["k_proj"], key, wk, bk)
        v = quant_linear(sites["v_proj"], value, wv, bv)
    else:
        q = quant_linear(sites["q_proj"], query, m.q_proj_weight, bq)
        k = quant_linear(sites["k_proj"], key, m.k_proj_weight, bk)
        v = quant_linear(sites["v_proj"], value, m.v_proj_weight, bv)
    q = q.reshape(L, N * H, hd).transpose(0, 1) * (1.0 / math.sqrt(hd))
    k = k.reshape(S, N * H, hd).transpose(0, 1)
    v = v.reshape(S, N * H, hd).transpose(0, 1)
    mask = _merge_masks(attn_mask, key_padding_mask, is_causal and attn_mask is None, L, S, N * H, H, q.device)
    out, weights = _attend(sites, q, k, v, mask, m.dropout, m.training)
    out = out.transpose(0, 1).reshape(L * N, E)
    out = quant_linear(sites["out_proj"], out, m.out_proj.weight, m.out_proj.bias).reshape(L, N, E)
    if m.batch_first and not unbatched:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(N, H, L, S)
    weights = weights.mean(dim=1) if average_attn_weights else weights
    return out, (weights.squeeze(0) if unbatched else weights)


def quant_sdpa(sites: AttentionSites, query: Tensor, key: Tensor, value: Tensor,
               attn_mask: Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` with both products quantised."""
    if not sites.state.quantised or sites.state.suspended:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    mask = None
    if is_causal:
        mask = torch.zeros(L, S, device=query.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    if attn_mask is not None:
        extra = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
            attn_mask.shape, device=query.device).masked_fill(~attn_mask, float("-inf"))
        mask = extra if mask is None else mask + extra
    q = query * (scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    return _attend(sites, q, key, value, mask, dropout_p, True)[0]
