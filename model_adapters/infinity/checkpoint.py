"""Load Infinity checkpoints without unpickling code.

Accepted: a plain ``state_dict`` file (``.pth``/``.pt``/``.bin``, read with ``weights_only=True``), a
``.safetensors`` file, or a folder of shards with a Hugging Face style ``*.index.json`` (``weight_map``:
key -> shard file, a relative path inside the folder; symlinks are followed, as in the Hugging Face cache),
read by graphsurgeon.checkpoint_io.
The key set and every shape must equal the model's; a mismatch is an error naming the keys, and when the
checkpoint belongs to another size the error says which named config fits it. NaN/Inf weights are refused
at load naming the tensor and the file (``check_finite``), and floating tensors stored in another precision
are cast to the model's, so that neither surfaces later as a sampling error that names neither.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from graphsurgeon.checkpoint_io import check_keys_and_shapes, match_dtypes, read_checkpoint, read_shapes

from .builder import build_infinity
from .config import NAMED_CONFIGS, InfinityConfig, resolve_config
from .model import Infinity


def read_state_dict(path: Union[str, Path], check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or sharded folder into one state_dict (tensors on CPU, memory-mapped if possible).

    ``check_finite`` refuses NaN/Inf values naming tensor and file; False skips that pass over the weights.
    """
    return read_checkpoint(path, check_finite)[0]


def _guess_named_config(state: dict[str, torch.Tensor]) -> Optional[str]:
    """The named config whose structure matches a checkpoint, if any (for error messages)."""
    for name, kwargs in NAMED_CONFIGS.items():
        reference = build_infinity(kwargs, device="meta").state_dict()
        if reference.keys() == state.keys() and all(reference[k].shape == state[k].shape for k in state):
            return name
    return None


def check_state_dict(model: Infinity, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's keys and shapes; the message says
    which named config the checkpoint fits when it fits another one."""
    def hint() -> Optional[str]:
        name = _guess_named_config(state)
        return f"this checkpoint matches the named config {name!r}" if name else None

    check_keys_and_shapes(model.state_dict(), state, source, hint=hint)


def check_checkpoint_fits(path: Union[str, Path], config: Union[str, dict, InfinityConfig]) -> None:
    """Refuse a checkpoint whose keys or shapes do not fit ``config``, from its headers only (no weights read), so
    a command line fails before it builds anything."""
    check_state_dict(build_infinity(resolve_config(config), device="meta"), read_shapes(path), str(path))


def load_infinity(path: Union[str, Path], config: Union[str, dict, InfinityConfig], device: Union[str, torch.device] = "cpu",
                  dtype: Optional[torch.dtype] = None, check_finite: bool = True) -> Infinity:
    """Build the model for ``config`` and load the checkpoint at ``path`` into it (strict keys and shapes).

    Floating tensors stored in another precision (float16, bfloat16, float64) are cast to the model's float32,
    or to ``dtype`` when given: the sampler's inputs (text features, RoPE tables) are float32, and a float16
    model would fail only later, at a matmul, naming no tensor. ``check_finite`` refuses NaN/Inf weights at
    load, naming tensor and file (one extra read of the weights); pass False to skip it for a checkpoint known
    to be sound.
    """
    config = resolve_config(config)
    state, sources = read_checkpoint(path, check_finite)
    model = build_infinity(config, device="meta")
    check_state_dict(model, state, str(path))
    model.load_state_dict(match_dtypes(model.state_dict(), state, sources, dtype), strict=True, assign=True)
    return model.to(device=torch.device(device), dtype=dtype).eval()
