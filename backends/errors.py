"""Typed errors shared by every layer.

Each error carries the HTTP status a front end should answer with, so handlers map any failure
to a clear 4xx/5xx JSON body without a table of special cases.
"""

from __future__ import annotations


class TapmaskError(Exception):
    """Base class: a request that cannot be served, with the status to report it under."""

    status: int = 500
    code: str = "internal_error"

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "detail": str(self)}


class PromptError(TapmaskError, ValueError):
    """Clicks or box that cannot be used: non-finite, far outside the image, inverted, empty."""

    status = 400
    code = "bad_prompt"


class ImageError(TapmaskError, ValueError):
    """Bytes that are not a readable image."""

    status = 400
    code = "bad_image"


class ImageTooLarge(ImageError):
    """An image over the configured pixel or byte limit (decompression bombs included)."""

    status = 413
    code = "image_too_large"


class UnknownImage(TapmaskError, KeyError):
    """An image referred to by its sha256 key that this process has never seen (resend bytes)."""

    status = 409
    code = "unknown_image"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown image"


class ModelNotFound(TapmaskError, KeyError):
    """A model name that is not registered or not served here."""

    status = 404
    code = "unknown_model"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


class ModelLoadError(TapmaskError, RuntimeError):
    """A model that cannot be built: missing extra, missing or mismatched checkpoint."""

    status = 500
    code = "model_load_failed"


class EmptyMask(TapmaskError, RuntimeError):
    """The model found nothing for this prompt; tools break on empty masks, so it is an error."""

    status = 422
    code = "empty_mask"


class Unavailable(TapmaskError, RuntimeError):
    """No worker or backing service can take the request right now."""

    status = 503
    code = "unavailable"


class Timeout(TapmaskError, TimeoutError):
    """The request was accepted but no result came back in time."""

    status = 504
    code = "timeout"
