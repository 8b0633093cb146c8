"""Error types raised by modlora.

Every failure caused by bad input (a file, an expert, a field, a flag) is reported as a
``ModloraError`` subclass whose message names the offending file, expert or field, so that
callers never see a traceback from deep inside torch or safetensors.
"""

from __future__ import annotations


class ModloraError(Exception):
    """Base class of every error modlora raises on purpose."""


class ModelLoadError(ModloraError):
    """A base model spec cannot be resolved or loaded."""


class DataError(ModloraError):
    """Task data is missing, malformed or empty."""


class AdapterError(ModloraError):
    """A LoRA adapter directory or tensor set is invalid."""


class LibraryError(ModloraError):
    """An expert library is missing, corrupt, or used inconsistently."""


class BaseModelMismatchError(LibraryError):
    """An expert or library was built for a different base model."""


class RoutingError(ModloraError):
    """A router is configured inconsistently with the library or model."""


class OptionError(ModloraError):
    """A method's option has a value it cannot take (a bad top-k, weight, density, temperature, option name …)."""


class SandboxUnavailableError(ModloraError):
    """The requested isolation for generated code (bubblewrap) cannot run on this system."""
