"""The baseline (unaccelerated) sampler: the official ``autoregressive_infer_cfg`` bitwise path.

It drives the model only through the methods both the reference class and the official class have, so
it samples either. Behaviour that decides the output, kept exactly as the official code does it:
- CFG runs on a doubled batch: rows [0:B] conditional, [B:2B] unconditional, whose text is
  ``cfg_uncond[:len]`` for each prompt (same lengths, same packing).
- Logits are divided by tau first, then mixed: ``cfg * l[:B] + (1 - cfg) * l[B:]``.
- Bits are drawn with one ``torch.multinomial`` over all (token, bit) pairs of a scale after top-k /
  top-p filtering, from a generator seeded with ``seed`` on the model's device.
- Teacher forcing (the official ``gt_leak``) still draws, then replaces the bits, so the random stream of
  later scales is the one the official code sees.
- Codes are ``normalize(bits * 2s - s)`` with s = 1/sqrt(d) (BSQ), accumulated trilinearly at the final
  VAE grid; the next scale's input is the trilinear resize of the sum (8B: pixel-unshuffled 2x2).

Every argument is checked by :func:`validate_generate_args` before any work (graphsurgeon calls it before it
captures, so a rejected call costs nothing and caches nothing); a bad one is an ``InputError`` naming it.

The loop is written against graphsurgeon's :class:`~graphsurgeon.runner.ScaleRunner`: per scale it calls
``runner.scale`` (:func:`scale_step`: the transformer), ``runner.guide`` (CFG, by :func:`cfg_rule`) and
``runner.residual`` (:func:`residual_step`: bits -> codes -> the next input). The baseline's runner runs those
functions eagerly; graphsurgeon's runs their captured graphs.

Threads: the eager runner keeps the attention KV caches in the model's modules, so eager runs of one model are
serialised (:func:`graphsurgeon.runner.model_lock`, held while an :class:`EagerScaleRunner` is entered); runs of different models,
and graphsurgeon's graph runs (their caches are graph values), proceed in parallel.
"""
from __future__ import annotations

import inspect
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, ContextManager, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from graphsurgeon.errors import InputError
from graphsurgeon.runner import GuidanceRule, ScaleRunner, StepRunner, stateful_mode

from .schedules import identify_schedule

TextInput = tuple  # (kv_compact (N, Ct5), lens list[int], cu_seqlens int32 (B+1,), max_len int)


@dataclass
class GenerationOutput:
    bits: list[torch.Tensor]
    """Per scale, uint8 (B, 1, h, w, d) on the VAE grid (8B patchify: (B, 1, 2h, 2w, 14))."""
    summed_codes: torch.Tensor
    """float32 (B, d, 1, H, W): the accumulated codes the VAE decodes."""
    logits: Optional[list[torch.Tensor]] = None
    """With ``return_logits``: per scale (B, h*w, 2d) = (cfg*cond + (1-cfg)*uncond) / tau."""
    stats: Optional[dict[str, Any]] = None
    """Set by graphsurgeon's ``OptimizedModel.generate``: what this call ran (per pass, and ``summary``); the
    baseline sampler leaves it None."""


def bits_to_codes(bits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """BSQ codes of bits (B, 1, h, w, d) -> (B, d, 1, h, w), each code vector of unit norm."""
    s = 1 / math.sqrt(codebook_dim)
    return F.normalize(bits * s * 2 - s, dim=-1).movedim(-1, 1)


def sample_bits(logits: torch.Tensor, top_k: int, top_p: float, rng: Optional[torch.Generator]) -> torch.Tensor:
    """Draw one class per row of ``logits`` (B, l, V) after top-k / top-p filtering; returns (B, l) int64."""
    batch, length, vocab = logits.shape
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), -torch.inf)
    probs = logits.softmax(dim=-1).view(-1, vocab)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=rng).view(batch, length)


def scale_blocks(model, scale_ind: int, schedule, max_text_len: int, tokens: torch.Tensor, cond_gss: torch.Tensor,
                 text_kv: torch.Tensor, text_cu_seqlens: torch.Tensor, rope2d_freqs_grid) -> torch.Tensor:
    """One scale through the transformer: level embedding, then every block. Returns the hidden states.

    The baseline runs this eagerly and graphsurgeon captures it (followed by the head), so both execute
    the same operations in the same order.
    """
    x = model.add_lvl_embeding(tokens, scale_ind, schedule)
    ca_kv = (text_kv, text_cu_seqlens, max_text_len)
    for block in model.unregistered_blocks:
        x = block(x=x, cond_BD=cond_gss, ca_kv=ca_kv, attn_bias_or_two_vector=None, attn_fn=None,
                  scale_schedule=schedule, rope2d_freqs_grid=rope2d_freqs_grid, scale_ind=scale_ind)
    return x


def scale_step(model, scale_ind: int, inputs: dict[str, torch.Tensor], schedule, max_text_len: int
               ) -> dict[str, torch.Tensor]:
    """One scale's transformer step on named inputs -> {"logits": raw logits of every row}. The baseline runs it
    eagerly and graphsurgeon captures it, so both execute the same operations in the same order."""
    rope = {str(tuple(schedule)): inputs["rope_table"]}
    h = scale_blocks(model, scale_ind, schedule, max_text_len, inputs["tokens"], inputs["cond_gss"],
                     inputs["text_kv"], inputs["text_cu_seqlens"], rope)
    return {"logits": model.get_logits(h, inputs["cond_BD"])}


def residual_step(model, scale_ind: int, vae_schedule, n_run: int, bits: torch.Tensor, summed_codes: torch.Tensor,
                  codebook_dim: int, patchify: bool, repeat: int) -> dict[str, torch.Tensor]:
    """A scale's bits -> its codes (R_k, as a (B, d, h, w) map), the updated sum of codes, and the next scale's
    input tokens. The second region graphsurgeon captures per scale (LHEP's scatter lives here)."""
    residual = bits_to_codes(bits, codebook_dim).squeeze(-3)
    codes = residual.unsqueeze(-3)  # everything below is computed from R_k (a pass may weight it: DepthVAR)
    if scale_ind == len(vae_schedule) - 1:
        return {"residual": residual, "summed_codes": summed_codes + codes}
    summed_codes = summed_codes + F.interpolate(codes, size=vae_schedule[-1], mode="trilinear")
    if scale_ind == n_run - 1:
        return {"residual": residual, "summed_codes": summed_codes}
    nxt = F.interpolate(summed_codes, size=vae_schedule[scale_ind + 1], mode="trilinear").squeeze(-3)
    if patchify:
        nxt = F.pixel_unshuffle(nxt, 2)
    nxt = nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)
    return {"residual": residual, "summed_codes": summed_codes,
            "next_tokens": model.word_embed(model.norm0_ve(nxt)).repeat(repeat, 1, 1)}


def kv_caching(model) -> ContextManager[None]:
    """The attention KV caches on for one generation (or one capture), holding the model's lock: two runs of one
    model at once would share, and reset, each other's caches, so the second waits for the first."""
    def switch(on: bool) -> None:
        for block in model.unregistered_blocks:
            block.sa.kv_caching(on)
    return stateful_mode(model, switch)


class EagerScaleRunner(StepRunner):
    """Runs a scale on the model itself (:func:`scale_step`, :func:`residual_step`); its attention modules keep the
    KV caches between scales, under :func:`kv_caching`."""

    def __init__(self, model, args: "GenerateArgs"):
        def scale(m, si: int, inputs: dict) -> dict:
            return scale_step(m, si, inputs, args.schedule, args.max_len)

        def residual(m, si: int, inputs: dict) -> dict:
            return residual_step(m, si, args.vae_schedule, args.n_run, inputs["bits"], inputs["summed_codes"],
                                 args.codebook_dim, args.patchify, cfg_repeat(args))

        super().__init__(model, scale, residual, sampled_input="bits", context=lambda: kv_caching(model))


def cfg_rule(cfg: float) -> GuidanceRule:
    """Infinity's classifier-free guidance: ``cfg * cond + (1 - cfg) * uncond``."""
    return lambda cond, uncond: cfg * cond + (1 - cfg) * uncond


def cfg_repeat(args: "GenerateArgs") -> int:
    """Rows per sample: 2 when some scale's cfg is not 1 (the doubled batch), else 1."""
    return 2 if any(c != 1 for c in args.cfg) else 1


def double_text_for_cfg(kv: torch.Tensor, lens: list[int], cu: torch.Tensor, cfg_uncond: torch.Tensor):
    """Append the unconditional text (``cfg_uncond[:len]`` per prompt) after the conditional prompts."""
    kv_uncond = kv.clone()
    for start, n in zip(cu[:-1].tolist(), lens):
        kv_uncond[start:start + n] = cfg_uncond[:n]
    return torch.cat((kv, kv_uncond), dim=0), torch.cat((cu, cu[1:] + cu[-1]), dim=0)


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an int if it is one (Python, NumPy or a one-element integer tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_text(text: TextInput, text_channels: int, max_len_allowed: int, device: torch.device,
               dtype: torch.dtype) -> TextInput:
    """Validate the packed text tuple; returns it with kv_compact in ``dtype`` (the model's: T5 features often
    arrive in half precision or float64), ``cu_seqlens`` as int32 and lens as ints."""
    if not isinstance(text, (tuple, list)) or len(text) != 4:
        raise InputError(f"text must be a tuple (kv_compact, lens, cu_seqlens, max_len), got {type(text).__name__}")
    kv, lens, cu, max_len = text
    if not isinstance(kv, torch.Tensor) or kv.ndim != 2 or not kv.is_floating_point():
        raise InputError(f"text kv_compact must be a float tensor (N, {text_channels}), got {getattr(kv, 'shape', type(kv))}")
    if kv.shape[1] != text_channels:
        raise InputError(f"text kv_compact has {kv.shape[1]} channels; the model's text_channels is {text_channels}")
    lens = lens.tolist() if isinstance(lens, torch.Tensor) else lens
    if not isinstance(lens, (list, tuple)) or any(_as_int(n) is None for n in lens):
        raise InputError(f"text lens must be a list of ints (tokens per prompt), got {lens!r}")
    lens = [_as_int(n) for n in lens]
    if not lens:
        raise InputError("text has no prompts (lens is empty): the batch must hold at least one prompt")
    if min(lens) <= 0:
        raise InputError(f"text lens must be positive per prompt, got {lens}")
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.ndim != 1:
        raise InputError("text cu_seqlens must be a 1-D int32 tensor")
    expected = [0]
    for n in lens:
        expected.append(expected[-1] + n)
    if cu.tolist() != expected:
        raise InputError(f"text cu_seqlens {cu.tolist()} disagree with lens {lens} (expected {expected})")
    if expected[-1] != kv.shape[0]:
        raise InputError(f"text lens sum to {expected[-1]} but kv_compact has {kv.shape[0]} rows")
    if _as_int(max_len) != max(lens):
        raise InputError(f"text max_len is {max_len!r} but the longest prompt has {max(lens)} tokens")
    if max(lens) > max_len_allowed:
        raise InputError(f"a prompt has {max(lens)} tokens; the model's text_maxlen is {max_len_allowed}")
    if kv.device != device:
        raise InputError(f"text kv_compact is on {kv.device} but the model is on {device}")
    kv = kv.to(dtype)  # checked after the cast: float64 features can overflow float32
    if kv.device.type != "meta":  # a capture's placeholder text holds no values
        rows = (~torch.isfinite(kv).all(dim=1)).nonzero().flatten().cpu()
        if len(rows):
            prompts = sorted(set((torch.searchsorted(torch.tensor(expected[1:]), rows, right=True)).tolist()))
            raise InputError(f"text kv_compact holds NaN/Inf features for prompt(s) {prompts} (the text encoder's "
                             "weights, or an overflow in float16)")
    return kv, lens, cu.to(device=device, dtype=torch.int32), max(lens)


CFG_LIMIT = 1000.0
"""The largest guidance scale accepted (the official inference uses 3-5): far beyond it the guided logits
``cfg * cond + (1 - cfg) * uncond`` overflow to inf and sampling fails inside torch."""


def check_guidance(cfg: Union[float, Sequence[float]], tau: Union[float, Sequence[float]], n_scales: int
                   ) -> tuple[list[float], list[float]]:
    """``cfg`` and ``tau`` as one value per scale: finite, |cfg| at most :data:`CFG_LIMIT`, tau positive."""
    cfg_list, tau_list = _per_scale(cfg, n_scales, "cfg"), _per_scale(tau, n_scales, "tau")
    if any(abs(c) > CFG_LIMIT for c in cfg_list):
        raise InputError(f"cfg must be within [-{CFG_LIMIT:g}, {CFG_LIMIT:g}] (the official value is 3), got "
                         f"{sorted(set(cfg_list), key=abs)[-1]:g}")
    if any(t <= 0 for t in tau_list):
        raise InputError(f"tau must be positive, got {tau_list}")
    return cfg_list, tau_list


def _per_scale(value: Union[float, Sequence[float]], n: int, name: str) -> list[float]:
    """One finite value per scale: a number for all, or a list with exactly one per scale of the schedule."""
    if _is_real(value):
        values = [float(value)] * n
    elif isinstance(value, (list, tuple)) and all(_is_real(v) for v in value):
        values = [float(v) for v in value]
        if len(values) != n:
            raise InputError(f"{name} has {len(values)} values for {n} scales (a list needs exactly one per scale)")
    else:
        raise InputError(f"{name} must be a number or a list of one number per scale, got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{name} must be finite, got {values}")
    return values


def _check_forced(force_bits, vae_schedule, batch: int, codebook_dim: int, device) -> list[torch.Tensor]:
    if force_bits is None:
        return []
    if not isinstance(force_bits, (list, tuple)):
        raise InputError(f"force_bits must be a list of per-scale tensors, got {type(force_bits).__name__}")
    if len(force_bits) > len(vae_schedule):
        raise InputError(f"force_bits has {len(force_bits)} scales; the schedule has {len(vae_schedule)}")
    forced = []
    for si, bits in enumerate(force_bits):
        _, h, w = vae_schedule[si]
        if not isinstance(bits, torch.Tensor):
            raise InputError(f"force_bits[{si}] must be a tensor (B, 1, h, w, d) of 0/1, got {type(bits).__name__}")
        if tuple(bits.shape) != (batch, 1, h, w, codebook_dim):
            raise InputError(f"force_bits[{si}] has shape {tuple(bits.shape)}, expected {(batch, 1, h, w, codebook_dim)}")
        if bits.is_floating_point() or ((bits != 0) & (bits != 1)).any():
            raise InputError(f"force_bits[{si}] must hold integer or bool 0/1 values")
        forced.append(bits.to(device=device, dtype=torch.uint8))
    return forced


@dataclass(frozen=True)
class GenerateArgs:
    """The arguments of one ``generate`` call, checked and normalised (per-scale lists, int32 offsets, …)."""

    kv: torch.Tensor
    lens: list[int]
    cu: torch.Tensor
    max_len: int
    schedule: list[tuple[int, int, int]]
    vae_schedule: list[tuple[int, int, int]]
    n_run: int
    cfg: list[float]
    tau: list[float]
    top_k: int
    top_p: float
    seed: Optional[int]
    forced: list[torch.Tensor]
    return_logits: bool
    patchify: bool
    codebook_dim: int


SEED_RANGE = (-2 ** 63, 2 ** 64)
"""Seeds torch's generator takes; a negative seed s draws as s + 2**64 (torch's rule, so the official code's)."""


def _check_args(model, text, scale_schedule, cfg, tau, top_k, top_p, seed, force_bits, return_logits,
                num_scales) -> GenerateArgs:
    identify_schedule(scale_schedule)
    schedule = [tuple(int(v) for v in pn) for pn in scale_schedule]
    n_scales = len(schedule)
    n_run = n_scales if num_scales is None else _as_int(num_scales)
    if n_run is None or not 1 <= n_run <= n_scales:
        raise InputError(f"num_scales must be an int in [1, {n_scales}], got {num_scales!r}")
    cfg_list, tau_list = check_guidance(cfg, tau, n_scales)
    k = _as_int(top_k)
    if k is None or k < 0:
        raise InputError(f"top_k must be an int >= 0, got {top_k!r}")
    if not _is_real(top_p) or not 0.0 <= top_p <= 1.0:
        raise InputError(f"top_p must be a number in [0, 1], got {top_p!r}")
    seed_value = None if seed is None else _as_int(seed)
    if seed is not None and (seed_value is None or not SEED_RANGE[0] <= seed_value < SEED_RANGE[1]):
        raise InputError(f"seed must be None or an int in [-2**63, 2**64) (torch's generator), got {seed!r}")
    if not isinstance(return_logits, bool):
        raise InputError(f"return_logits must be a bool, got {return_logits!r}")
    device = model.pos_start.device
    kv, lens, cu, max_len = check_text(text, model.Ct5, model.cfg_uncond.shape[0], device, model.pos_start.dtype)
    patchify = bool(model.apply_spatial_patchify)
    codebook_dim = model.d_vae // 4 if patchify else model.d_vae
    vae_schedule = [(t, 2 * h, 2 * w) for t, h, w in schedule] if patchify else schedule
    forced = _check_forced(force_bits, vae_schedule, len(lens), codebook_dim, device)
    return GenerateArgs(kv=kv, lens=lens, cu=cu, max_len=max_len, schedule=schedule, vae_schedule=vae_schedule,
                        n_run=n_run, cfg=cfg_list, tau=tau_list, top_k=k, top_p=float(top_p), seed=seed_value,
                        forced=forced, return_logits=return_logits, patchify=patchify, codebook_dim=codebook_dim)


@torch.no_grad()
def generate(model, text: TextInput, scale_schedule, cfg: Union[float, Sequence[float]] = 3.0,
             tau: Union[float, Sequence[float]] = 1.0, top_k: int = 0, top_p: float = 0.0, seed: Optional[int] = None,
             force_bits: Optional[Sequence[torch.Tensor]] = None, return_logits: bool = False,
             num_scales: Optional[int] = None, scale_runner: Optional[ScaleRunner] = None) -> GenerationOutput:
    """Sample the scales of ``scale_schedule`` for the prompts in ``text``; see the module docstring.

    ``cfg`` and ``tau`` are a number or a list of exactly one per scale of the schedule. ``num_scales`` stops
    after that many scales (the official ``trunk_scale``); the codes summed so far are returned at the final
    grid. ``scale_runner`` replaces the eager runner (graphsurgeon passes one over its captured graphs here).
    """
    args = _check_args(model, text, scale_schedule, cfg, tau, top_k, top_p, seed, force_bits, return_logits,
                       num_scales)
    return generate_checked(model, args, scale_runner)


_GENERATE_PARAMETERS = {name: p for name, p in inspect.signature(generate).parameters.items()
                        if name not in ("model", "scale_runner")}


def validate_generate_args(model, **kwargs: Any) -> GenerateArgs:
    """Check the keyword arguments of :func:`generate` (all but ``scale_runner``) as it does, before any work.

    Unknown or missing names are an ``InputError`` too, so that a caller holding ``**kwargs`` (graphsurgeon's
    ``OptimizedModel``) rejects exactly what the baseline rejects, with the same message.
    """
    unknown = sorted(set(kwargs) - set(_GENERATE_PARAMETERS))
    if unknown:
        raise InputError(f"unknown generate argument(s) {unknown}; the arguments are {list(_GENERATE_PARAMETERS)}")
    missing = [name for name, p in _GENERATE_PARAMETERS.items() if p.default is p.empty and name not in kwargs]
    if missing:
        raise InputError(f"generate needs the argument(s) {missing}")
    return _check_args(model, **{name: kwargs.get(name, p.default) for name, p in _GENERATE_PARAMETERS.items()})


@torch.no_grad()
def generate_checked(model, args: GenerateArgs, scale_runner: Optional[ScaleRunner] = None) -> GenerationOutput:
    """The sampling loop of :func:`generate` on checked arguments (see :func:`validate_generate_args`)."""
    device = model.pos_start.device
    kv, lens, cu, max_len = args.kv, args.lens, args.cu, args.max_len
    schedule, vae_schedule, codebook_dim, patchify = args.schedule, args.vae_schedule, args.codebook_dim, args.patchify
    B = len(lens)

    rng = None
    if args.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(args.seed)

    bs = B * cfg_repeat(args)
    if bs != B:
        kv, cu = double_text_for_cfg(kv, lens, cu, model.cfg_uncond)

    kv = model.text_norm(kv)
    sos = cond_BD = model.text_proj_for_sos((kv, cu, max_len))
    kv = model.text_proj_for_ca(kv)
    last_stage = sos.unsqueeze(1).expand(bs, 1, -1) + model.pos_start.expand(bs, 1, -1)
    with torch.autocast("cuda", enabled=False):
        cond_gss = model.shared_ada_lin(cond_BD.float()).float().contiguous()
    rope_table = model.rope2d_freqs_grid[str(tuple(schedule))]

    bits_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    # channels-last like the official running sum (0 + the first upsampled codes, a permuted view): equal values,
    # but the next scale's downsampling and embedding then round exactly as there (contiguous: ~1 ulp apart)
    summed_codes = torch.zeros(B, codebook_dim, *vae_schedule[-1], device=device).to(
        memory_format=torch.channels_last_3d)
    with scale_runner or EagerScaleRunner(model, args) as runner:
        for si, (_, h, w) in enumerate(schedule[:args.n_run]):
            cfg_si = args.cfg[si]
            inputs = dict(tokens=last_stage, cond_gss=cond_gss, cond_BD=cond_BD, text_kv=kv, text_cu_seqlens=cu,
                          rope_table=rope_table)
            logits = runner.scale(si, inputs)["logits"]
            if cfg_si == 1 and bs > B:  # no guidance at this scale: each sample's conditional row, through the
                logits = runner.guide(si, logits, B, lambda cond, _: cond)  # runner (a pass may run other rows)
            logits = logits.mul(1 / args.tau[si])
            if cfg_si != 1:
                logits = runner.guide(si, logits, B, cfg_rule(cfg_si))
            if args.return_logits:
                logits_out.append(logits)
            drawn = sample_bits(logits.reshape(B, -1, 2), args.top_k, args.top_p, rng).reshape(B, h, w, -1)
            if patchify:  # (B, h, w, 4d) -> (B, 2h, 2w, d)
                drawn = F.pixel_shuffle(drawn.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            bits = args.forced[si] if si < len(args.forced) else drawn.unsqueeze(1).to(torch.uint8)
            result = runner.residual(si, {"bits": bits, "summed_codes": summed_codes})
            bits_out.append(result["bits"])  # a pass may replace bits (LHEP keeps R_{k-1} where it skips)
            summed_codes = result["summed_codes"]
            last_stage = result.get("next_tokens")
    return GenerationOutput(bits=bits_out, summed_codes=summed_codes,
                            logits=logits_out if args.return_logits else None)
