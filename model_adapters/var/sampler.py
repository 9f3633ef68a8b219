"""The baseline (unaccelerated) VAR sampler: the official ``VAR.autoregressive_infer_cfg``.

It drives the transformer and the VQVAE only through attributes the official classes have, so it samples
the re-implementation here and an unchanged official ``VAR`` / ``VQVAE`` alike, with the same results bit for
bit. Behaviour that decides the output, kept exactly as the official code does it:
- CFG runs on a doubled batch: rows [0:B] conditional, [B:2B] the unconditional class ``num_classes``. The
  guidance ramps linearly over the scales: ``t = cfg * (si / (N - 1))`` and logits ``(1 + t) * cond - t * uncond``
  (so the first scale is unguided).
- With ``seed``, one generator on the model's device, seeded once, serves every draw in this order: the
  random labels (``multinomial`` over ``uniform_prob``, only when no labels are given), then per scale the
  token draw (one ``multinomial`` over all positions after top-k / top-p filtering) and, with ``more_smooth``,
  the Gumbel noise. Without ``seed`` torch's default generator is used.
- ``more_smooth`` (the official visualisation option) embeds a scale as the Gumbel-softmax mixture of
  codebook entries, from the filtered guided logits times ``1 + si / (N - 1)`` at temperature
  ``max(0.27 * (1 - 0.95 * si / (N - 1)), 0.005)``.
- A scale's code map is upsampled bicubically to the last grid (not at the last scale), refined by the Phi the
  VQVAE picks for ``si / (N - 1)`` and added to ``f_hat``; the next scale's tokens are the area-downsampled
  ``f_hat`` through ``word_embed`` plus that scale's level and position embeddings.
- Teacher forcing (``force_indices``) still draws, then replaces the indices, so the random stream of later
  scales is the one an unforced run sees.

The loop is written around a runner (:class:`EagerRunner` by default): graphsurgeon substitutes a runner that
executes captured graphs of :func:`scale_step` and :func:`residual_step`. Every argument is checked by
:func:`validate_generate_args` before any work; a bad one is an ``InputError`` naming it.

Threads: the eager runner keeps the attention KV caches in the model's modules, so eager runs of one model are
serialised (:func:`graphsurgeon.runner.model_lock`, held while an :class:`EagerRunner` is entered).
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
from graphsurgeon.runner import ScaleRunner, StepRunner, stateful_mode


@dataclass
class VAROutput:
    indices: list[torch.Tensor]
    """Per scale, int64 (B, pn*pn): the sampled indices, or the forced ones where ``force_indices`` gave them."""
    f_hat: torch.Tensor
    """float32 (B, Cvae, P, P): the accumulated code maps the VQVAE decodes (see :func:`decode`)."""
    logits: Optional[list[torch.Tensor]] = None
    """With ``return_logits``: per scale, the guided logits (B, pn*pn, V) before top-k / top-p filtering."""
    stats: Optional[dict[str, Any]] = None
    """Set by graphsurgeon's optimized runs (what each pass did); the baseline sampler leaves it None."""


# ---------------------------------------------------------------------------------------------------------------
# The two per-scale regions (what graphsurgeon captures), and the eager runner that executes them.

def scale_step(model, si: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One scale through the transformer: ``inputs["tokens"]`` (2B, pn*pn, C) with level and position embeddings
    already added, ``inputs["cond_BD"]`` (2B, D) class embeddings -> ``{"logits": (2B, pn*pn, V)}`` (unguided).

    The attention modules read and extend their KV caches (module state) while caching is on.
    """
    cond_BD = inputs["cond_BD"]
    cond_BD_or_gss = model.shared_ada_lin(cond_BD)
    x = inputs["tokens"]
    for block in model.blocks:
        x = block(x=x, cond_BD=cond_BD_or_gss, attn_bias=None)
    # the head as ``get_logits`` computes it without fused add-norm; called directly because the official
    # ``get_logits`` branches on ``isinstance(h, torch.Tensor)``, which a traced value is not
    return {"logits": model.head(model.head_nm(x.float(), cond_BD).float()).float()}


def level_position_embedding(model, si: int) -> torch.Tensor:
    """(1, pn*pn, C) level + position embedding of the tokens of scale ``si``."""
    begin = sum(pn * pn for pn in model.patch_nums[:si])
    end = begin + model.patch_nums[si] ** 2
    return model.lvl_embed(model.lvl_1L[:, begin:end]) + model.pos_1LC[:, begin:end]


def residual_step(model, vae, si: int, n_scales: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A scale's code map R_k -> the updated ``f_hat`` and (except at the last scale) the next scale's tokens.

    ``inputs["codes"]`` (B, Cvae, pn, pn), ``inputs["f_hat"]`` (B, Cvae, P, P). Returns ``"residual"`` (the codes
    as given), ``"f_hat"`` and ``"next_tokens"`` (2B, next pn*pn, C), the same tokens for both CFG halves.
    Out of place throughout (the inputs are not modified); the values equal the official in-place update.
    """
    codes, f_hat = inputs["codes"], inputs["f_hat"]
    quant = vae.quantize
    P = f_hat.shape[-1]
    phi = quant.quant_resi[si / (n_scales - 1)]
    if si == n_scales - 1:
        return {"residual": codes, "f_hat": f_hat + phi(codes)}
    f_hat = f_hat + phi(F.interpolate(codes, size=(P, P), mode="bicubic"))
    pn_next = model.patch_nums[si + 1]
    B, Cvae = f_hat.shape[:2]
    down = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area").view(B, Cvae, -1).transpose(1, 2)
    tokens = model.word_embed(down) + level_position_embedding(model, si + 1)
    return {"residual": codes, "f_hat": f_hat, "next_tokens": tokens.repeat(2, 1, 1)}


def kv_caching(model) -> ContextManager[None]:
    """The attention KV caches on for one generation (or one capture), holding the model's lock: two runs of one
    model at once would share, and reset, each other's caches, so the second waits for the first."""
    def switch(on: bool) -> None:
        for block in model.blocks:
            block.attn.kv_caching(on)
    return stateful_mode(model, switch)


class EagerRunner(StepRunner):
    """Runs the per-scale regions (:func:`scale_step`, :func:`residual_step`) on the modules themselves; the
    attention modules keep the KV caches, under :func:`kv_caching`."""

    def __init__(self, model, vae):
        n_scales = len(model.patch_nums)
        super().__init__(model, scale_step, lambda m, si, inputs: residual_step(m, vae, si, n_scales, inputs),
                         sampled_input="codes", context=lambda: kv_caching(model))


# ---------------------------------------------------------------------------------------------------------------
# Sampling helpers (the official sample_with_top_k_top_p_ and gumbel_softmax_with_rng, out of place)

def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (B, l, V) with the tokens outside the top-k and outside the top-p nucleus set to -inf.

    ``top_k`` 0 (or >= V) and ``top_p`` 0 disable the respective filter. The nucleus keeps, in ascending order of
    probability, every token whose cumulative probability exceeds ``1 - top_p``, and always the most likely one.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits = logits.masked_fill(drop_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, drop_sorted), -torch.inf)
    return logits


def draw_indices(filtered: torch.Tensor, rng: Optional[torch.Generator]) -> torch.Tensor:
    """One index per position of ``filtered`` (B, l, V) with probabilities softmax(filtered); (B, l) int64."""
    batch, length, vocab = filtered.shape
    probs = filtered.softmax(dim=-1).view(-1, vocab)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=rng).view(batch, length)


def gumbel_soft_codes(logits: torch.Tensor, tau: float, codebook: torch.Tensor,
                      rng: Optional[torch.Generator]) -> torch.Tensor:
    """Soft Gumbel-softmax weights over the codebook at temperature ``tau``, times the codebook: (B, l, Cvae)."""
    noise = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    weights = ((logits + noise) / tau).softmax(dim=-1)
    return weights @ codebook.unsqueeze(0)


def decode(vae, f_hat: torch.Tensor) -> torch.Tensor:
    """(B, Cvae, P, P) accumulated codes -> (B, 3, 16P, 16P) images in [0, 1] (the official de-normalisation)."""
    with torch.no_grad():
        return vae.fhat_to_img(f_hat).add(1).mul(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks

@dataclass(frozen=True)
class VARGenerateArgs:
    """The arguments of one ``generate`` call, checked and normalised."""

    labels: Optional[torch.Tensor]
    """int64 (B,) on the model's device, or None: drawn at random from ``uniform_prob`` (with the seed)."""
    batch: int
    cfg: float
    top_k: int
    top_p: float
    seed: Optional[int]
    more_smooth: bool
    forced: list[torch.Tensor]
    return_logits: bool


SEED_RANGE = (-2 ** 63, 2 ** 64)
"""Seeds torch's generator takes; a negative seed s draws as s + 2**64 (torch's rule, so the official code's)."""


def _as_int(value: Any) -> Optional[int]:
    """``value`` as an int if it is one (Python, NumPy or a one-element integer tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def model_device(model) -> torch.device:
    return model.lvl_1L.device


def check_vae_fits(model, vae) -> None:
    """The VQVAE must have the model's latent channels, codebook size and scale schedule, on its device."""
    for attr in ("Cvae", "vocab_size", "quantize"):
        if not hasattr(vae, attr):
            raise InputError(f"vae has no attribute {attr!r}; pass the VQVAE the model was trained with")
    if vae.Cvae != model.Cvae:
        raise InputError(f"vae has Cvae {vae.Cvae} latent channels; the model expects {model.Cvae}")
    if vae.vocab_size != model.V:
        raise InputError(f"vae codebook has {vae.vocab_size} entries; the model's head predicts {model.V}")
    if tuple(vae.quantize.v_patch_nums) != tuple(model.patch_nums):
        raise InputError(f"vae patch_nums {tuple(vae.quantize.v_patch_nums)} differ from the model's "
                         f"{tuple(model.patch_nums)}; build the VQVAE with the model's schedule")
    if tuple(vae.quantize.embedding.weight.shape) != (model.V, model.Cvae):
        raise InputError(f"vae codebook has shape {tuple(vae.quantize.embedding.weight.shape)}, "
                         f"expected {(model.V, model.Cvae)}")
    if vae.quantize.embedding.weight.device != model_device(model):
        raise InputError(f"vae is on {vae.quantize.embedding.weight.device} but the model is on {model_device(model)}")


def _check_labels(model, labels: Any, B: Any) -> tuple[Optional[torch.Tensor], int]:
    """Labels as int64 (B,) on the model's device (None: random), and the batch size."""
    num_classes = model.num_classes
    device = model_device(model)
    batch = None if B is None else _as_int(B)
    if B is not None and (batch is None or batch <= 0):
        raise InputError(f"B must be a positive int, got {B!r}")
    single = labels is None or (not isinstance(labels, torch.Tensor) and _as_int(labels) is not None)
    if single:
        if batch is None:
            raise InputError("B is required when labels is None (random labels) or a single int (one label for all)")
        if labels is None:
            return None, batch
        label = _as_int(labels)
        if label > num_classes:
            raise InputError(f"labels {label} is out of range: classes are 0..{num_classes - 1}, and {num_classes} "
                             "or a negative value means unconditional")
        return torch.full((batch,), num_classes if label < 0 else label, dtype=torch.int64, device=device), batch
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise InputError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.ndim != 1:
            raise InputError(f"labels must be 1-D (B,), got shape {tuple(labels.shape)}")
        values = labels
    elif isinstance(labels, (list, tuple)) and all(_as_int(v) is not None for v in labels):
        values = torch.tensor([_as_int(v) for v in labels], dtype=torch.int64)
    else:
        raise InputError(f"labels must be None, an int, a list of ints or an int64 tensor (B,), got {labels!r}")
    if values.numel() == 0:
        raise InputError("labels is empty: the batch must hold at least one image")
    if batch is not None and batch != values.numel():
        raise InputError(f"B is {batch} but labels has {values.numel()} entries")
    if bool(((values < 0) | (values > num_classes)).any()):
        raise InputError(f"labels {values.tolist()} out of range: classes are 0..{num_classes - 1}, and "
                         f"{num_classes} is the unconditional class")
    return values.to(device=device, dtype=torch.int64), values.numel()


def _check_forced(model, force_indices: Any, batch: int) -> list[torch.Tensor]:
    if force_indices is None:
        return []
    patch_nums = model.patch_nums
    if not isinstance(force_indices, (list, tuple)):
        raise InputError(f"force_indices must be a list of per-scale tensors, got {type(force_indices).__name__}")
    if len(force_indices) > len(patch_nums):
        raise InputError(f"force_indices has {len(force_indices)} scales; the model has {len(patch_nums)}")
    forced = []
    for si, idx in enumerate(force_indices):
        shape = (batch, patch_nums[si] ** 2)
        if not isinstance(idx, torch.Tensor) or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise InputError(f"force_indices[{si}] must be an integer tensor {shape}, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if tuple(idx.shape) != shape:
            raise InputError(f"force_indices[{si}] has shape {tuple(idx.shape)}, expected {shape} (B, pn*pn)")
        if bool(((idx < 0) | (idx >= model.V)).any()):
            raise InputError(f"force_indices[{si}] holds values outside the codebook [0, {model.V})")
        forced.append(idx.to(device=model_device(model), dtype=torch.int64))
    return forced


CFG_LIMIT = 1000.0
"""The largest guidance scale accepted (the official demo uses 4): far beyond it the guided logits
``(1 + t) * cond - t * uncond`` overflow to inf and sampling fails inside torch."""


def check_cfg(cfg: Any) -> float:
    """The guidance scale as a float: a finite number within [-CFG_LIMIT, CFG_LIMIT]."""
    if not isinstance(cfg, numbers.Real) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise InputError(f"cfg must be a finite number, got {cfg!r}")
    if abs(cfg) > CFG_LIMIT:
        raise InputError(f"cfg must be within [-{CFG_LIMIT:g}, {CFG_LIMIT:g}] (the official value is 4), got {cfg:g}")
    return float(cfg)


def _check_args(model, vae, labels, B, cfg, top_k, top_p, seed, more_smooth, force_indices,
                return_logits) -> VARGenerateArgs:
    check_vae_fits(model, vae)
    cfg = check_cfg(cfg)
    k = _as_int(top_k)
    if k is None or k < 0:
        raise InputError(f"top_k must be an int >= 0, got {top_k!r}")
    if not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0.0 <= top_p <= 1.0:
        raise InputError(f"top_p must be a number in [0, 1], got {top_p!r}")
    seed_value = None if seed is None else _as_int(seed)
    if seed is not None and (seed_value is None or not SEED_RANGE[0] <= seed_value < SEED_RANGE[1]):
        raise InputError(f"seed must be None or an int in [-2**63, 2**64) (torch's generator), got {seed!r}")
    for name, value in (("more_smooth", more_smooth), ("return_logits", return_logits)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be a bool, got {value!r}")
    label_tensor, batch = _check_labels(model, labels, B)
    forced = _check_forced(model, force_indices, batch)
    if forced and more_smooth:
        raise InputError("force_indices cannot be combined with more_smooth: smooth codes are mixtures of "
                         "codebook entries, not the indices being forced")
    return VARGenerateArgs(labels=label_tensor, batch=batch, cfg=float(cfg), top_k=k, top_p=float(top_p),
                           seed=seed_value, more_smooth=more_smooth, forced=forced, return_logits=return_logits)


# ---------------------------------------------------------------------------------------------------------------
# The sampler

@torch.no_grad()
def generate(model, vae, labels: Union[None, int, Sequence[int], torch.Tensor] = None, B: Optional[int] = None,
             cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: Optional[int] = None,
             more_smooth: bool = False, force_indices: Optional[Sequence[torch.Tensor]] = None,
             return_logits: bool = False, runner: Optional[ScaleRunner] = None) -> VAROutput:
    """Sample all scales for ``labels``; see the module docstring. Decode the result with :func:`decode`.

    ``labels``: None (B labels drawn at random, needs ``B``), one int for all B images (a negative value, or
    ``num_classes``, is the unconditional class), or per image a list / integer tensor (B,). ``force_indices``:
    per scale (a prefix of the scales is fine) int64 (B, pn*pn) indices that replace the drawn ones.
    ``runner`` (a :class:`graphsurgeon.runner.ScaleRunner`) replaces the eager runner; graphsurgeon passes one
    over its captured graphs.
    """
    args = validate_generate_args(model, vae, labels=labels, B=B, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed,
                                  more_smooth=more_smooth, force_indices=force_indices, return_logits=return_logits)
    return generate_checked(model, vae, args, runner)


_GENERATE_PARAMETERS = {name: p for name, p in inspect.signature(generate).parameters.items()
                        if name not in ("model", "vae", "runner")}


def validate_generate_args(model, vae, **kwargs: Any) -> VARGenerateArgs:
    """Check the keyword arguments of :func:`generate` (all but ``runner``) as it does, before any work.

    Unknown names are an ``InputError`` too, so that a caller holding ``**kwargs`` (graphsurgeon's optimized
    model) rejects exactly what the baseline rejects, with the same message.
    """
    unknown = sorted(set(kwargs) - set(_GENERATE_PARAMETERS))
    if unknown:
        raise InputError(f"unknown generate argument(s) {unknown}; the arguments are {list(_GENERATE_PARAMETERS)}")
    return _check_args(model, vae, **{name: kwargs.get(name, p.default) for name, p in _GENERATE_PARAMETERS.items()})


@torch.no_grad()
def generate_checked(model, vae, args: VARGenerateArgs, runner: Optional[ScaleRunner] = None) -> VAROutput:
    """The sampling loop of :func:`generate` on checked arguments (see :func:`validate_generate_args`)."""
    device = model_device(model)
    B, N = args.batch, len(model.patch_nums)
    rng = None
    if args.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(args.seed)
    labels = args.labels
    if labels is None:
        uniform = model.uniform_prob.to(device)
        labels = torch.multinomial(uniform, num_samples=B, replacement=True, generator=rng).reshape(B)

    sos = cond_BD = model.class_emb(torch.cat((labels, torch.full_like(labels, fill_value=model.num_classes)), dim=0))
    first_l = model.first_l
    tokens = (sos.unsqueeze(1).expand(2 * B, first_l, -1) + model.pos_start.expand(2 * B, first_l, -1)
              + level_position_embedding(model, 0))
    P = model.patch_nums[-1]
    f_hat = sos.new_zeros(B, model.Cvae, P, P)
    codebook = vae.quantize.embedding

    indices_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []
    with runner or EagerRunner(model, vae) as r:
        for si, pn in enumerate(model.patch_nums):
            logits = r.scale(si, {"tokens": tokens, "cond_BD": cond_BD})["logits"]
            ratio = si / (N - 1)
            t = args.cfg * ratio
            logits = r.guide(si, logits, B, lambda c, u, t=t: (1 + t) * c - t * u)
            if args.return_logits:
                logits_out.append(logits)
            filtered = filter_top_k_top_p(logits, args.top_k, args.top_p)
            idx = draw_indices(filtered, rng)
            if si < len(args.forced):
                idx = args.forced[si]
            if args.more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                codes = gumbel_soft_codes(filtered.mul(1 + ratio), tau, codebook.weight, rng)
            else:
                codes = codebook(idx)
            codes = codes.transpose(1, 2).reshape(B, model.Cvae, pn, pn)
            out = r.residual(si, {"codes": codes, "f_hat": f_hat})
            f_hat = out["f_hat"]
            tokens = out.get("next_tokens")
            indices_out.append(idx)
    return VAROutput(indices=indices_out, f_hat=f_hat, logits=logits_out if args.return_logits else None)
