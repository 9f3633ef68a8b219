"""Running the official Infinity class (FoundationVision/Infinity) with this adapter.

The official code is not part of this repository. ``load_official_class(checkout)`` imports
``infinity.models.infinity.Infinity`` from a checkout, unchanged, with the shims the adapter declares:

- ``flash_attn`` (unless ``shim_flash_attn=False``): its packed cross-attention maps onto the custom op
  ``packed_cross_attention`` (flash-attn itself on CUDA when installed); ``flash_attn_func`` is unused at inference.
- ``torch.compile`` is an identity while the official modules are imported (its fused AdaLN helpers then run
  eagerly; capture also unwraps compiled helpers it finds on modules).
- ``timm``, ``PIL``, ``pytz``, ``tqdm`` get minimal stand-ins only when they are not installed: the inference
  path does not use them beyond the import.

Capture does not depend on that shim: ``packed_attention_as_op`` (entered by the adapter's capture plan) routes
the packed cross-attention that the official modules bound at import time onto the custom op while tracing,
whichever ``flash_attn`` they imported, so it stays one node in captured graphs.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Callable, Iterator, Union

import torch

from graphsurgeon.capture import CAPTURE_LOCK
from graphsurgeon.errors import ConfigError

from .config import InfinityConfig, resolve_config
from .kernels import packed_cross_attention


def _flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                     softmax_scale=None, **_):
    heads, head_dim = q.shape[-2:]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    # rows from q itself (-1), not from cu_seqlens_q: a pass that drops batch rows keeps this reshape valid
    out = packed_cross_attention(q.reshape(-1, max_seqlen_q, heads, head_dim), kv, cu_seqlens_k, int(max_seqlen_k), scale)
    return out.reshape(-1, heads, head_dim)


_PACKED_ATTENTION = "flash_attn_varlen_kvpacked_func"  # the name the official basic.py binds from flash_attn


def _traced_as_op(bound: Callable) -> Callable:
    """``bound`` for eager calls; the custom op for calls on traced values (what flash-attn cannot take)."""
    @functools.wraps(bound)
    def packed_attention(*args, **kwargs):
        if any(isinstance(value, torch.fx.Proxy) for value in (*args, *kwargs.values())):
            return _flash_attn_varlen_kvpacked_func(*args, **kwargs)
        return bound(*args, **kwargs)

    return packed_attention


@contextlib.contextmanager
def packed_attention_as_op(model: torch.nn.Module) -> Iterator[None]:
    """While capturing ``model``, route the packed cross-attention its modules' code bound at import time
    (``from flash_attn import flash_attn_varlen_kvpacked_func``) onto the custom op, however the user imported it.

    The name is rebound in the globals of every module class's ``forward`` that has it, under ``CAPTURE_LOCK``
    (module globals are process-wide), and put back on exit, also when capture fails. Eager calls (no traced
    values) still reach the function that was bound, so the model behaves as before, in any thread.
    """
    with CAPTURE_LOCK:
        namespaces = {id(ns): ns for ns in (getattr(type(m).forward, "__globals__", {}) for m in model.modules())
                      if callable(ns.get(_PACKED_ATTENTION))}
        saved = [(ns, ns[_PACKED_ATTENTION]) for ns in namespaces.values()]
        try:
            for ns, bound in saved:
                ns[_PACKED_ATTENTION] = _traced_as_op(bound)
            yield
        finally:
            for ns, bound in saved:
                ns[_PACKED_ATTENTION] = bound


def _flash_attn_func(*_, **__):
    raise RuntimeError("flash_attn_func is not available here: build the official model with customized_flash_attn=False")


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec() must not fail on it
    return module


def _stand_ins() -> dict[str, types.ModuleType]:
    class DropPath(torch.nn.Module):
        def __init__(self, *_, **__):
            super().__init__()

        def forward(self, x):
            return x

    layers = _module("timm.models.layers", DropPath=DropPath, drop_path=lambda x, *_, **__: x)
    models = _module("timm.models", register_model=lambda fn: fn, layers=layers)
    loss = _module("timm.loss", SoftTargetCrossEntropy=type("SoftTargetCrossEntropy", (torch.nn.Module,), {}))
    image = _module("PIL.Image")
    return {
        "timm": _module("timm", models=models, loss=loss), "timm.models": models, "timm.models.layers": layers,
        "timm.loss": loss, "PIL": _module("PIL", Image=image), "PIL.Image": image,
        "pytz": _module("pytz", timezone=lambda name: None),
        "tqdm": _module("tqdm", tqdm=lambda iterable=None, *_, **__: iterable if iterable is not None else []),
    }


@contextlib.contextmanager
def _eager_compile():
    original = torch.compile
    torch.compile = lambda fn=None, *_, **__: fn if fn is not None else (lambda f: f)
    try:
        yield
    finally:
        torch.compile = original


def load_official_class(checkout: Union[str, Path], shim_flash_attn: bool = True) -> type:
    """Import the official ``Infinity`` class from a checkout of FoundationVision/Infinity.

    ``shim_flash_attn=False`` leaves ``flash_attn`` to the environment (the real one on a GPU machine, for an
    eager baseline on its kernels); capture works either way. Modules already imported are reused as they are.
    """
    checkout = Path(checkout)
    if not (checkout / "infinity" / "models" / "infinity.py").exists():
        raise ConfigError(f"{checkout} is not a checkout of FoundationVision/Infinity (no infinity/models/infinity.py)")
    if shim_flash_attn:
        sys.modules["flash_attn"] = _module("flash_attn", flash_attn_func=_flash_attn_func,
                                            flash_attn_varlen_kvpacked_func=_flash_attn_varlen_kvpacked_func)
    stand_ins = _stand_ins()
    missing = {name.split(".")[0] for name in stand_ins
               if name.split(".")[0] not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is None}
    for name, module in stand_ins.items():
        if name.split(".")[0] in missing:
            sys.modules[name] = module
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    with _eager_compile():
        return importlib.import_module("infinity.models.infinity").Infinity


class _BitVAEStandIn:
    """What the official constructor reads from its VAE: codebook size and the bit mask."""

    def __init__(self, codebook_dim: int):
        self.embed_dim, self.vocab_size = codebook_dim, 2 ** codebook_dim
        mask = 2 ** torch.arange(codebook_dim - 1, -1, -1)
        self.quantizer = types.SimpleNamespace(lfq=types.SimpleNamespace(mask=mask))


def build_official_infinity(checkout: Union[str, Path], config: Union[str, dict, InfinityConfig],
                            shim_flash_attn: bool = True) -> torch.nn.Module:
    """An official ``Infinity`` built with the inference arguments of the official scripts, in eval mode
    (``shim_flash_attn``: see :func:`load_official_class`)."""
    config = resolve_config(config)
    cls = load_official_class(checkout, shim_flash_attn)
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its configuration
        model = cls(
            vae_local=_BitVAEStandIn(config.codebook_dim), text_channels=config.text_channels,
            text_maxlen=config.text_maxlen, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, block_chunks=config.block_chunks, norm_eps=config.norm_eps, shared_aln=True,
            fused_norm=True, pad_to_multiplier=config.pad_to_multiplier, customized_flash_attn=False,
            use_flex_attn=False, checkpointing="full-block", add_lvl_embeding_only_first_block=1, use_bit_label=1,
            rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M", inference_mode=True, train_h_div_w_list=[1.0],
            apply_spatial_patchify=config.apply_spatial_patchify, cross_attn_layer_scale=config.cross_attn_layer_scale)
    return model.eval()
