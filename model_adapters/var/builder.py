"""Build the reference VAR transformer from a named config, a dict or a :class:`VARConfig`."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from graphsurgeon.errors import ConfigError

from .config import VARConfig, resolve_var_config
from .model import VAR


def build_var(config: Union[str, dict, VARConfig], device: Union[str, torch.device] = "cpu",
              seed: Optional[int] = None) -> VAR:
    """Construct the model in eval mode. ``device="meta"`` allocates no weights (structure, capture, loading).

    With ``seed``, every parameter is drawn from a CPU generator seeded with it (:func:`init_random_var_weights`),
    so the same seed gives the same weights on any machine. This deliberately differs from the official
    ``init_weights``, which zeroes every bias and scales the AdaLN gamma rows by 1e-5: with
    such weights the blocks barely change the residual stream, and a wrong gate, order of operations or cache
    would go unnoticed in a comparison. Without ``seed`` the values are whatever the constructors leave (load a
    checkpoint into them).
    """
    cfg = resolve_var_config(config)
    device = torch.device(device)
    if seed is not None and device.type == "meta":
        raise ConfigError("seed needs real storage: build on a real device, not 'meta'")
    with torch.device(device):
        model = VAR(cfg)
    if seed is not None:
        init_random_var_weights(model, seed)
    return model.eval().requires_grad_(False)


def _mean_std(name: str, param: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of one parameter's draw, sized so activations stay O(1) and every gate is clearly non-zero."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "scale_mul_1H11":
        return math.log(4.0), 0.1
    if leaf == "ada_gss":
        return 0.0, 0.1
    if name in ("pos_start", "pos_1LC", "class_emb.weight", "lvl_embed.weight"):
        return 0.0, 0.5
    if "ada_lin" in name and leaf == "weight":  # AdaLN projections (per block, shared, before the head)
        return 0.0, 0.5 / math.sqrt(param.shape[-1])
    if name == "head.weight":  # logits of std ~2: peaked enough for top-k / top-p to matter
        return 0.0, 2.0 / math.sqrt(param.shape[-1])
    if param.ndim >= 2:
        return 0.0, 1.0 / math.sqrt(param.shape[-1])
    return 0.0, 0.05  # biases, q_bias, v_bias


@torch.no_grad()
def init_random_var_weights(model: VAR, seed: int) -> VAR:
    """Draw every parameter (not the buffers: level ids, the training mask, the zero key bias) at random."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        mean, std = _mean_std(name, param)
        draw = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std + mean
        param.copy_(draw.to(device=param.device, dtype=param.dtype))
    return model
