"""Infinity (FoundationVision) family: reference model, checkpoint loading, schedules, baseline sampler."""
from graphsurgeon.adapters import register_adapter

from .adapter import InfinityAdapter
from .builder import build_infinity, init_random_weights
from .checkpoint import load_infinity, read_state_dict
from .config import NAMED_CONFIGS, InfinityConfig, resolve_config
from .model import Infinity, set_text_attention_bf16
from .sampler import GenerationOutput, bits_to_codes, generate
from .schedules import H_DIV_W_TEMPLATES, PIXEL_PRESETS, SCALE_SCHEDULES, get_scale_schedule, identify_schedule
from .vae import (InfinityVAE, build_infinity_vae, check_vae_fits, decode_to_images, load_infinity_vae,
                  vae_codebook_dim)
from .vae_config import NAMED_VAE_CONFIGS, InfinityVaeConfig

# The text encoder (model_adapters.infinity.text_encoder) imports transformers: import it where prompts are encoded.

register_adapter(InfinityAdapter.name, InfinityAdapter)

__all__ = [
    "GenerationOutput", "H_DIV_W_TEMPLATES", "Infinity", "InfinityAdapter", "InfinityConfig", "NAMED_CONFIGS",
    "PIXEL_PRESETS", "SCALE_SCHEDULES", "bits_to_codes", "build_infinity", "generate", "get_scale_schedule",
    "identify_schedule", "init_random_weights", "load_infinity", "read_state_dict", "resolve_config", "set_text_attention_bf16",
    "InfinityVAE", "InfinityVaeConfig", "NAMED_VAE_CONFIGS", "build_infinity_vae", "check_vae_fits", "decode_to_images",
    "load_infinity_vae", "vae_codebook_dim",
]
