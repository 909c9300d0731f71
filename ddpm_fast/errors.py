"""User-facing errors: each message is one line naming the problem and the fix.

The CLI prints a ``DDPMFastError`` as that one line (no traceback) and exits with code 2. The subclasses
also derive from ValueError, so library callers that catch ValueError keep working.
"""

from __future__ import annotations

__all__ = ["DDPMFastError", "DataError", "CheckpointError"]


class DDPMFastError(Exception):
    """A user-facing error whose message is one line naming the problem and the fix."""


class DataError(DDPMFastError, ValueError):
    """A dataset or image input that cannot be used (missing, unreadable, wrong shape, dtype or range)."""


class CheckpointError(DDPMFastError, ValueError):
    """A checkpoint or model folder that cannot be loaded or does not match the requested setup."""
