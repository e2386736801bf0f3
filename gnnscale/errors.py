"""Exception types. Every error a user can cause is one of these, with a message that says
what was wrong and what to do; the CLI prints it as one line."""

from __future__ import annotations

__all__ = ["GnnscaleError", "InputError", "PartitionFormatError", "UsageError",
           "CommunicationError"]


class GnnscaleError(Exception):
    """Base class of all errors gnnscale raises on purpose."""


class InputError(GnnscaleError):
    """A graph source (file, folder or SPEC) is missing, malformed or not allowed."""


class PartitionFormatError(GnnscaleError):
    """A partition folder is missing, corrupt, of another format version or does not match the
    launch."""


class UsageError(GnnscaleError):
    """The API was called in a way that cannot work (wrong order, wrong shapes, bad options)."""


class CommunicationError(GnnscaleError, RuntimeError):
    """A collective failed: a peer process died or did not answer within the timeout given to
    :func:`gnnscale.init`. The job cannot continue; restart it."""
