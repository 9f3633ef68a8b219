"""The Infinity adapter: everything graphsurgeon needs to know about the Infinity family.

It works on the reference class here and on the official ``infinity.models.infinity.Infinity`` alike,
because it only uses what both have: ``unregistered_blocks`` (each with ``sa.cached_k/cached_v``),
``add_lvl_embeding``, the blocks' call signature, ``get_logits`` and ``rope2d_freqs_grid``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from graphsurgeon.adapters import ModelAdapter
from graphsurgeon.capture import CapturePlan, ScaleSpec, StateSlot
from graphsurgeon.errors import ConfigError
from graphsurgeon.fidelity import OutputView
from graphsurgeon.images import ImagePipeline, ImageSources, SamplingSettings
from graphsurgeon.runner import ScaleRunner

from .builder import build_infinity
from .kernels import packed_cross_attention_reference
from .sampler import (EagerScaleRunner, GenerateArgs, GenerationOutput, cfg_repeat, check_guidance, generate_checked,
                      kv_caching, validate_generate_args)
from .schedules import PIXEL_PRESETS, get_scale_schedule


def _packed_offsets(lens: list[int], cfg_on: bool) -> torch.Tensor:
    """cu_seqlens of the packed text as the sampler builds it (conditional prompts, then unconditional)."""
    rows = lens + lens if cfg_on else lens
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32)


def _module_paths(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): path for path, module in model.named_modules()}


class InfinityAdapter(ModelAdapter):
    """Adapter for Infinity-2B/8B."""

    name = "infinity"
    default_config = "infinity-tiny"
    pixel_presets = tuple(PIXEL_PRESETS)

    # -- benchmarks: facts about the paper (LD-Pruning, Tables 2 and 4: single H100, batch 1, seconds) -------------
    paper_latency_s = {"infinity-2b": {"baseline": 0.90, "lhep": 0.55, "sats": 0.73, "lhep+sats": 0.52},
                       "infinity-8b": {"baseline": 1.65, "lhep+sats": 0.70}}
    operating_points = {
        # The paper's scales (LHEP on the last 3, SATS on the last 4 of the 13-scale 1024x1024 schedule) with the
        # stop at the first scale where SATS can decide (scale 10: no unconditional branch at 11 and 12) and half
        # of the tokens kept at each LHEP scale. The paper publishes no kept-token counts; see docs/BENCHMARKS.md.
        "paper": {"lhep": {"keep_fraction": {-3: 0.5, -2: 0.5, -1: 0.5}}, "sats": {"stop_scale": -3}},
    }

    def build_model(self, config: Any, device: str = "meta", seed: Optional[int] = None,
                    draw_on_device: bool = False) -> torch.nn.Module:
        """The reference model for a named config or config dict (``meta``: structure only, no weights)."""
        return build_infinity(config, device=device, seed=seed, draw_on_device=draw_on_device)

    def benchmark_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M",
                       seed: int = 0) -> dict[str, Any]:
        """Generation arguments for a benchmark: random text features (prompt lengths 8-24, seeded) and the
        official sampling settings (CFG 3, tau 0.5, top-k 900, top-p 0.97)."""
        generator = torch.Generator().manual_seed(seed)
        lens = torch.randint(8, 25, (batch_size,), generator=generator).tolist()
        kv = torch.randn(sum(lens), model.Ct5, generator=generator).to(model.pos_start.device)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=kv.device)
        return dict(text=(kv, lens, cu, max(lens)), scale_schedule=get_scale_schedule(h_div_w, pn), cfg=3.0, tau=0.5,
                    top_k=900, top_p=0.97, seed=seed)

    def check_settings(self, settings: SamplingSettings) -> None:
        """The preset and aspect ratio have a schedule; cfg and tau pass the sampler's own checks."""
        super().check_settings(settings)
        schedule = get_scale_schedule(settings.h_div_w, settings.pn)
        check_guidance(3.0 if settings.cfg is None else settings.cfg, 1.0 if settings.tau is None else settings.tau,
                       len(schedule))

    def supported_dtypes(self, device_type: str) -> tuple[torch.dtype, ...]:
        """float32 anywhere; bfloat16 on CUDA only: the official inference's bf16 blocks under CUDA autocast (on the
        CPU, bf16 autocast is not that path and is not tested); float16 is no path of the official inference."""
        return (torch.float32, torch.bfloat16) if device_type == "cuda" else (torch.float32,)

    def precision(self, model: Any, dtype: torch.dtype) -> Any:
        """Set the model up for ``dtype`` as the official inference does and return the context to run in:
        float32 anywhere (as built); bfloat16 on CUDA = transformer blocks in bf16 under CUDA bf16 autocast."""
        device = model.pos_start.device
        if dtype == torch.float32:
            return contextlib.nullcontext
        if dtype not in self.supported_dtypes(device.type):
            raise ConfigError(f"dtype {dtype} on {device.type}: the Infinity adapter runs float32 on any device and "
                              "bfloat16 on CUDA (the official inference: bf16 blocks under CUDA autocast)")
        for block in model.unregistered_blocks:
            block.bfloat16()
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)

    # -- comparison (graphsurgeon compare) ----------------------------------------------------------------------
    def output_view(self, output: GenerationOutput) -> OutputView:
        """Bits per scale, the summed codes (B, d, H, W), and the guided logits as (B, positions x bits, 2)."""
        choices = None if output.logits is None else [l.reshape(l.shape[0], -1, 2) for l in output.logits]
        return OutputView(drawn=output.bits, latent=output.summed_codes.squeeze(-3), choices=choices)

    def forced_args(self, generate_kwargs: dict[str, Any], reference: OutputView) -> dict[str, Any]:
        return {**generate_kwargs, "force_bits": reference.drawn, "return_logits": True}

    # -- images (graphsurgeon generate): prompt -> T5 features -> transformer -> BSQ-VAE ------------------------
    def check_sources(self, sources: ImageSources, conditions: list[str]) -> None:
        from .pipeline import check_sources  # the text encoder imports transformers: only when generating images

        check_sources(sources)  # any text is a prompt

    def image_pipeline(self, sources: ImageSources) -> ImagePipeline:
        from .pipeline import image_pipeline

        return image_pipeline(sources)

    def baseline_runner(self, model: Any, args: GenerateArgs) -> EagerScaleRunner:
        """The scale runner the baseline sampler uses (the eager model), for wrapping with observers."""
        return EagerScaleRunner(model, args)

    def validate(self, model: Any, **kwargs: Any) -> GenerateArgs:
        """Check generation arguments exactly as the baseline sampler does, before any work; an ``InputError``
        names the bad (or unknown) argument."""
        return validate_generate_args(model, **kwargs)

    def sample(self, model: Any, args: GenerateArgs, scale_runner: Optional[ScaleRunner] = None) -> GenerationOutput:
        """The baseline sampler (see :func:`model_adapters.infinity.sampler.generate`) on checked arguments."""
        return generate_checked(model, args, scale_runner)

    # -- capture ------------------------------------------------------------------------------------------
    def capture_key(self, model: Any, args: GenerateArgs) -> tuple:
        """What a captured graph set is specialised to: schedule, prompt lengths, CFG doubling, scales run, device."""
        return (tuple(args.schedule), tuple(args.lens), cfg_repeat(args), args.n_run, str(model.pos_start.device))

    def capture_args(self, model: Any, batch_size: int = 1, h_div_w: float = 1.0, pn: str = "1M",
                     text_len: int = 8) -> dict[str, Any]:
        """Generation arguments with placeholder text, for capturing without real prompts (check, export)."""
        lens = [text_len] * batch_size
        kv = torch.zeros(sum(lens), model.Ct5, device=model.pos_start.device)
        # on the host (not the model's device): validation reads the offsets, which a meta tensor cannot give
        cu = torch.tensor([0] + [text_len * (i + 1) for i in range(batch_size)], dtype=torch.int32)
        return dict(text=(kv, lens, cu, text_len), scale_schedule=get_scale_schedule(h_div_w, pn), cfg=3.0)

    def capture_plan(self, model: Any, args: GenerateArgs) -> CapturePlan:
        schedule, lens = args.schedule, args.lens
        batch = len(lens)
        rows = batch * cfg_repeat(args)
        cfg_on = rows != batch
        C, D = model.C, model.D
        meta = dict(device="meta")
        rope_table = model.rope2d_freqs_grid[str(tuple(schedule))]
        common = {
            "cond_gss": torch.empty(rows, 1, 6, C, **meta),
            "cond_BD": torch.empty(rows, D, **meta),
            "text_kv": torch.empty(sum(lens) * rows // batch, D, **meta),
            "text_cu_seqlens": _packed_offsets(lens, cfg_on),  # real values: export runs the graph on examples
            "rope_table": torch.empty(rope_table.shape, dtype=rope_table.dtype, **meta),
        }
        paths = _module_paths(model)
        state = []
        for i, block in enumerate(model.unregistered_blocks):
            state += [StateSlot(f"kv{i}_k", paths[id(block.sa)], "cached_k"), StateSlot(f"kv{i}_v", paths[id(block.sa)], "cached_v")]
        eager = EagerScaleRunner(model, args)  # the plan traces the eager runner's own step functions

        def make_step(si: int, step):
            return lambda m, inputs: step(m, si, inputs)

        scales = [ScaleSpec(index=si, grid=(t, h, w), inputs={"tokens": torch.empty(rows, t * h * w, C, **meta), **common},
                            token_input="tokens", token_axis=1, step=make_step(si, eager.scale_step),
                            row_inputs=("tokens", "cond_gss", "cond_BD"), packed_inputs=("text_kv", "text_cu_seqlens"),
                            logits_output="logits")
                  for si, (t, h, w) in enumerate(schedule)]
        codebook_dim, vae_schedule = args.codebook_dim, args.vae_schedule
        residual = [ScaleSpec(index=si, grid=(t, h, w), token_input=None, token_axis=None,
                              step=make_step(si, eager.residual_step),
                              inputs={"bits": torch.empty(batch, 1, *vae_schedule[si][1:], codebook_dim, dtype=torch.uint8, **meta),
                                      "summed_codes": torch.empty(batch, codebook_dim, *vae_schedule[-1], **meta)},
                              sampled_input="bits", sampled_axes=(2, 3), residual_output="residual",
                              accumulated="summed_codes")
                    for si, (t, h, w) in enumerate(schedule[:args.n_run])]

        @contextlib.contextmanager
        def caching_on():
            """KV caching on for the capture, holding the model's lock (a baseline call on this model in another
            thread uses the same attention modules), with the official flash-attn call routed to the custom op."""
            from .official import packed_attention_as_op

            with kv_caching(model), packed_attention_as_op(model):
                yield

        notes = [f"CFG {'on: rows [0:B] conditional, [B:2B] unconditional' if cfg_on else 'off'}; "
                 f"batch {len(lens)}, text lengths {lens}",
                 "RoPE table is a graph input (rope_table); each attention slices its scale's positions from it",
                 "cross-attention to text is the custom op graphsurgeon_infinity::packed_cross_attention "
                 "(flash-attn on CUDA when installed)"]
        return CapturePlan(model=model, scales=scales, state=state, prepare=caching_on, notes=notes,
                           cfg_batch=batch if cfg_on else None, residual=residual,
                           blocks=tuple(paths[id(block)] for block in model.unregistered_blocks),
                           export_decompositions={torch.ops.graphsurgeon_infinity.packed_cross_attention.default:
                                                  packed_cross_attention_reference})
