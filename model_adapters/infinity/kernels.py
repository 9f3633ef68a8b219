"""Attention kernels for the Infinity reference model.

Cross-attention to text uses packed variable-length key/values (one text sequence per batch row). The
official model calls flash-attn for this; here it is a ``torch.library`` custom op so that it stays one
opaque node in captured graphs, with flash-attn used only when it is installed and the tensors are on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional fast path; never required
    from flash_attn import flash_attn_varlen_kvpacked_func as _flash_varlen_kvpacked
except ImportError:  # pragma: no cover - depends on the environment
    _flash_varlen_kvpacked = None


@torch.library.custom_op("graphsurgeon_infinity::packed_cross_attention", mutates_args=())
def packed_cross_attention(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int,
                           scale: float) -> torch.Tensor:
    """Attention of each batch row's queries to its own packed text.

    q: (B, Lq, H, c); kv: (N, 2, H, c) with rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` belonging to row b.
    Returns (B, Lq, H, c) in q's dtype. Softmax and products run in float32 whatever the input dtype,
    as flash-attn does internally, and the result is rounded to q's dtype once. Without flash-attn the
    texts are padded to ``max_seqlen_k`` and masked; this formulation is the one that reproduces the golden
    case to ~2e-5 (a per-prompt loop lands at ~2e-4, see docs/infinity.md).
    """
    batch, q_len, heads, head_dim = q.shape
    if _flash_varlen_kvpacked is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu_seqlens_q = torch.arange(0, q_len * (batch + 1), q_len, dtype=torch.int32, device=q.device)
        out = _flash_varlen_kvpacked(q.reshape(-1, heads, head_dim), kv, cu_seqlens_q, cu_seqlens_k.to(torch.int32),
                                     q_len, max_seqlen_k, dropout_p=0.0, softmax_scale=scale)
        return out.reshape(batch, q_len, heads, head_dim)
    return packed_cross_attention_reference(q, kv, cu_seqlens_k, max_seqlen_k, scale)


@packed_cross_attention.register_fake
def _(q, kv, cu_seqlens_k, max_seqlen_k, scale):
    return torch.empty_like(q)


def packed_cross_attention_reference(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int,
                                     scale: float) -> torch.Tensor:
    """The op in plain torch ops (static shapes, so it exports): pad each prompt's text to ``max_seqlen_k`` by a
    gather, mask the padding with -inf, float32 SDPA, round to q's dtype. Padded keys get exactly zero weight."""
    batch, q_len, heads, head_dim = q.shape
    positions = torch.arange(int(max_seqlen_k), device=q.device)
    starts, lens = cu_seqlens_k[:-1].long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    rows = (starts[:, None] + positions[None, :]).clamp(max=kv.shape[0] - 1)  # (B, Lk)
    padded = kv.float()[rows]  # (B, Lk, 2, H, c)
    k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)
    mask = torch.zeros(batch, 1, 1, int(max_seqlen_k), device=q.device).masked_fill(
        (positions[None, :] >= lens[:, None])[:, None, None, :], -torch.inf)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k, v, attn_mask=mask.expand(-1, -1, q_len, -1),
                                         scale=scale)
    return out.transpose(1, 2).to(q.dtype)
