"""Build the reference Infinity model from a named config or an :class:`InfinityConfig`."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .config import InfinityConfig, resolve_config
from .model import Infinity


def build_infinity(name_or_config: Union[str, dict, InfinityConfig], device: Union[str, torch.device] = "cpu",
                   dtype: Optional[torch.dtype] = None, seed: Optional[int] = None, draw_on_device: bool = False
                   ) -> Infinity:
    """Construct the model. ``device="meta"`` allocates no weights (for structure, capture, or loading).

    With ``seed``, every parameter is drawn from a generator seeded with it (see :func:`init_random_weights`),
    so the same seed gives the same weights on any machine; ``draw_on_device`` draws them on ``device`` instead
    (much faster for 2B/8B on a GPU; the weights then depend on the device type).
    """
    config = resolve_config(name_or_config)
    device = torch.device(device)
    if seed is not None and device.type == "meta":
        raise ValueError("seed needs real storage: build on a real device, not 'meta'")
    with torch.device(device):
        model = Infinity(config)
    if seed is not None:
        init_random_weights(model, seed, device if draw_on_device else None)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _std_for(name: str, param: torch.Tensor, model: Infinity) -> tuple[float, float]:
    """(mean, std) of the random draw for one parameter: sized so activations stay O(1) at any depth."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "ada_gss":
        return 0.0, param.shape[-1] ** -0.5
    if leaf == "scale_mul_1H11":
        return math.log(4.0), 0.1
    if name == "cfg_uncond":
        return 0.0, 1.2 / model.Ct5 ** 0.5
    if name.startswith("shared_ada_lin") or name.startswith("head_nm.ada_lin"):
        return 0.0, 0.2 * (param.shape[-1] ** -0.5 if param.ndim == 2 else 1.0)
    if leaf == "weight" and param.ndim == 1:  # norm gains
        return 1.0, 0.1
    if param.ndim >= 2 and leaf in ("weight", "mat_q"):
        return 0.0, param.shape[-1] ** -0.5
    return 0.0, 0.02


@torch.no_grad()
def init_random_weights(model: Infinity, seed: int, device: Optional[torch.device] = None) -> Infinity:
    """Draw every parameter (never the zero-bias buffers) from a generator seeded with ``seed`` (on the CPU
    unless ``device`` is given)."""
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        mean, std = _std_for(name, param, model)
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32, device=device or "cpu") * std + mean
        param.copy_(draw.to(param.dtype))
    return model
