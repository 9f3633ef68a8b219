"""A re-implementation of the VAR transformer (FoundationVision/VAR, class-conditional, inference path).

Written from the official behaviour, not copied. The module tree, parameter and buffer names, shapes and
``state_dict()`` order equal the official ``models.var.VAR``, and so do the attributes and methods a sampler
uses (``class_emb``, ``pos_start``, ``pos_1LC``, ``lvl_embed``, ``lvl_1L``, ``word_embed``, ``shared_ada_lin``,
``blocks[i](x=, cond_BD=, attn_bias=)``, ``blocks[i].attn.kv_caching`` with ``cached_k`` / ``cached_v``,
``get_logits``, ``first_l``, ``num_stages_minus_1``, ...), so one sampler drives either class.

Differences that do not change inference results: attention always goes through
``torch.nn.functional.scaled_dot_product_attention`` (the official fallback when flash-attn and xformers are
absent), drop-path and dropout children are identities (inference has them off), and element-wise updates the
official code does in place are written out of place (same values, bit for bit). The VQVAE is not a child
of the model (the official keeps it in unregistered tuples); the sampler takes it as a separate argument.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VARConfig

_MAX_LOG_SCALE = float(torch.log(torch.tensor(100)))  # the cap of the cosine-attention scale, float32 as the official


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)
        self.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with the official KV cache.

    While ``caching`` is on, each call appends its keys and values to ``cached_k`` / ``cached_v`` (B, H, L, c)
    and attends over everything cached so far: at inference a scale sees all earlier scales and itself, so
    no mask is needed (``attn_bias`` is None).
    """

    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = _MAX_LOG_SCALE
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.proj_drop = nn.Identity()
        self.caching = False
        self.cached_k: Optional[torch.Tensor] = None
        self.cached_v: Optional[torch.Tensor] = None

    def kv_caching(self, enable: bool) -> None:
        """Turn caching on or off; either way the cache is emptied."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias=bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each (B, H, L, c), views as the official passes them
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is None:
                self.cached_k, self.cached_v = k, v
            else:
                k = self.cached_k = torch.cat((self.cached_k, k), dim=2)
                v = self.cached_v = torch.cat((self.cached_v, v), dim=2)
        out = F.scaled_dot_product_attention(query=q, key=k, value=v, scale=self.scale, attn_mask=attn_bias,
                                             dropout_p=0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNSelfAttn(nn.Module):
    """One transformer block: self-attention and FFN, each after an adaptive LayerNorm, each gated.

    The six modulation vectors (gamma1, gamma2, scale1, scale2, shift1, shift2) come from the block's own
    ``ada_lin(cond_BD)``, or, with shared AdaLN, from ``ada_gss + cond_BD`` where ``cond_BD`` already is the
    shared projection (B, 1, 6, C).
    """

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.D = C, C
        self.shared_aln = cfg.shared_aln
        self.drop_path = nn.Identity()
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add(shift1), attn_bias=attn_bias)
        x = x + h.mul(gamma1)
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add(shift2))
        return x + h.mul(gamma2)


class AdaLNBeforeHead(nn.Module):
    """The adaptive LayerNorm before the classifier head (scale and shift from the class condition)."""

    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add(shift)


class SharedAdaLin(nn.Linear):
    """The AdaLN projection shared by all blocks: (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class VAR(nn.Module):
    """The VAR class-conditional transformer. Sampling lives in :mod:`.sampler`, not here."""

    def __init__(self, config: VARConfig):
        super().__init__()
        cfg = self.config = config
        C = cfg.embed_dim
        self.C = self.D = C
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.Cvae, self.V = cfg.Cvae, cfg.vocab_size
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.patch_nums: tuple[int, ...] = tuple(cfg.patch_nums)
        self.L = cfg.num_tokens
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        start = 0
        for pn in self.patch_nums:
            self.begin_ends.append((start, start + pn * pn))
            start += pn * pn
        self.num_stages_minus_1 = len(self.patch_nums) - 1

        # state_dict order follows from this: own parameters (pos_start, pos_1LC), own buffers (lvl_1L,
        # attn_bias_for_masking), then the children in the order they are assigned here, as the official
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C).normal_(0, init_std))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C).normal_(0, init_std))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg) for _ in range(cfg.depth))

        # level of each token, and the block-causal mask the official training uses (inference uses the KV
        # cache and no mask; the buffers are kept because the released checkpoints hold them)
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        level_T = level.transpose(1, 2)
        self.register_buffer("lvl_1L", level_T[:, 0].contiguous())
        mask = torch.where(level >= level_T, 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())

        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

    @property
    def uniform_prob(self) -> torch.Tensor:
        """(1, num_classes) float32 uniform distribution the random labels are drawn from, on the model's device.

        The official class stores it as a plain tensor (not a buffer) on its default device; computing it here
        gives the same values and follows the model when it is moved.
        """
        return torch.full((1, self.num_classes), fill_value=1.0 / self.num_classes, dtype=torch.float32,
                          device=self.lvl_1L.device)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, L, C) hidden states -> (B, L, V) float32 logits."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()
