"""Typed errors of the data plane; each carries the field or resource at fault."""

from __future__ import annotations


class PdserveError(Exception):
    """Base class of every pdserve error."""


class InvalidRequestError(PdserveError, ValueError):
    """A request parameter is invalid; ``field`` names it (e.g. ``sampling_params.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # pickle (Ray sends errors between processes) by the real arguments
        return type(self), (self.field, self.message)


class OutOfBlocksError(PdserveError):
    """The block pool cannot satisfy an allocation."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} free KV blocks, only {free} available")
        self.needed = needed
        self.free = free

    def __reduce__(self):
        return type(self), (self.needed, self.free)


class ModelLoadError(PdserveError):
    """A model folder is missing, incomplete or of an unsupported architecture."""


class RequestAbortedError(PdserveError):
    """The request was aborted before it finished."""


class UnavailableError(PdserveError):
    """No worker can take the request right now; the client may retry."""


class QueueFullError(PdserveError):
    """A queue or rate limit is full; the client should back off."""
