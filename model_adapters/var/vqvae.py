"""A re-implementation of VAR's multi-scale VQVAE (FoundationVision/VAR ``models/vqvae.py``, ``quant.py``,
``basic_vae.py``), inference path.

Module tree, names, shapes and ``state_dict()`` order equal the official ``VQVAE`` (the released
``vae_ch160v4096z32``: V 4096, Cvae 32, ch 160, share_quant_resi 4), and so do the attributes the VAR sampler
uses: ``Cvae``, ``vocab_size``, ``quantize.embedding``, ``quantize.quant_resi[si / (SN - 1)]``,
``quantize.v_patch_nums``, ``fhat_to_img``. The encoder (``img_to_idxBl``) is here so that real images can be
turned into teacher-forcing indices; it is not on the sampling path.

Kept as the official code has it because it decides results:
- Phi (``quant_resi``) mixes a code map with a 3x3 convolution of it: ``(1 - r) * h + r * conv(h)``, r = 0.5.
  ``share_quant_resi`` K such convolutions serve all scales; scale si uses the one whose tick, K values spread
  over [0, 1] (``1/(3K) .. 1 - 1/(3K)`` for K = 4, ``1/(2K) .. 1 - 1/(2K)`` otherwise), is nearest to
  si / (SN - 1), the first one on a tie. The ticks are computed in float64 as ``numpy.linspace`` computes
  them: with 10 scales, 2/9 and 7/9 lie exactly halfway between two ticks in exact arithmetic, and the
  rounding gives both to the later tick (Phi 1 and Phi 3).
- ``fhat_to_img`` is ``decoder(post_quant_conv(f_hat))`` clamped to [-1, 1].
Only the partially shared Phi (K >= 2) and nearest-neighbour search without normalisation (the released
VAE's ``using_znorm=False``) are implemented; training losses and statistics updates are not.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsurgeon.errors import ConfigError, InputError

from .config import PATCH_NUMS_256

CH_MULT = (1, 1, 2, 2, 4)
"""Channel multipliers of the released VAE (the latent-diffusion vq-f16 layout): downsampling x16."""
NUM_RES_BLOCKS = 2


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))  # pad right and bottom only


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H*W positions (1x1 convolutions for q, k, v and output)."""

    def __init__(self, channels: int):
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = int(channels) ** (-0.5)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        C = self.C
        q, k, v = qkv.reshape(B, 3, C, H, W).unbind(1)
        q = q.reshape(B, C, H * W).permute(0, 2, 1).contiguous()  # (B, HW, C)
        k = k.reshape(B, C, H * W).contiguous()  # (B, C, HW)
        weights = F.softmax(torch.bmm(q, k).mul(self.w_ratio), dim=2)  # (B, HW_q, HW_k)
        v = v.reshape(B, C, H * W).contiguous()
        h = torch.bmm(v, weights.permute(0, 2, 1).contiguous())  # (B, C, HW_q)
        return x + self.proj_out(h.view(B, C, H, W))


class Encoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, in_channels: int = 3, ch_mult: Sequence[int] = CH_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[level], ch * ch_mult[level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level == self.num_resolutions - 1:  # attention at the coarsest level only
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, z_channels: int, out_channels: int = 3, ch_mult: Sequence[int] = CH_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        ups = []  # built coarse to fine, registered fine to coarse (up.0 is the full resolution)
        for level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if level == self.num_resolutions - 1:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if level != 0:
                up.upsample = Upsample2x(block_in)
            ups.append(up)
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """The residual refiner of a code map: ``(1 - r) * h + r * conv3x3(h)``."""

    def __init__(self, Cvae: int, quant_resi: float):
        super().__init__(in_channels=Cvae, out_channels=Cvae, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul(self.resi_ratio)


def phi_ticks(K: int) -> list[float]:
    """The K positions in [0, 1] the Phi layers stand for, exactly as ``numpy.linspace`` gives them (float64)."""
    margin = 1 / 3 / K if K == 4 else 1 / 2 / K
    start, stop = margin, 1 - margin
    step = (stop - start) / (K - 1)
    ticks = [i * step + start for i in range(K)]
    ticks[-1] = stop
    return ticks


class PhiPartiallyShared(nn.Module):
    """K Phi layers shared by all scales; indexing with si / (SN - 1) picks the layer of the nearest tick."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def index_for(self, at_from_0_to_1: float) -> int:
        distances = [abs(tick - at_from_0_to_1) for tick in self.ticks]
        return distances.index(min(distances))  # the first on a tie, as numpy.argmin

    def __getitem__(self, at_from_0_to_1: float) -> Phi:
        return self.qresi_ls[self.index_for(at_from_0_to_1)]


class VectorQuantizer2(nn.Module):
    """The multi-scale residual quantizer: a codebook, the Phi layers and the per-scale search."""

    def __init__(self, vocab_size: int, Cvae: int, v_patch_nums: Sequence[int], quant_resi: float = 0.5,
                 share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.using_znorm = False
        self.v_patch_nums: tuple[int, ...] = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi
        self.quant_resi = PhiPartiallyShared(nn.ModuleList(Phi(Cvae, quant_resi) for _ in range(share_quant_resi)))
        # codebook usage statistics of training; kept because the released checkpoint holds them
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        """Quantize a latent (B, Cvae, H, W) scale by scale, coarse to fine, each scale the residual left by the
        previous ones. Returns per scale the indices (B, pn*pn), or with ``to_fhat`` the reconstruction so far."""
        B, C, H, W = f_BChw.shape
        SN = len(self.v_patch_nums)
        if self.v_patch_nums[-1] != H or H != W:
            raise InputError(f"latent is {H}x{W}; the VAE's last scale is {self.v_patch_nums[-1]}x{self.v_patch_nums[-1]} "
                             f"(images must be {2 ** (len(CH_MULT) - 1) * self.v_patch_nums[-1]} px square)")
        codebook = self.embedding.weight
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        for si, pn in enumerate(self.v_patch_nums):
            last = si == SN - 1
            rest = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
            dist = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
            dist = torch.addmm(dist, z_NC, codebook.T, beta=1, alpha=-2)  # squared L2 distance to every code
            idx_N = torch.argmin(dist, dim=1)
            h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            h = (h if last else F.interpolate(h, size=(H, W), mode="bicubic")).contiguous()
            h = self.quant_resi[si / (SN - 1)](h)
            f_hat = f_hat + h
            f_rest = f_rest - h
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, pn * pn))
        return out


class VQVAE(nn.Module):
    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, v_patch_nums: Sequence[int] = PATCH_NUMS_256):
        super().__init__()
        self.V = self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.encoder = Encoder(ch=ch, z_channels=z_channels)
        self.decoder = Decoder(ch=ch, z_channels=z_channels)
        self.downsample = 2 ** (len(CH_MULT) - 1)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, v_patch_nums, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, stride=1, padding=1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, kernel_size=3, stride=1, padding=1)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, P, P) accumulated codes -> (B, 3, 16P, 16P) image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def img_to_idxBl(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) image in [-1, 1] -> per scale the indices (B, pn*pn) (teacher-forcing input)."""
        return self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(img)), to_fhat=False)


def _check_vqvae_args(V: int, Cvae: int, ch: int, share_quant_resi: int, patch_nums: Sequence[int],
                      quant_resi: float) -> None:
    for name, value in (("V", V), ("Cvae", Cvae), ("ch", ch)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"VQVAE {name} must be a positive int, got {value!r}")
    if ch % 32:
        raise ConfigError(f"VQVAE ch must be a multiple of 32 (GroupNorm uses 32 groups), got {ch}")
    if not isinstance(share_quant_resi, int) or share_quant_resi < 2:
        raise ConfigError(f"share_quant_resi must be an int >= 2 (partially shared Phi; the released VAE uses 4), "
                          f"got {share_quant_resi!r}")
    if not 0 < quant_resi <= 1:
        raise ConfigError(f"quant_resi must be in (0, 1] (the released VAE uses 0.5), got {quant_resi!r}")
    pns = tuple(patch_nums)
    if len(pns) < 2 or pns[0] <= 0 or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ConfigError(f"patch_nums must be at least two positive, strictly increasing sizes, got {pns}")


def build_var_vqvae(device: Union[str, torch.device] = "cpu", seed: Optional[int] = None, V: int = 4096,
                    Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
                    patch_nums: Sequence[int] = PATCH_NUMS_256, quant_resi: float = 0.5) -> VQVAE:
    """Construct the VQVAE; the defaults are the released ``vae_ch160v4096z32``. ``patch_nums`` must be the
    VAR model's. ``device="meta"`` allocates nothing; with ``seed`` every parameter is drawn at random (see
    :func:`init_random_vqvae_weights`). A small ``ch`` (e.g. 32) gives a fast VAE for tests."""
    _check_vqvae_args(V, Cvae, ch, share_quant_resi, patch_nums, quant_resi)
    device = torch.device(device)
    if seed is not None and device.type == "meta":
        raise ConfigError("seed needs real storage: build on a real device, not 'meta'")
    with torch.device(device):
        vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, quant_resi=quant_resi, share_quant_resi=share_quant_resi,
                    v_patch_nums=patch_nums)
    if seed is not None:
        init_random_vqvae_weights(vae, seed)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def init_random_vqvae_weights(vae: VQVAE, seed: int) -> VQVAE:
    """Draw every parameter from a CPU generator seeded with ``seed``: convolutions with std 1/sqrt(fan_in),
    GroupNorm gains around 1, biases small but non-zero, codebook entries of unit variance."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in vae.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name == "quantize.embedding.weight":
            mean, std = 0.0, 1.0
        elif param.ndim >= 2:
            mean, std = 0.0, 1 / math.sqrt(param[0].numel())
        elif leaf == "weight":  # GroupNorm gain
            mean, std = 1.0, 0.1
        else:
            mean, std = 0.0, 0.05
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std + mean
        param.copy_(draw.to(device=param.device, dtype=param.dtype))
    return vae
