"""Errors a user can act on.

Everything raised as a LockstepError is shown as one line (what is wrong and what to do),
never as a traceback. Anything else escaping is a bug in lockstep.
"""
from __future__ import annotations


class LockstepError(Exception):
    """Base of all user-facing errors."""


class ModelLoadError(LockstepError):
    """The model file or directory is missing, truncated or corrupt."""


class UnsupportedModelError(ModelLoadError):
    """The model is well-formed but uses something lockstep does not support."""


class FetchError(LockstepError):
    """The default model could not be fetched or failed verification."""


class InvalidRequestError(LockstepError):
    """A request or its sampling parameters are invalid."""


class ContextLengthError(InvalidRequestError):
    """A prompt (plus max_tokens) does not fit in the model's context."""


class CapacityError(LockstepError):
    """The KV arena cannot hold what was asked of it."""
