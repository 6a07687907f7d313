"""Every error a request can end in, each with the HTTP status a front end answers and a code.

Each subclass of ``TapmaskError`` names its status and a *unique* code in its class line
(``class PromptError(TapmaskError, ValueError, status=400, code="bad_prompt")``). Codes travel:
front ends answer ``{"error": code, "detail": text}``, and a Redis worker's error comes back to
the dispatcher as its code, which ``error_class(code)`` turns into the same class again. A
duplicate code is refused when the class is defined, so one code always means one status.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TapmaskError(Exception):
    """Base class: a request that cannot be served, with the status to report it under."""

    status: int = 500
    code: str = "internal_error"
    _by_code: ClassVar[dict[str, type[TapmaskError]]] = {}

    def __init_subclass__(cls, *, status: int, code: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        taken = TapmaskError._by_code.get(code)
        if taken is not None:
            raise TypeError(f"error code {code!r} of {cls.__name__} is taken by {taken.__name__}")
        cls.status, cls.code = int(status), code
        TapmaskError._by_code[code] = cls

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "detail": str(self)}

    def __str__(self) -> str:  # KeyError subclasses would quote the message
        return str(self.args[0]) if self.args else self.code


TapmaskError._by_code["internal_error"] = TapmaskError


def error_class(code: str) -> type[TapmaskError] | None:
    """The class that answers with ``code``, or None for a code this version does not know."""
    return TapmaskError._by_code.get(code)


def error_codes() -> dict[str, type[TapmaskError]]:
    """Every known code and its class (documentation, tests)."""
    return dict(TapmaskError._by_code)


# -- the request itself ------------------------------------------------------------------------


class BadRequest(TapmaskError, ValueError, status=400, code="bad_request"):
    """A body that is not what the protocol expects: not JSON, not an object, no image field."""


class InvalidRequest(TapmaskError, ValueError, status=422, code="invalid_request"):
    """A well-formed body whose fields do not validate (wrong types, unknown fields)."""


class RequestTooLarge(TapmaskError, ValueError, status=413, code="request_too_large"):
    """A request body, or a count or nesting inside it, over a configured bound."""


class JsonTooDeep(RequestTooLarge, status=413, code="json_too_deep"):
    """A body whose arrays/objects nest deeper than ``TAPMASK_MAX_JSON_DEPTH``."""


class NumberTooLong(RequestTooLarge, status=413, code="number_too_long"):
    """A number literal with more digits than ``TAPMASK_MAX_NUMBER_DIGITS``."""


class TooManyObjects(RequestTooLarge, status=413, code="too_many_objects"):
    """More objects (one model run each) in one request than ``TAPMASK_MAX_OBJECTS``."""


class TooManyClicks(RequestTooLarge, status=413, code="too_many_clicks"):
    """More clicks on one object than ``TAPMASK_MAX_CLICKS``."""


class TooManyInstances(RequestTooLarge, status=413, code="too_many_instances"):
    """More rectangles in one task than ``TAPMASK_MAX_INSTANCES`` masks per image."""


class TooManyTextPrompts(RequestTooLarge, status=413, code="too_many_text_prompts"):
    """More detector phrases for one image than ``TAPMASK_MAX_TEXT_PROMPTS``."""


class TextPromptTooLong(RequestTooLarge, status=413, code="text_prompt_too_long"):
    """A detector text over ``TAPMASK_MAX_TEXT_PROMPT_CHARS`` (or the model's token limit)."""


class DeclaredSizeTooLarge(RequestTooLarge, status=413, code="declared_size_too_large"):
    """A declared image size (Label Studio's ``original_width`` × ``original_height``) over
    ``TAPMASK_MAX_PIXELS``: refused before any image is fetched or any mask is drawn."""


class DeclaredSizeMismatch(TapmaskError, ValueError, status=422, code="declared_size_mismatch"):
    """A declared image size that cannot be the image's: neither its size, nor a scaled copy,
    nor (with an EXIF rotation) its stored frame."""


class UnknownLabel(TapmaskError, ValueError, status=422, code="unknown_label"):
    """A clicked label that no output control defines, and no unambiguous label to use instead."""


class PromptError(TapmaskError, ValueError, status=400, code="bad_prompt"):
    """Clicks or box that cannot be used: non-finite, far outside the image, inverted, empty."""


class LabelConfigError(TapmaskError, ValueError, status=422, code="bad_label_config"):
    """A Label Studio labeling config that cannot be parsed or has no usable controls."""


# -- images ----------------------------------------------------------------------------------


class ImageError(TapmaskError, ValueError, status=400, code="bad_image"):
    """Bytes that are not a readable image."""


class ImageTooLarge(ImageError, status=413, code="image_too_large"):
    """An image over the configured pixel or byte limit (decompression bombs included)."""


class UnknownImage(TapmaskError, KeyError, status=409, code="unknown_image"):
    """An image referred to by its sha256 key that this process has never seen (resend bytes)."""


class ImageFetchError(TapmaskError, status=502, code="image_fetch_failed"):
    """The image URL could not be downloaded (the server answered an error or is unreachable)."""


class BadImageUrl(TapmaskError, ValueError, status=400, code="bad_image_url"):
    """An image URL refused before any connection: unparsable, control characters, a scheme
    other than http(s), a relative path or a data: URI."""


class ImageUrlTooLong(BadImageUrl, status=414, code="image_url_too_long"):
    """An image URL longer than ``TAPMASK_MAX_URL_CHARS``."""


class ImageNotFound(ImageFetchError, status=404, code="image_not_found"):
    """The image URL answered 404."""


class LabelStudioApiError(TapmaskError, RuntimeError, status=502, code="label_studio_api"):
    """Label Studio's REST API refused or failed a call of a whole-project command."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.upstream_status = status


class ImageAuthError(ImageFetchError, status=502, code="image_auth_failed"):
    """The image host refused our credentials (401/403), or the token exchange failed."""


# -- models ----------------------------------------------------------------------------------


class ModelNotFound(TapmaskError, KeyError, status=404, code="unknown_model"):
    """A model name that is not registered or not served here."""


class ModelLoadError(TapmaskError, RuntimeError, status=500, code="model_load_failed"):
    """A model that cannot be built: missing extra, missing or mismatched checkpoint."""


class Unsupported(TapmaskError, RuntimeError, status=400, code="unsupported"):
    """The served model cannot do what the request asks (e.g. export an image embedding)."""


class BadEmbedding(TapmaskError, RuntimeError, status=500, code="bad_embedding"):
    """The served model's embedding is not what the client expects (a configuration error)."""


class EmptyMask(TapmaskError, RuntimeError, status=422, code="empty_mask"):
    """The model found nothing for this prompt; tools break on empty masks, so it is an error."""


# -- capacity and time -------------------------------------------------------------------------


class Unavailable(TapmaskError, RuntimeError, status=503, code="unavailable"):
    """No worker or backing service can take the request right now."""


class DeviceOutOfMemory(Unavailable, status=503, code="device_out_of_memory"):
    """The GPU ran out of memory during this request; the worker freed its caches and serves on."""


class Timeout(TapmaskError, TimeoutError, status=504, code="timeout"):
    """The request was accepted but no result came back in time."""


class ImageTimeout(Timeout, status=504, code="image_timeout"):
    """The image host went silent for ``TAPMASK_DOWNLOAD_READ_TIMEOUT_S`` or the download ran
    past ``TAPMASK_DOWNLOAD_DEADLINE_S``."""


class WorkerReplyError(TapmaskError, RuntimeError, status=502, code="bad_worker_reply"):
    """A worker answered something that is not a tapmask reply (version skew, corruption)."""
