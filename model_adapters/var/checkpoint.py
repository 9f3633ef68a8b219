"""Load VAR and VQVAE checkpoints without unpickling code.

The released files (``var_d16.pth`` ... ``var_d36.pth``, ``vae_ch160v4096z32.pth``) are plain state_dicts and
load with ``weights_only=True``; ``.safetensors`` files and sharded folders load too (rules in
:mod:`graphsurgeon.checkpoint_io`). The key set and every shape must equal the model's; a mismatch is a
:class:`CheckpointError` naming the keys, and for a transformer it says which named config fits the file.
NaN/Inf weights are refused at load (``check_finite``; the training mask's -inf excepted); floating tensors stored
in another precision are cast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from graphsurgeon.checkpoint_io import check_keys_and_shapes, match_dtypes, read_checkpoint, read_shapes

from .builder import build_var
from .config import NAMED_CONFIGS, PATCH_NUMS_256, VARConfig, resolve_var_config
from .model import VAR
from .vqvae import VQVAE, build_var_vqvae

EMA_KEY = "quantize.ema_vocab_hit_SV"
MASK_KEYS = ("attn_bias_for_masking",)
"""The block-causal training mask: 0 and -inf by design (NaN and +inf are still refused)."""


def _named_config_fitting(state: dict[str, torch.Tensor]) -> Optional[str]:
    """A sentence naming the named config whose structure matches ``state``, if any (for error messages)."""
    for name in NAMED_CONFIGS:
        reference = build_var(name, device="meta").state_dict()
        if reference.keys() == state.keys() and all(reference[k].shape == state[k].shape for k in state):
            return f"this checkpoint matches the named config {name!r}"
    return None


def check_var_fits(path: Union[str, Path], config: Union[str, dict, VARConfig]) -> None:
    """Refuse a transformer checkpoint whose keys or shapes do not fit ``config``, from its headers only."""
    state = read_shapes(path)
    check_keys_and_shapes(build_var(resolve_var_config(config), device="meta").state_dict(), state, str(path),
                          "the VAR config", hint=lambda: _named_config_fitting(state))


def check_vqvae_fits(path: Union[str, Path], V: int = 4096, Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4,
                     patch_nums: Sequence[int] = PATCH_NUMS_256) -> None:
    """Refuse a VQVAE checkpoint :func:`load_var_vqvae` would refuse for these arguments (format, keys, shapes),
    from its headers only, so a command line fails before it builds anything."""
    _check_vqvae_state(read_shapes(path), path, V, Cvae, ch, share_quant_resi, patch_nums)


def _check_vqvae_state(state: dict[str, torch.Tensor], path: Union[str, Path], V: int, Cvae: int, ch: int,
                       share_quant_resi: int, patch_nums: Sequence[int]) -> tuple[VQVAE, dict[str, torch.Tensor]]:
    """The VQVAE built on meta and ``state`` with the codebook statistics of another schedule replaced, checked."""
    vae = build_var_vqvae(device="meta", V=V, Cvae=Cvae, ch=ch, share_quant_resi=share_quant_resi,
                          patch_nums=patch_nums)
    expected = vae.state_dict()
    ema = state.get(EMA_KEY)
    if ema is not None and ema.ndim == 2 and ema.shape[1] == V and ema.shape[0] != len(vae.quantize.v_patch_nums):
        state = dict(state, **{EMA_KEY: torch.zeros(expected[EMA_KEY].shape, dtype=expected[EMA_KEY].dtype,
                                                    device=ema.device)})
    check_keys_and_shapes(expected, state, str(path), "the VQVAE arguments "
                          f"(V={V}, Cvae={Cvae}, ch={ch}, share_quant_resi={share_quant_resi})")
    return vae, state


def load_var(path: Union[str, Path], config: Union[str, dict, VARConfig], device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = None, check_finite: bool = True) -> VAR:
    """Build the transformer for ``config`` and load the checkpoint at ``path`` into it (strict keys, shapes).

    ``dtype`` casts floating weights on the way (the buffers ``lvl_1L`` stay int64); without it they are cast to
    the model's float32. ``check_finite`` refuses NaN/Inf weights naming tensor and file; False skips that read.
    """
    config = resolve_var_config(config)
    state, sources = read_checkpoint(path, check_finite, mask_keys=MASK_KEYS)
    model = build_var(config, device="meta")
    expected = model.state_dict()
    check_keys_and_shapes(expected, state, str(path), "the VAR config", hint=lambda: _named_config_fitting(state))
    model.load_state_dict(match_dtypes(expected, state, sources, dtype), strict=True, assign=True)
    return model.to(device=torch.device(device)).eval().requires_grad_(False)


def load_var_vqvae(path: Union[str, Path], device: Union[str, torch.device] = "cpu", V: int = 4096, Cvae: int = 32,
                   ch: int = 160, share_quant_resi: int = 4, patch_nums: Sequence[int] = PATCH_NUMS_256,
                   dtype: Optional[torch.dtype] = None, check_finite: bool = True) -> VQVAE:
    """Build the VQVAE (defaults: the released ``vae_ch160v4096z32``) and load the checkpoint at ``path``.

    ``patch_nums`` must be the VAR model's schedule. The codebook-usage statistics ``ema_vocab_hit_SV`` have
    one row per scale of the schedule the VAE was trained with; when their row count differs from
    ``patch_nums`` (another schedule), they are replaced by zeros, as the official loader does: inference never
    reads them.
    """
    state, sources = read_checkpoint(path, check_finite)
    vae, state = _check_vqvae_state(state, path, V, Cvae, ch, share_quant_resi, patch_nums)
    vae.load_state_dict(match_dtypes(vae.state_dict(), state, sources, dtype), strict=True, assign=True)
    return vae.to(device=torch.device(device)).eval().requires_grad_(False)
