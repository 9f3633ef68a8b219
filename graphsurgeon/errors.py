"""Error types. Every error names the key, file or module it is about, so a user can act on it."""


class GraphsurgeonError(ValueError):
    """Base class for errors raised on bad input before any work starts."""


class ConfigError(GraphsurgeonError):
    """A configuration value (model, pass or run) is invalid."""


class CheckpointError(GraphsurgeonError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class InputError(GraphsurgeonError):
    """A runtime input (conditions, scale schedule, forced values) is inconsistent."""
