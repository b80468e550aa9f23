"""Errors that the CLI turns into one-line messages (never a traceback)."""


class QuantbenchError(Exception):
    """Base class: anything a user can cause by bad input."""


class QuantConfigError(QuantbenchError, ValueError):
    """A method spec string names an unknown method or a bad option."""


class ModelLoadError(QuantbenchError):
    """A model path/spec cannot be resolved or loaded."""


class CheckpointError(QuantbenchError):
    """A saved quantized checkpoint is missing, truncated, corrupt or from an unknown method."""


class GenerationError(QuantbenchError, ValueError):
    """Bad generation arguments (a prompt too long, a bad temperature, no tokenizer...)."""
