"""graphsurgeon: a torch.fx model-surgery compiler for next-scale-prediction image generators."""
from .adapters import ModelAdapter, get_adapter, register_adapter
from .api import optimize
from .emit import OptimizedModel
from .errors import CheckpointError, ConfigError, GraphsurgeonError, InputError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GraphsurgeonError",
    "InputError",
    "ModelAdapter",
    "OptimizedModel",
    "get_adapter",
    "optimize",
    "register_adapter",
]
__version__ = "0.1.0"
