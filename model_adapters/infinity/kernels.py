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
    lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    key_len = int(max_seqlen_k)
    valid = torch.arange(key_len, device=q.device)[None, :] < lens[:, None]  # (B, Lk), packed order = row-major
    padded = kv.new_zeros(batch, key_len, 2, heads, head_dim, dtype=torch.float32)
    padded[valid] = kv.float()
    k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, Lk, c)
    mask = torch.zeros(batch, 1, 1, key_len, device=q.device).masked_fill(~valid[:, None, None, :], -torch.inf)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k, v, attn_mask=mask.expand(-1, -1, q_len, -1),
                                         scale=scale)
    return out.transpose(1, 2).to(q.dtype)


@packed_cross_attention.register_fake
def _(q, kv, cu_seqlens_k, max_seqlen_k, scale):
    return torch.empty_like(q)
