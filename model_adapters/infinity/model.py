"""A re-implementation of the Infinity transformer (FoundationVision/Infinity, inference path).

Written from the official behaviour, not copied: the module tree, parameter names, shapes and
``state_dict()`` order equal the official ``infinity.models.infinity.Infinity`` built with its inference
arguments, and the methods the sampler calls (``add_lvl_embeding``, the blocks' call signature,
``get_logits``, ``rope2d_freqs_grid``, ``sa.kv_caching``) behave the same, so one sampler drives either
class. Dropout and drop-path children exist (as identities) only so that the module tree matches.
Numerics that matter: adaptive LayerNorm and the head run in float32 with autocast off, RoPE runs with
autocast off, and cross-attention to text rounds q/k/v to bfloat16 before the kernel (as flash-attn
requires) and rounds its output to bfloat16.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import InfinityConfig
from .kernels import packed_cross_attention
from .rope import RopeTable, apply_rope2d

TextKV = tuple  # (kv_compact (N, C), cu_seqlens_k int32 (B+1,), max_seqlen_k int)
_MAX_LOG_SCALE = float(torch.tensor(100.0).log())


def ada_layer_norm(C: int, eps: float, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, in float32, modulated by ``(1 + scale)`` and ``shift``."""
    x = F.layer_norm(x.float(), (C,), weight=None, bias=None, eps=eps)
    return x.mul(scale.add(1)).add_(shift)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))) * weight


class FastRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back to the input dtype."""

    def __init__(self, C: int, eps: float = 1e-6):
        super().__init__()
        self.C, self.eps = C, eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight, self.eps).to(x.dtype)


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Cosine self-attention with RoPE-2D and a KV cache that grows across scales while caching is on.

    The cache lives in ``cached_k`` / ``cached_v`` (B, H, L, c), concatenated on the length axis; no mask
    is used at inference: a scale's tokens see every earlier scale and themselves.
    """

    def __init__(self, embed_dim: int, num_heads: int, pad_to_multiplier: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = _MAX_LOG_SCALE
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.pad_to_multiplier = pad_to_multiplier
        self.caching = False
        self.cached_k: Optional[torch.Tensor] = None
        self.cached_v: Optional[torch.Tensor] = None

    def kv_caching(self, enable: bool) -> None:
        """Turn caching on or off; either way the cache is emptied."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x, attn_bias_or_two_vector=None, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None,
                scale_ind: int = 0):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias=bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each (B, H, L, c)
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul).contiguous()
        k = F.normalize(k, dim=-1, eps=1e-12).contiguous()
        v = v.contiguous()
        if rope2d_freqs_grid is not None:
            key = str(tuple(scale_schedule))
            rope2d_freqs_grid[key] = rope2d_freqs_grid[key].to(q.device)
            start = sum(t * h * w for t, h, w in scale_schedule[:scale_ind])
            q, k = apply_rope2d(q, k, rope2d_freqs_grid[key], start)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias_or_two_vector, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Attention from image tokens (or one learned query, ``for_attn_pool``) to packed text features."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.for_attn_pool = for_attn_pool
        self.embed_dim, self.kv_dim = embed_dim, kv_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale = 1 / math.sqrt(self.head_dim)
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim).normal_(0, math.sqrt(1 / embed_dim / 3)))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Identity()
        self.round_to_bf16 = True  # the official kernel's precision; see set_text_attention_bf16

    def forward(self, q: Optional[torch.Tensor], ca_kv: TextKV) -> torch.Tensor:
        kv_compact, cu_seqlens_k, max_seqlen_k = ca_kv
        N = kv_compact.shape[0]
        kv = F.linear(kv_compact, self.mat_kv.weight, bias=torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(N, 2, self.num_heads, self.head_dim)
        if self.for_attn_pool:
            B, Lq = cu_seqlens_k.shape[0] - 1, 1
            q = self.mat_q.repeat(B, 1, 1).to(dtype=kv.dtype)
        else:
            B, Lq = q.shape[:2]
            q = self.mat_q(q)
        q = q.reshape(B, Lq, self.num_heads, self.head_dim)
        if q.dtype == torch.float32 and self.round_to_bf16:  # flash-attn takes half precision: round to bf16
            out = packed_cross_attention(q.to(torch.bfloat16), kv.to(torch.bfloat16), cu_seqlens_k, int(max_seqlen_k),
                                         self.scale).float()
        else:
            out = packed_cross_attention(q, kv, cu_seqlens_k, int(max_seqlen_k), self.scale)
        return self.proj(out.reshape(B, Lq, -1))


class TextAttentivePool(nn.Module):
    """Pools the text sequence into one vector (the SOS token and the AdaLN condition)."""

    def __init__(self, Ct5: int, D: int):
        super().__init__()
        self.Ct5, self.D = Ct5, D
        self.head_dim = 64 if D > 4096 else 128
        self.num_heads = Ct5 // self.head_dim
        self.ca = CrossAttention(embed_dim=D, kv_dim=Ct5, num_heads=self.num_heads, for_attn_pool=True)

    def forward(self, ca_kv: TextKV) -> torch.Tensor:
        return self.ca(None, ca_kv).squeeze(1)


class SharedAdaLin(nn.Linear):
    """The AdaLN projection shared by all blocks: (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).reshape(-1, 1, 6, C)


class CrossAttnBlock(nn.Module):
    """Self-attention, cross-attention to text and FFN, each pre-normed; AdaLN gates from ``ada_gss + cond``."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.D = C, C
        self.drop_path = nn.Identity()
        self.sa = SelfAttention(C, cfg.num_heads, cfg.pad_to_multiplier)
        self.ca = CrossAttention(embed_dim=C, kv_dim=C, num_heads=cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.fused_norm_func = ada_layer_norm
        self.norm_eps = cfg.norm_eps
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=True)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        if cfg.cross_attn_layer_scale >= 0:
            self.ca_gamma = nn.Parameter(torch.full((C,), cfg.cross_attn_layer_scale))
        else:
            self.ca_gamma = 1

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector=None, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind: int = 0):
        with torch.autocast("cuda", enabled=False):
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        h = self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale1, shift=shift1)
        h = self.sa(h, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind=scale_ind)
        x = x + h.mul(gamma1)
        x = x + self.ca(self.ca_norm(x), ca_kv).float().mul(self.ca_gamma)
        h = self.ffn(self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x, scale=scale2, shift=shift2))
        return x + h.mul(gamma2)


class MultipleLayers(nn.Module):
    """A chunk of consecutive blocks (registered as ``block_chunks.{c}.module.{j}``)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)

    def forward(self, x, cond_BD, ca_kv, attn_bias_or_two_vector=None, attn_fn=None, scale_schedule=None,
                rope2d_freqs_grid=None, scale_ind: int = 0):
        for block in self.module:
            x = block(x, cond_BD, ca_kv, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid,
                      scale_ind=scale_ind)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C, self.D, self.norm_eps = C, D, eps
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.fused_norm_func = ada_layer_norm
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.fused_norm_func(C=self.C, eps=self.norm_eps, x=x_BLC, scale=scale, shift=shift)


class Infinity(nn.Module):
    """The Infinity text-to-image transformer. Sampling lives in the adapter (``generate``), not here."""

    def __init__(self, config: InfinityConfig):
        super().__init__()
        cfg = self.config = config
        self.C = self.D = cfg.embed_dim
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.Ct5, self.text_maxlen, self.norm_eps = cfg.text_channels, cfg.text_maxlen, cfg.norm_eps
        self.apply_spatial_patchify = cfg.apply_spatial_patchify
        self.d_vae = self.codebook_dim = cfg.d_vae
        self.V = cfg.vocab_size
        self.pad_to_multiplier = cfg.pad_to_multiplier
        self.add_lvl_embeding_only_first_block = cfg.add_lvl_embeding_only_first_block

        self.norm0_cond = nn.Identity()
        self.cfg_uncond = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels).normal_(0, 1.2 / cfg.text_channels**0.5))
        self.text_norm = FastRMSNorm(cfg.text_channels, eps=cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg.text_channels, self.D)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(cfg.text_channels, self.D), nn.GELU(approximate="tanh"), nn.Linear(self.D, self.D)
        )
        init_std = math.sqrt(1 / self.C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, 1, self.C).normal_(0, init_std))
        self.rope2d_freqs_grid = RopeTable(cfg.head_dim, cfg.pad_to_multiplier)
        self.lvl_embed = nn.Embedding(15, self.C)
        self.norm0_ve = nn.Identity()
        self.word_embed = nn.Linear(self.d_vae, self.C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
        self.unregistered_blocks = [CrossAttnBlock(cfg) for _ in range(cfg.depth)]
        self.head_nm = AdaLNBeforeHead(self.C, self.D, cfg.norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.num_block_chunks = cfg.block_chunks
        self.num_blocks_in_a_chunk = cfg.depth // cfg.block_chunks
        if self.num_block_chunks == 1:
            self.blocks = nn.ModuleList(self.unregistered_blocks)
        else:
            n = self.num_blocks_in_a_chunk
            self.block_chunks = nn.ModuleList(
                MultipleLayers(self.unregistered_blocks[i * n:(i + 1) * n]) for i in range(self.num_block_chunks)
            )

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, L, C) hidden states -> (B, L, V) logits, in float32 with autocast off."""
        with torch.autocast("cuda", enabled=False):
            return self.head(self.head_nm(h.float(), cond_BD.float()))

    def add_lvl_embeding(self, feature: torch.Tensor, scale_ind: int, scale_schedule, need_to_pad: int = 0) -> torch.Tensor:
        """Add the scale-level embedding of ``scale_ind`` to the scale's tokens (in place, as the official)."""
        t, h, w = scale_schedule[scale_ind]
        if feature.shape[1] != t * h * w + need_to_pad:
            raise ValueError(f"scale {scale_ind} has {t * h * w} tokens but the input has {feature.shape[1]}")
        feature[:, :t * h * w] += self.lvl_embed.weight[scale_ind]
        return feature


def set_text_attention_bf16(model: nn.Module, enabled: bool) -> None:
    """Switch the bf16 rounding of text cross-attention (on by default, as the official code).

    The rounding turns float32 noise of ~1e-7 (e.g. from a different GEMM batch size) into ~1e-4 logit
    differences. Tests that compare two float32 computations for batch or graph equivalence turn it off so
    that a semantic difference is not hidden in that noise.
    """
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.round_to_bf16 = enabled
