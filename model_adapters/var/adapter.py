"""The VAR adapter: what graphsurgeon needs to know about FoundationVision/VAR (class-conditional, VQ codebook).

It only uses what the reference class here and the official ``models.var.VAR`` both have (``blocks[i].attn``
with ``cached_k``/``cached_v``, ``shared_ada_lin``, ``get_logits``, ``word_embed``, ``lvl_embed``, ``pos_1LC``, the
VQVAE's ``quantize.quant_resi`` and ``quantize.embedding``), so it captures either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from graphsurgeon.adapters import ModelAdapter
from graphsurgeon.capture import CapturePlan, ScaleSpec, StateSlot
from graphsurgeon.errors import InputError
from graphsurgeon.fidelity import OutputView
from graphsurgeon.images import ImagePipeline, ImageSources, SamplingSettings
from graphsurgeon.runner import ScaleRunner

from .builder import build_var
from .sampler import (EagerRunner, VARGenerateArgs, VAROutput, check_cfg, decode, generate_checked, kv_caching,
                      model_device, residual_step, scale_step, validate_generate_args)
from .vqvae import build_var_vqvae


@dataclass(frozen=True)
class VARCall:
    """One checked call: the VQVAE whose quantizer the residual steps run, and the sampler's arguments."""

    vae: Any
    args: VARGenerateArgs


class _ModelAndVAE(torch.nn.Module):
    """The capture root: the transformer and the VQVAE, whose quantizer (codebook, Phi) the residual step calls.
    Holds both as submodules (no copy), so that every module a step calls has a path."""

    def __init__(self, model: torch.nn.Module, vae: torch.nn.Module):
        super().__init__()
        self.var, self.vae = model, vae


class VARAdapter(ModelAdapter):
    """Adapter for VAR-d16/d20/d24/d30 (256 px) and any depth or patch schedule (``VARConfig``)."""

    name = "var"
    default_config = "var-tiny"
    operating_points = {
        # The LD-Pruning paper's scale choice carried over (LHEP on the last 3 scales, SATS on the last 4, stop at
        # the first scale where SATS can decide) with half of the tokens kept at each LHEP scale.
        "paper": {"lhep": {"keep_fraction": {-3: 0.5, -2: 0.5, -1: 0.5}}, "sats": {"stop_scale": -3}},
    }

    def build_model(self, config: Any, device: str = "meta", seed: Optional[int] = None,
                    draw_on_device: bool = False) -> torch.nn.Module:
        return build_var(config, device=device, seed=seed)

    def validate(self, model: Any, vae: Any = None, **kwargs: Any) -> VARCall:
        """The sampler's checks (labels, cfg, top-k/p, seed, forced indices, the VQVAE fitting the model)."""
        if vae is None:
            raise InputError("generate needs the argument vae (the VQVAE: its quantizer maps codes to the next input)")
        return VARCall(vae=vae, args=validate_generate_args(model, vae, **kwargs))

    def sample(self, model: Any, call: VARCall, scale_runner: Optional[ScaleRunner] = None) -> VAROutput:
        return generate_checked(model, call.vae, call.args, scale_runner)

    def output_view(self, output: VAROutput) -> OutputView:
        """Indices per scale, f_hat, and the guided logits over the codebook."""
        return OutputView(drawn=output.indices, latent=output.f_hat, choices=output.logits)

    def preview_decoder(self, model: Any, call: VARCall):
        """The call's VQVAE: f_hat -> pictures in [0, 1] (what SkipVAR's features read)."""
        return lambda f_hat: decode(call.vae, f_hat)

    def forced_args(self, generate_kwargs: dict[str, Any], reference: OutputView) -> dict[str, Any]:
        return {**generate_kwargs, "force_indices": reference.drawn, "return_logits": True}

    def check_settings(self, settings: SamplingSettings) -> None:
        """cfg passes the sampler's check; VAR has one schedule per model (no presets) and no temperature."""
        if settings.cfg is not None:
            check_cfg(settings.cfg)

    def check_sources(self, sources: ImageSources, conditions: list[str]) -> None:
        from .pipeline import check_sources

        check_sources(sources, conditions)

    def image_pipeline(self, sources: ImageSources) -> ImagePipeline:
        from .pipeline import image_pipeline

        return image_pipeline(sources)

    def baseline_runner(self, model: Any, call: VARCall) -> EagerRunner:
        return EagerRunner(model, call.vae)

    def capture_key(self, model: Any, call: VARCall) -> tuple:
        """Graphs depend on the batch and the VQVAE object (its quantizer is in the residual graphs), not on labels."""
        return call.args.batch, id(call.vae), str(model_device(model))

    def capture_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M") -> dict[str, Any]:
        """Class 0 for every image and a VQVAE of the model's codebook (on meta: no weights). VAR has one square
        schedule per model (its ``patch_nums``), so ``h_div_w`` and ``pn`` do not apply."""
        return dict(vae=_placeholder_vae(model, seed=None), labels=torch.zeros(batch_size, dtype=torch.long), cfg=1.5)

    def benchmark_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M",
                       seed: int = 0) -> dict[str, Any]:
        """Seeded random labels and the official demo's sampling settings (cfg 4, top-k 900, top-p 0.95)."""
        labels = torch.randint(model.num_classes, (batch_size,), generator=torch.Generator().manual_seed(seed))
        return dict(vae=_placeholder_vae(model, seed=seed), labels=labels.to(model_device(model)), cfg=4.0,
                    top_k=900, top_p=0.95, seed=seed)

    def capture_plan(self, model: Any, call: VARCall) -> CapturePlan:
        batch, rows = call.args.batch, 2 * call.args.batch  # VAR always runs both CFG halves
        n_scales, final = len(model.patch_nums), model.patch_nums[-1]
        dtype = model.class_emb.weight.dtype
        meta = dict(device="meta", dtype=dtype)

        def scale_at(si: int):
            return lambda root, inputs: scale_step(root.var, si, inputs)

        def residual_at(si: int):
            return lambda root, inputs: residual_step(root.var, root.vae, si, n_scales, inputs)

        scales = [ScaleSpec(index=si, grid=(1, pn, pn), step=scale_at(si), token_input="tokens", token_axis=1,
                            inputs={"tokens": torch.empty(rows, pn * pn, model.C, **meta),
                                    "cond_BD": torch.empty(rows, model.class_emb.embedding_dim, **meta)},
                            row_inputs=("tokens", "cond_BD"), logits_output="logits")
                  for si, pn in enumerate(model.patch_nums)]
        residual = [ScaleSpec(index=si, grid=(1, pn, pn), step=residual_at(si), token_input=None, token_axis=None,
                              inputs={"codes": torch.empty(batch, model.Cvae, pn, pn, **meta),
                                      "f_hat": torch.empty(batch, model.Cvae, final, final, **meta)},
                              sampled_input="codes", sampled_axes=(2, 3), residual_output="residual",
                              accumulated="f_hat")
                    for si, pn in enumerate(model.patch_nums)]
        state = [StateSlot(f"kv{i}_{kind}", f"var.blocks.{i}.attn", f"cached_{kind}")
                 for i in range(len(model.blocks)) for kind in "kv"]
        notes = [f"CFG always on: rows [0:{batch}] conditional, [{batch}:{rows}] unconditional (class {model.num_classes})",
                 "level and position embeddings are added in the residual step (next_tokens), as the official sampler does",
                 "the residual step runs the VQVAE's Phi (quant_resi) and codebook: the capture root holds both models"]
        return CapturePlan(model=_ModelAndVAE(model, call.vae), scales=scales, state=state, residual=residual,
                           prepare=lambda: kv_caching(model), cfg_batch=batch, notes=notes,
                           blocks=tuple(f"var.blocks.{i}" for i in range(len(model.blocks))))


def _placeholder_vae(model: Any, seed: Optional[int]) -> torch.nn.Module:
    """A VQVAE fitting ``model`` for commands without a checkpoint: random (``seed``) or structure only (meta).
    Sampling runs only its quantizer (codebook and Phi), so a narrow encoder/decoder (``ch`` 32) does."""
    device = model_device(model)
    return build_var_vqvae(device=device, seed=None if device.type == "meta" else seed, V=model.V, Cvae=model.Cvae,
                           ch=32, patch_nums=model.patch_nums)
