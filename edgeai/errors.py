"""User-facing errors: one line saying the cause and one saying what to do."""

from __future__ import annotations


class EdgeAIError(Exception):
    """An error caused by input or environment, shown to the user without a traceback.

    Args:
        message: what went wrong, one line.
        hint: what the user can do about it, one line (optional).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ModelNotFound(EdgeAIError):
    exit_code = 2


class InvalidInput(EdgeAIError):
    exit_code = 2


class DownloadError(EdgeAIError):
    exit_code = 3


class ResourceError(EdgeAIError):
    """Not enough disk or memory."""

    exit_code = 4


class UnsupportedModel(EdgeAIError):
    exit_code = 5
