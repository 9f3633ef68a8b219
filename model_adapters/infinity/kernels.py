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
    as flash-attn does internally, and the result is rounded to q's dtype once.
    """
    batch, q_len, heads, head_dim = q.shape
    if _flash_varlen_kvpacked is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu_seqlens_q = torch.arange(0, q_len * (batch + 1), q_len, dtype=torch.int32, device=q.device)
        out = _flash_varlen_kvpacked(q.reshape(-1, heads, head_dim), kv, cu_seqlens_q, cu_seqlens_k.to(torch.int32),
                                     q_len, max_seqlen_k, dropout_p=0.0, softmax_scale=scale)
        return out.reshape(batch, q_len, heads, head_dim)
    out = torch.empty_like(q)
    bounds = cu_seqlens_k.tolist()
    for row in range(batch):
        k_row = kv[bounds[row]:bounds[row + 1], 0].transpose(0, 1).float()  # (H, Lk, c)
        v_row = kv[bounds[row]:bounds[row + 1], 1].transpose(0, 1).float()
        q_row = q[row].transpose(0, 1).float()  # (H, Lq, c)
        out[row] = F.scaled_dot_product_attention(q_row, k_row, v_row, scale=scale).transpose(0, 1).to(q.dtype)
    return out


@packed_cross_attention.register_fake
def _(q, kv, cu_seqlens_k, max_seqlen_k, scale):
    return torch.empty_like(q)
