"""VAR (FoundationVision) family: reference transformer and VQVAE, checkpoint loading, baseline sampler."""
from .builder import build_var, init_random_var_weights
from .checkpoint import load_var, load_var_vqvae
from .config import NAMED_CONFIGS, PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, resolve_var_config
from .model import VAR
from .sampler import (EagerRunner, VARGenerateArgs, VAROutput, decode, generate, generate_checked,
                      residual_step, scale_step, validate_generate_args)
from .vqvae import VQVAE, VectorQuantizer2, build_var_vqvae, init_random_vqvae_weights

__all__ = [
    "EagerRunner", "NAMED_CONFIGS", "PATCH_NUMS_256", "PATCH_NUMS_512", "VAR", "VARConfig", "VARGenerateArgs",
    "VAROutput", "VQVAE", "VectorQuantizer2", "build_var", "build_var_vqvae", "decode", "generate",
    "generate_checked", "init_random_var_weights", "init_random_vqvae_weights", "load_var", "load_var_vqvae",
    "resolve_var_config", "residual_step", "scale_step", "validate_generate_args",
]

from graphsurgeon.adapters import register_adapter  # noqa: E402

from .adapter import VARAdapter  # noqa: E402

register_adapter(VARAdapter.name, VARAdapter)
