"""Run the official FastVAR code (csguoh/FastVAR, its Infinity variant) on a small random-weight Infinity on CPU and
record what it did, for tests/test_fastvar_official.py. Not part of the package; the official code is imported from
a checkout (``GRAPHSURGEON_OFFICIAL_FASTVAR``) and called unchanged. Patched, only in the imported modules'
namespaces (no file is edited):

- ``flash_attn`` is the project's shim (``model_adapters.infinity.official``): packed cross-attention maps to
  ``packed_cross_attention``. FastVAR's self-attention calls ``flash_attn_func(q, k, v, dropout_p=0,
  softmax_scale=...)`` on (B, L, H, c) even when ``customized_flash_attn=False``; it is rebound to exact SDPA on the
  same tensors (what the plain official Infinity runs there);
- ``cv2``, ``torchvision.transforms``, ``matplotlib.pyplot`` get empty stand-ins when not installed (imported at
  module level, unused on the inference path);
- ``fastvar_utils.masked_previous_scale_cache`` is wrapped to record, per call, the kept token indices (the
  merge/unmerge functions it returns are the official ones);
- the official top-k/top-p sampler is wrapped to copy the CFG-mixed, tau-divided logits it receives;
- a stand-in VAE gives the loop what it touches: BSQ ``indices_to_codes`` (normalize(bits*2s - s), s = 1/sqrt(d)),
  ``z_interplote_up = 'trilinear'``, and ``decode`` (records the summed codes, returns a zero image).

The loop is called as FastVAR's ``inference.py`` calls it (CFG on logits, ``vae_type=32``, ``sampling_per_bits=1``).
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import math
import sys
import traceback
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from model_adapters.infinity import build_infinity
from model_adapters.infinity.official import build_official_infinity

CONFIG = dict(depth=8, embed_dim=256, num_heads=2, block_chunks=2, text_channels=256, codebook_dim=32)
CFG, TAU, TOP_K, TOP_P = 3.0, 0.5, 900, 0.97
CFG_INSERTION_LAYER = [0]
VAE_TYPE = 32
SUBLAYERS = ("sa", "ca", "ffn")


# ----------------------------------------------------------------------------------------------- import shims
def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


def _install_fastvar_stand_ins() -> None:
    """cv2, torchvision.transforms, matplotlib.pyplot: imported at module level by FastVAR, unused at inference."""
    def missing(name: str) -> bool:
        return name not in sys.modules and importlib.util.find_spec(name) is None

    if missing("cv2"):
        sys.modules["cv2"] = _module("cv2")
    if missing("torchvision"):
        transforms = _module("torchvision.transforms")
        sys.modules["torchvision"] = _module("torchvision", transforms=transforms)
        sys.modules["torchvision.transforms"] = transforms
    if missing("matplotlib"):
        pyplot = _module("matplotlib.pyplot")
        sys.modules["matplotlib"] = _module("matplotlib", pyplot=pyplot)
        sys.modules["matplotlib.pyplot"] = pyplot


def _sdpa_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash_attn_func semantics on (B, L, H, c) tensors, computed exactly with SDPA (inference: no dropout)."""
    assert dropout_p == 0 and not causal
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2)


def _official_modules(checkout: str):
    """Import FastVAR's ``infinity.models`` modules from ``checkout`` (once per process)."""
    _install_fastvar_stand_ins()
    if "infinity.models.fastvar_basic" not in sys.modules:
        from model_adapters.infinity.official import load_official_class
        load_official_class(checkout)
    infinity_mod = sys.modules["infinity.models.infinity"]
    fastvar_basic = sys.modules["infinity.models.fastvar_basic"]
    fastvar_utils = sys.modules["infinity.models.fastvar_utils"]
    if not str(Path(infinity_mod.__file__).resolve()).startswith(str(Path(checkout).resolve())):
        raise RuntimeError(f"infinity.models already imported from {infinity_mod.__file__}, not {checkout}")
    fastvar_basic.flash_attn_func = _sdpa_flash_attn_func
    return infinity_mod, fastvar_basic, fastvar_utils


# ------------------------------------------------------------------------------------------- VAE stand-in
class _LFQStandIn:
    def __init__(self, codebook_dim: int, recorder: "_Recorder"):
        self.codebook_scale = 1 / math.sqrt(codebook_dim)
        self.recorder = recorder

    def indices_to_codes(self, indices, label_type="int_label", project_out=True):
        assert label_type == "bit_label"
        self.recorder.sampled_bits.append(indices.to(torch.uint8).clone())  # (B, 1, h, w, d)
        bits = indices.unsqueeze(-2)  # keep_num_codebooks_dim False: (..., 1, d)
        codes = F.normalize(bits * self.codebook_scale * 2 - self.codebook_scale, dim=-1)
        codes = codes.reshape(*codes.shape[:-2], -1)  # '... c d -> ... (c d)'; project_out is Identity
        return codes.movedim(-1, 1)  # 'b ... d -> b d ...'


class _VAEStandIn:
    """What autoregressive_infer_cfg (vae_type != 0, ret_img=True) touches on the VAE."""

    def __init__(self, codebook_dim: int, recorder: "_Recorder"):
        self.recorder = recorder
        self.quantizer = types.SimpleNamespace(lfq=_LFQStandIn(codebook_dim, recorder), z_interplote_up="trilinear")

    def decode(self, z):  # z = summed_codes.squeeze(-3): (B, d, H, W)
        self.recorder.summed_codes = z.unsqueeze(-3).clone()
        return torch.zeros(z.shape[0], 3, z.shape[-2], z.shape[-1])


# ----------------------------------------------------------------------------------------------- recorder
class _Recorder:
    def __init__(self, schedule):
        self.schedule = [tuple(int(v) for v in pn) for pn in schedule]
        self.sampled_bits: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.ran_scales: list[int] = []
        self.summed_codes = None
        self.kept: list[dict] = []
        self.calls_per_width: dict[int, int] = {}
        self.layer = -1
        self.sub = 0

    def block_pre_hook(self, _module, _args, kwargs):
        self.layer, self.sub = int(kwargs.get("layer_idx", -1)), 0

    def record_kept(self, indices: torch.Tensor, cur_shape, length: int) -> None:
        _, h, w = (int(v) for v in cur_shape)
        call = self.calls_per_width.get(w, 0)
        self.calls_per_width[w] = call + 1
        scale = next(i for i, pn in enumerate(self.schedule) if pn[1:] == (h, w))
        self.kept.append({"width": w, "height": h, "scale": scale, "call": call, "layer": self.layer,
                          "sublayer": SUBLAYERS[self.sub] if self.sub < 3 else str(self.sub), "L": length,
                          "index": indices[..., 0].to(torch.int64).clone()})
        self.sub += 1


@contextlib.contextmanager
def _patched(namespace, name, value):
    saved = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, saved)


def _random_text(lens, channels: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(sum(lens), channels, generator=generator)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    return kv, list(lens), cu, max(lens)


# -------------------------------------------------------------------------------------------------- a case
def official_fastvar_case(checkout: str, config: dict, schedule: list, lens: list[int], seed: int, *,
                          prune: bool = True, official=None) -> dict:
    """Run the official FastVAR ``autoregressive_infer_cfg`` once and return what it did (plain tensors/lists).

    ``seed`` seeds both the random text features and the official sampler (``g_seed``). ``prune=False`` runs
    the same official loop with ``compute_merge`` returning the identity triple (the 48/64 ``continue`` stays).
    If the official code raises, the dict has ``status='crashed'``, ``error`` and what was recorded until then.
    """
    infinity_mod, fastvar_basic, fastvar_utils = _official_modules(checkout)
    schedule = [tuple(int(v) for v in pn) for pn in schedule]
    ours = build_infinity(dict(config), seed=0)
    state_dict = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    if official is None:
        official = build_official_infinity(checkout, dict(config))
    missing_unexpected = official.load_state_dict(state_dict, strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    assert all(type(b).__name__ == "FastVARCrossAttnBlock" for b in official.unregistered_blocks)

    kv, lens, cu, max_len = _random_text(lens, config["text_channels"], seed)
    B, n = len(lens), len(schedule)
    rec = _Recorder(schedule)

    original_mpsc = fastvar_utils.masked_previous_scale_cache

    def recording_mpsc(cur_x, num_remain, cur_shape):
        merge, unmerge, id_fn = original_mpsc(cur_x, num_remain, cur_shape)
        rec.record_kept(id_fn(), cur_shape, cur_x.shape[1])
        return merge, unmerge, id_fn

    original_sampler = infinity_mod.sample_with_top_k_top_p_also_inplace_modifying_logits_

    def recording_sampler(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
        si = [i for i, pn in enumerate(rec.schedule) if pn[2] not in (48, 64)][len(rec.logits)]  # 48/64 draw nothing
        _, h, w = rec.schedule[si]
        rec.ran_scales.append(si)
        rec.logits.append(logits_BlV.detach().clone().reshape(logits_BlV.shape[0], h * w, -1))
        return original_sampler(logits_BlV, top_k=top_k, top_p=top_p, rng=rng, num_samples=num_samples)

    def identity_merge(x, prune_scale_list=[32, 40], is_later_layer=False, x_shape=None):  # noqa: B006
        return fastvar_utils.do_nothing, fastvar_utils.do_nothing, fastvar_utils.do_nothing

    hooks = [b.register_forward_pre_hook(rec.block_pre_hook, with_kwargs=True) for b in official.unregistered_blocks]
    status, error = "ok", ""
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(fastvar_utils, "masked_previous_scale_cache", recording_mpsc))
            stack.enter_context(_patched(infinity_mod, "sample_with_top_k_top_p_also_inplace_modifying_logits_",
                                         recording_sampler))
            if not prune:
                stack.enter_context(_patched(fastvar_basic, "compute_merge", identity_merge))
            official.autoregressive_infer_cfg(
                vae=_VAEStandIn(config["codebook_dim"], rec), scale_schedule=schedule,
                label_B_or_BLT=(kv.clone(), lens, cu.clone(), max_len), B=B, negative_label_B_or_BLT=None,
                force_gt_Bhw=None, g_seed=seed, cfg_list=[CFG] * n, tau_list=[TAU] * n, cfg_sc=3, top_k=TOP_K,
                top_p=TOP_P, returns_vemb=1, ratio_Bl1=None, gumbel=0, norm_cfg=False, cfg_exp_k=0.0,
                cfg_insertion_layer=CFG_INSERTION_LAYER, vae_type=VAE_TYPE, softmax_merge_topk=-1, ret_img=True,
                trunk_scale=1000, gt_leak=0, gt_ls_Bl=None, inference_mode=True, sampling_per_bits=1)
    except Exception as err:  # batch > 1: report what the official code does, no workaround
        status = "crashed"
        frame = traceback.extract_tb(err.__traceback__)[-1]
        last = rec.kept[-1] if rec.kept else {}
        error = (f"{type(err).__name__}: {err} | at {Path(frame.filename).name}:{frame.lineno} `{frame.line}` | "
                 f"last masked_previous_scale_cache call: width={last.get('width')} layer={last.get('layer')} "
                 f"sublayer={last.get('sublayer')}")
    finally:
        for hook in hooks:
            hook.remove()
        for b in official.unregistered_blocks:  # a crash leaves KV caching on
            b.sa.kv_caching(False)

    return {
        "status": status, "error": error, "pruned": bool(prune),
        "config": dict(config), "state_dict": state_dict,
        "text_kv": kv, "text_lens": list(lens), "text_cu_seqlens": cu, "text_max_len": int(max_len), "text_seed": seed,
        "B": B, "cfg": CFG, "tau": TAU, "top_k": TOP_K, "top_p": TOP_P, "g_seed": seed,
        "cfg_insertion_layer": list(CFG_INSERTION_LAYER), "vae_type": VAE_TYPE,
        "scale_schedule": schedule,
        "ran_scales": list(rec.ran_scales),
        "skipped_scales": [i for i, pn in enumerate(schedule) if pn[2] in (48, 64)],
        "sampled_bits": rec.sampled_bits,
        "cfg_logits": rec.logits,
        "summed_codes": rec.summed_codes,
        "kept": rec.kept,
        "prune_layers": [i for i in range(3, 28) if i < config["depth"]],
        "prune_widths_ratios": [[32, 0.4], [40, 0.5]],
        "cached_hw": [24, 24],
    }
