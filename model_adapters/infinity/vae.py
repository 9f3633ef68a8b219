"""Infinity's BSQ-VAE: the convolutional decoder that turns the sampler's summed codes into pixels.

Only what inference needs runs here: the decoder, and the encoder's convolutional trunk (image -> latent
features, before any quantization). The module tree and ``state_dict()`` keys, shapes and order equal the
official ``AutoEncoder`` built by its ``load_visual_tokenizer`` (``shared/reference/infinity_vae_*.tsv``), so
a released checkpoint loads strictly. Every convolution and group norm sits one level down (``.conv`` /
``.norm``), as in the official wrappers that also serve 3-D video layers; the quantizer contributes only its
integer bit weights, registered under both of the official names (``quantizer`` and its alias ``quantize``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Collection, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from graphsurgeon.checkpoint_io import (
    WRAPPER_KEYS,
    check_finite_tensors,
    check_keys_and_shapes,
    check_weights_file,
    match_dtypes,
)
from graphsurgeon.errors import CheckpointError, ConfigError, InputError

from .schedules import VAE_STRIDE
from .vae_config import (
    NAMED_VAE_CONFIGS,
    InfinityVaeConfig,
    group_norm_groups,
    resolve_vae_config,
)

GROUP_NORM_EPS = 1e-6
BIT_WEIGHT_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
"""The quantizer's bit weights ``2**(d-1) .. 2**0`` under both official names: constants, not learned."""


def _swish(x: torch.Tensor) -> torch.Tensor:
    # written out as the official does: F.silu may round differently in the last bit
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    """A 2-D convolution kept one level down (``.conv``) so the keys match the official checkpoints."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _GroupNorm(nn.Module):
    """The official group norm (32 groups, else 24; eps 1e-6), kept one level down (``.norm``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_norm_groups(channels), channels, eps=GROUP_NORM_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _ResnetBlock(nn.Module):
    """Pre-activation residual block; a 1x1 shortcut only where the width changes."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _GroupNorm(in_ch)
        self.conv1 = _Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = _GroupNorm(out_ch)
        self.conv2 = _Conv(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = _Conv(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class _Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one zero row/column at the bottom/right only (as trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels)
        self.block_2 = _ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class _Level(nn.Module):
    """One resolution level: residual blocks, then an optional resampling (``downsample`` or ``upsample``)."""

    def __init__(self, widths: list[tuple[int, int]], resample: Optional[tuple[str, nn.Module]]):
        super().__init__()
        self.block = nn.ModuleList(_ResnetBlock(i, o) for i, o in widths)
        self.resample_name = resample[0] if resample else None
        if resample:
            self.add_module(*resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class InfinityVaeEncoder(nn.Module):
    """Image in [-1, 1] (B, 3, H, W) -> latent features (B, codebook_dim, H/p, W/p), before quantization."""

    def __init__(self, config: InfinityVaeConfig):
        super().__init__()
        ch, mult = config.base_ch, (1, *config.ch_mult)
        self.conv_in = _Conv(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level in range(len(config.ch_mult)):
            widths = [(ch * (mult[level] if i == 0 else mult[level + 1]), ch * mult[level + 1])
                      for i in range(config.num_res_blocks)]
            resample = ("downsample", _Downsample(widths[-1][1])) if level < config.num_resamplings else None
            self.down.append(_Level(widths, resample))
        width = ch * config.ch_mult[-1]
        self.mid = _Middle(width)
        self.norm_out = _GroupNorm(width)
        self.conv_out = _Conv(width, config.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(_swish(self.norm_out(self.mid(h))))


class InfinityVaeDecoder(nn.Module):
    """Codes (B, codebook_dim, h, w) -> image (B, 3, h*p, w*p), unclamped. Levels are stored finest first
    (``up.0`` at full resolution) and run coarsest first; level ``i`` ends with a 2x upsampling when
    ``1 <= i <= log2(p)``."""

    def __init__(self, config: InfinityVaeConfig):
        super().__init__()
        ch, mult = config.base_ch, config.ch_mult
        width = ch * mult[-1]
        self.conv_in = _Conv(config.codebook_dim, width, 3, padding=1)
        self.mid = _Middle(width)
        levels: list[_Level] = []
        for level in reversed(range(len(mult))):
            out = ch * mult[level]
            widths = [(width if i == 0 else out, out) for i in range(config.num_res_blocks + 1)]
            resample = ("upsample", _Upsample(out)) if 1 <= level <= config.num_resamplings else None
            levels.insert(0, _Level(widths, resample))
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = _GroupNorm(width)
        self.conv_out = _Conv(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _BitWeights(nn.Module):
    """The official quantizer's ``mask``: weight ``2**(d-1-i)`` of bit ``i`` when bits are read as an integer
    label. Decoding works on summed codes and never reads it; it is kept for the checkpoint keys."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("mask", bit_weights(codebook_dim))


def bit_weights(codebook_dim: int) -> torch.Tensor:
    """``2 ** arange(d - 1, -1, -1)`` as int64, the value of the official ``quantizer.lfq.mask`` (for d = 64
    its first entry wraps to -2**63 as there; nothing reads it at inference)."""
    return 2 ** torch.arange(codebook_dim - 1, -1, -1)


class InfinityVAE(nn.Module):
    """The official ``AutoEncoder``'s tensors: encoder and decoder trunks, and the quantizer's bit weights."""

    def __init__(self, config: InfinityVaeConfig):
        super().__init__()
        self.config = config
        self.encoder = InfinityVaeEncoder(config)
        self.decoder = InfinityVaeDecoder(config)
        self.quantizer = nn.ModuleDict({"lfq": _BitWeights(config.codebook_dim)})
        self.quantize = self.quantizer  # the official alias: state_dict() lists the buffer under both names

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, codebook_dim, h, w) -> image (B, 3, h*p, w*p) clamped to [-1, 1], as the official
        ``AutoEncoder.decode``."""
        return self.decoder(z).clamp(-1, 1)


def build_infinity_vae(config: Union[str, dict, InfinityVaeConfig], device: Union[str, torch.device] = "cpu",
                       seed: Optional[int] = None) -> InfinityVAE:
    """Construct the VAE. ``device="meta"`` allocates nothing (structure, or loading with ``assign=True``).

    With ``seed`` every parameter is drawn from a CPU generator seeded with it, widths scaled so activations
    stay O(1) and no norm gain or bias is a neutral 1 or 0 (so a test cannot pass on a missing term).
    """
    config = resolve_vae_config(config)
    device = torch.device(device)
    if seed is not None and device.type == "meta":
        raise ConfigError("seed needs real storage: build the VAE on a real device, not 'meta'")
    with torch.device(device):
        vae = InfinityVAE(config)
    if seed is not None:
        _draw_random_weights(vae, seed)
    return vae.eval()


@torch.no_grad()
def _draw_random_weights(vae: InfinityVAE, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in vae.named_parameters():
        if param.ndim == 4:  # convolution kernels: unit gain over the fan-in
            mean, std = 0.0, param[0].numel() ** -0.5
        elif ".norm." in name and name.endswith("weight"):
            mean, std = 1.0, 0.1
        else:  # biases
            mean, std = 0.0, 0.05
        param.copy_((torch.randn(param.shape, generator=generator) * std + mean).to(param))


# ----------------------------------------------------------------------------------------------- checkpoints

_WRAPPED_LAYER_MARKERS = ("conv", ".q.", ".k.", ".v.", ".proj_out.", ".nin_shortcut.")
"""Substrings by which the official loader recognises a key of a layer its model wraps as ``.conv``."""


def _candidate_names(key: str) -> list[str]:
    """Names the official loader (``load_cnn``) tries for checkpoint ``key`` after ``key`` itself: a bare
    convolution or group-norm parameter (``x.weight``) becomes the wrapped one (``x.conv.weight`` or
    ``x.norm.weight``), so checkpoints saved from unwrapped layers load too."""
    for leaf in (".weight", ".bias"):
        if key.endswith(leaf):
            stem = key[: -len(leaf)]
            names = [stem + ".conv" + leaf] if any(m in key for m in _WRAPPED_LAYER_MARKERS) else []
            return names + ([stem + ".norm" + leaf] if "norm" in key else [])
    return []


def map_official_keys(state: Mapping[str, torch.Tensor], model_keys: Collection[str], source: str
                      ) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys to the model's as the official loader does. A key that maps nowhere is kept
    unchanged (the strict key check then names it); two keys landing on one parameter are refused."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        target = key
        if key not in model_keys:
            target = next((name for name in _candidate_names(key) if name in model_keys), key)
        if target in mapped:
            raise CheckpointError(f"checkpoint {source}: keys {origin[target]!r} and {key!r} both load into the "
                                  f"model's {target!r}")
        mapped[target], origin[target] = value, key
    return mapped


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The VAE's tensors inside a loaded checkpoint: the official training checkpoint nests them under
    ``vae`` (what ``load_visual_tokenizer`` reads, never ``ema``), other scripts under the usual wrappers."""
    for wrapper in ("vae", *WRAPPER_KEYS):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"checkpoint file {path} does not hold a VAE state_dict of tensors (looked at the "
                              f"top level and under {('vae', *WRAPPER_KEYS)})")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a VAE checkpoint file, memory-mapped (so reading shapes touches no weights)."""
    check_weights_file(path, "VAE checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # every reader raises its own type on a damaged or unsafe file
        raise CheckpointError(f"cannot read VAE checkpoint file {path}: {type(err).__name__}: {err}") from None
    return _unwrap(loaded, path)


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint, from the safetensors header or the memory-mapped pickle (no weights)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        check_weights_file(path, "VAE checkpoint")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as err:
            raise CheckpointError(f"cannot read VAE checkpoint file {path}: {type(err).__name__}: {err}") from None
    return {key: tuple(value.shape) for key, value in _read_tensors(path).items()}


def _shape_of(shapes: Mapping[str, tuple[int, ...]], key: str, path: Path) -> tuple[int, ...]:
    """Shape of the model's convolution weight ``key``, also under the bare name the official loader would map onto
    it; a tensor of another rank is refused naming it (its sizes would be read as the wrong ones)."""
    bare = re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", key)
    for name in (key, bare):
        if name in shapes:
            if len(shapes[name]) != 4:
                raise CheckpointError(f"VAE checkpoint {path}: {name} has shape {tuple(shapes[name])}; a convolution "
                                      "weight is 4-D (out, in, kh, kw): the file is damaged or not an Infinity BSQ-VAE")
            return shapes[name]
    raise CheckpointError(f"VAE checkpoint {path} has no {key!r} (nor {bare!r}); it is not an Infinity BSQ-VAE")


def _count_indices(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    found = {int(m.group(1)) for key in shapes if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]], path: Path) -> InfinityVaeConfig:
    base_ch = _shape_of(shapes, "encoder.conv_in.conv.weight", path)[0]
    levels = _count_indices(shapes, r"decoder\.up\.(\d+)\.")
    if levels == 0:
        raise CheckpointError(f"VAE checkpoint {path} has no decoder.up.* keys; it is not an Infinity BSQ-VAE")
    ch_mult = []
    for level in range(levels):
        width = _shape_of(shapes, f"decoder.up.{level}.block.0.conv1.conv.weight", path)[0]
        if width % base_ch:
            raise CheckpointError(f"VAE checkpoint {path}: decoder level {level} has width {width}, not a multiple "
                                  f"of the encoder's base width {base_ch}")
        ch_mult.append(width // base_ch)
    upsamplings = sum(any(k.startswith(f"decoder.up.{level}.upsample.") for k in shapes) for level in range(levels))
    fields = dict(codebook_dim=_shape_of(shapes, "decoder.conv_in.conv.weight", path)[1], patch_size=2 ** upsamplings,
                  ch_mult=tuple(ch_mult), base_ch=base_ch,
                  num_res_blocks=_count_indices(shapes, r"decoder\.up\.0\.block\.(\d+)\.") - 1)
    try:
        return resolve_vae_config(fields)
    except ConfigError as err:
        raise CheckpointError(f"VAE checkpoint {path} describes no valid VAE ({fields}): {err}") from None


def vae_config_from_checkpoint(path: Union[str, Path]) -> InfinityVaeConfig:
    """The VAE config a checkpoint was trained with, read from its key names and shapes only (a safetensors
    header, or a memory-mapped ``torch.load(weights_only=True)``), so a command line can refuse a VAE that does
    not fit the transformer before it loads any weights."""
    path = Path(path)
    return _config_from_shapes(_read_shapes(path), path)


def vae_codebook_dim(path: Union[str, Path]) -> int:
    """Bits per latent position of a VAE checkpoint (input channels of its decoder), from metadata only."""
    path = Path(path)
    return _shape_of(_read_shapes(path), "decoder.conv_in.conv.weight", path)[1]


def _check_bit_weights(state: dict[str, torch.Tensor], config: InfinityVaeConfig, path: Path) -> None:
    """Refuse stored bit weights other than their only valid value (shapes are checked before)."""
    expected = bit_weights(config.codebook_dim)
    for key in BIT_WEIGHT_KEYS:
        if state[key].is_floating_point() or not torch.equal(state[key].to(torch.int64), expected):
            raise CheckpointError(f"VAE checkpoint {path}: {key} is not the bit weights 2**{config.codebook_dim - 1}"
                                  f" .. 1 of a {config.codebook_dim}-bit codebook; the file is damaged or not "
                                  "an Infinity BSQ-VAE")
        state[key] = expected.clone()


def load_infinity_vae(path: Union[str, Path], config: Union[str, dict, InfinityVaeConfig, None] = None,
                      device: Union[str, torch.device] = "cpu", check_finite: bool = True) -> InfinityVAE:
    """Load an Infinity VAE checkpoint (the official ``.pth``, a plain ``state_dict`` file or ``.safetensors``)
    without unpickling code.

    Keys are renamed as the official loader does (bare ``x.weight`` of a convolution or group norm ->
    ``x.conv.weight`` / ``x.norm.weight``). Unlike it, loading is strict: a missing, unexpected or misshapen
    tensor is an error naming the key and the file, where the official code would keep a random init or skip
    the tensor silently. The bit weights (a constant) are checked and may be absent. ``config=None`` reads the
    config from the checkpoint's shapes; a given config must match it. ``check_finite`` refuses NaN/Inf
    weights naming them; floating tensors stored in another precision are cast to float32.
    """
    path = Path(path)
    state = _read_tensors(path)
    if config is None:
        config = _config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, path)
    config = resolve_vae_config(config)
    vae = build_infinity_vae(config, device="meta")
    expected = vae.state_dict()
    state = map_official_keys(state, expected.keys(), str(path))
    for key in BIT_WEIGHT_KEYS:  # a constant: the official loader keeps the model's own where a checkpoint lacks it
        state.setdefault(key, bit_weights(config.codebook_dim))

    def describe_checkpoint() -> Optional[str]:
        try:
            found = _config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, path)
        except CheckpointError:
            return None
        names = [name for name, fields in NAMED_VAE_CONFIGS.items() if resolve_vae_config(fields) == found]
        return f"its shapes describe the named config {names[0]!r}" if names else f"its shapes describe {found!r}"

    check_keys_and_shapes(expected, state, str(path), what=f"the VAE config {config!r}", hint=describe_checkpoint)
    _check_bit_weights(state, config, path)
    if check_finite:
        check_finite_tensors(state, path)
    vae.load_state_dict(match_dtypes(expected, state, dict.fromkeys(state, path)), strict=True, assign=True)
    return vae.to(torch.device(device)).eval()


# ----------------------------------------------------------------------------------------------- fit and decode

def check_vae_fits(vae_or_config: Union[InfinityVAE, str, dict, InfinityVaeConfig], codebook_dim: int,
                   patchify: bool) -> None:
    """Raise :class:`ConfigError` unless the VAE decodes what a transformer with ``codebook_dim`` bits per VAE
    position (``InfinityConfig.codebook_dim``) and the given 2x2 spatial patchify samples.

    Besides the bits, the pixels per transformer token must be the schedules' 16: the official loader pairs
    patchify with the patch-8 VAE and no patchify with the patch-16 one.
    """
    config = vae_or_config.config if isinstance(vae_or_config, InfinityVAE) else resolve_vae_config(vae_or_config)
    problems = []
    if config.codebook_dim != codebook_dim:
        problems.append(f"the VAE decodes codebook_dim {config.codebook_dim} bits per position, the transformer "
                        f"samples codebook_dim {codebook_dim}")
    per_token = config.patch_size * (2 if patchify else 1)
    if per_token != VAE_STRIDE:
        problems.append(f"the VAE's patch_size {config.patch_size} {'with' if patchify else 'without'} the "
                        f"transformer's 2x2 spatial patchify gives {per_token} px per token, the scale schedules "
                        f"assume {VAE_STRIDE} (patchify pairs with patch_size {VAE_STRIDE // 2}, no patchify "
                        f"with {VAE_STRIDE})")
    if problems:
        raise ConfigError("the VAE does not fit the transformer: " + "; ".join(problems))


def _decoder_input(config: InfinityVaeConfig, summed_codes: torch.Tensor) -> torch.Tensor:
    """(B, d, 1, H, W) -> (B, d, H, W); token-space codes of a patchify transformer (B, 4d, 1, H/2, W/2) are
    first put back on the VAE grid by the 2x2 pixel shuffle (the inverse of the official pixel_unshuffle)."""
    d = config.codebook_dim
    shuffle = config.patch_size * 2 == VAE_STRIDE
    if not isinstance(summed_codes, torch.Tensor) or not summed_codes.is_floating_point():
        raise InputError(f"summed_codes must be a floating point tensor, got {type(summed_codes).__name__}"
                         f"{' of ' + str(summed_codes.dtype) if isinstance(summed_codes, torch.Tensor) else ''}")
    channels = (d, 4 * d) if shuffle else (d,)
    if summed_codes.ndim != 5 or summed_codes.shape[2] != 1 or summed_codes.shape[1] not in channels \
            or summed_codes.numel() == 0:
        raise InputError(f"summed_codes must be (B, {' or '.join(map(str, channels))}, 1, H, W) for this VAE "
                         f"(codebook_dim {d}), got {tuple(summed_codes.shape)}")
    if not bool(torch.isfinite(summed_codes).all()):
        raise InputError("summed_codes holds NaN/Inf values")
    z = summed_codes.squeeze(2)
    return F.pixel_shuffle(z, 2) if z.shape[1] == 4 * d else z


@torch.no_grad()
def decode_to_images(vae: InfinityVAE, summed_codes: torch.Tensor) -> torch.Tensor:
    """Decode the sampler's summed codes (B, d, 1, H', W') to uint8 RGB images (B, H'*p, W'*p, 3) on the VAE's
    device, exactly as the official inference: decode, clamp to [-1, 1], ``(x + 1) / 2``, ``* 255``, then
    ``.to(uint8)`` (truncation, not rounding).

    The official code then flips the channels to BGR only because it saves with ``cv2.imwrite``, which
    expects BGR; these RGB arrays saved as PNG by Pillow hold the same pixels as its files. The official runs
    this under CUDA bfloat16 autocast, where the convolutions and the mapping compute in bfloat16: to get its
    GPU pixels, call this inside ``torch.autocast("cuda", torch.bfloat16)``; the mapping follows the decoder's
    output dtype either way. For the 8B VAE, pass the codes on the VAE grid (``(B, 14, 1, 2h, 2w)``, as the
    official sampler accumulates them after pixel-shuffling each scale's bits), or the token grid
    ``(B, 56, 1, h, w)``, which is pixel-shuffled back first.
    """
    z = _decoder_input(vae.config, summed_codes)
    weight = vae.decoder.conv_in.conv.weight
    image = vae.decode(z.to(device=weight.device, dtype=weight.dtype))
    if not bool(torch.isfinite(image).all()):
        raise FloatingPointError("the VAE decoded NaN/Inf values (weights, or an overflow in reduced precision)")
    return ((image + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)
