"""Fetching task images from Label Studio (or wherever a task's URL points).

* relative URLs (``/data/upload/…``, ``/data/local-files/?d=…``, ``/tasks/…/presign/…``) resolve
  against the Label Studio host: ``LABEL_STUDIO_URL`` or the ``hostname`` of the project's
  ``/setup`` call;
* the Label Studio ``Authorization`` header goes to that host only, never to a foreign host (S3,
  GCS, a CDN); httpx drops it on cross-origin redirects too;
* two token kinds: legacy tokens (``Token …``) and Personal Access Tokens, which are JWT refresh
  tokens exchanged at ``/api/token/refresh/`` for a short-lived access token (``Bearer …``),
  refreshed shortly before it expires;
* bytes are cached by URL and size-capped; every failure is a ``TapmaskError`` that says what
  went wrong (401/403/404, timeout, not an image, too large);
* a URL is checked before any connection (``check_url``): unparsable, control characters, a
  scheme other than http(s) or longer than ``TAPMASK_MAX_URL_CHARS`` is a 4xx ``bad_image_url``
  / ``image_url_too_long``;
* a host that goes silent for ``TAPMASK_DOWNLOAD_READ_TIMEOUT_S`` (connecting, or between two
  reads) or a download that runs past ``TAPMASK_DOWNLOAD_DEADLINE_S`` (name lookup and a slow
  trickle included: the download runs on its own thread and the caller stops waiting at the
  deadline) is a 504 ``image_timeout``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from backends.cache import LRUCache
from backends.errors import (
    BadImageUrl,
    ImageAuthError,
    ImageError,
    ImageFetchError,
    ImageNotFound,
    ImageTimeout,
    ImageTooLarge,
    ImageUrlTooLong,
)
from backends.settings import (
    DOWNLOAD_DEADLINE_S,
    DOWNLOAD_READ_TIMEOUT_S,
    MAX_IMAGE_MB,
    MAX_URL_CHARS,
    max_bytes,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = max_bytes(MAX_IMAGE_MB)
REFRESH_MARGIN_S = 30.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Credentials:
    """Where Label Studio is and how to authenticate to it."""

    url: str | None
    token: str | None

    @property
    def origin(self) -> tuple[str, str] | None:
        if not self.url:
            return None
        parts = urlsplit(self.url)
        return parts.scheme, parts.netloc


def is_jwt(token: str) -> bool:
    """Personal Access Tokens are JWTs (header.payload.signature); legacy tokens are hex."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


def jwt_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(data["exp"])
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error):
        return None


def _redact(url: str) -> str:
    """URLs may carry signatures or tokens in the query: log them without it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url[:80]
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path
    return shown if len(shown) <= 200 else f"{shown[:200]}…"


def check_url(url: str) -> None:
    """Refuse a task's image URL that no download should be tried for (4xx, no connection).

    ``data:`` URIs are bounded by the image byte limit instead (see ``ImageClient``).
    """
    limit = int(MAX_URL_CHARS)
    if len(url) > limit:
        raise ImageUrlTooLong(
            f"image URL is {len(url)} characters long; at most {limit} (TAPMASK_MAX_URL_CHARS)"
        )
    bad = _CONTROL.search(url)
    if bad:
        raise BadImageUrl(
            f"image URL holds the control character {bad.group()!r} at {bad.start()}: "
            f"{_redact(url)!r}"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: "host:99999" raises here)
    except ValueError as exc:
        raise BadImageUrl(f"image URL {_redact(url)!r} cannot be parsed: {exc}") from None
    if parts.scheme not in ("", "http", "https"):
        raise BadImageUrl(
            f"unsupported image URL scheme {parts.scheme[:20]!r}: expected http(s), a "
            "Label Studio path or a data: URI"
        )
    if parts.scheme and not parts.hostname:
        raise BadImageUrl(f"image URL {_redact(url)!r} has no host")


class TokenAuth:
    """The ``Authorization`` header for a Label Studio: ``Token …`` for a legacy token; for a
    Personal Access Token (a JWT refresh token) ``Bearer …`` with an access token from
    ``/api/token/refresh/``, cached and refreshed shortly before it expires. Tokens never reach
    a log or an error message. Shared by the image client and the REST client (``api.py``)."""

    def __init__(self, http: httpx.Client, timeout: float) -> None:
        self._http = http
        self.timeout = timeout
        self._access: dict[tuple[str, str], tuple[str, float]] = {}  # (url, PAT) → access, exp
        self._lock = threading.Lock()

    def header(self, creds: Credentials) -> dict[str, str]:
        if not creds.token:
            return {}
        if not is_jwt(creds.token):
            return {"Authorization": f"Token {creds.token}"}
        return {"Authorization": f"Bearer {self._access_token(creds)}"}

    def _access_token(self, creds: Credentials) -> str:
        assert creds.url and creds.token
        key = (creds.url, creds.token)
        with self._lock:
            cached = self._access.get(key)
        if cached and cached[1] - REFRESH_MARGIN_S > time.time():
            return cached[0]
        url = urljoin(creds.url.rstrip("/") + "/", "api/token/refresh/")
        try:
            response = self._http.post(url, json={"refresh": creds.token}, timeout=self.timeout)
        except httpx.TimeoutException as exc:
            raise ImageTimeout(f"Label Studio token refresh timed out ({_redact(url)})") from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot reach Label Studio at {_redact(url)}: {exc}") from exc
        if response.status_code != 200:
            raise ImageAuthError(
                f"Label Studio refused the Personal Access Token ({response.status_code} from "
                "/api/token/refresh/): create a new token or check LABEL_STUDIO_API_KEY"
            )
        try:
            access = str(response.json()["access"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageAuthError("Label Studio's token refresh answer has no access token") from exc
        expiry = jwt_expiry(access) or time.time() + 240.0
        with self._lock:
            self._access[key] = (access, expiry)
        return access


class ImageClient:
    """Task images by URL. ``timeout`` (between bytes), ``deadline`` (a whole download) and
    ``max_bytes`` default to ``TAPMASK_DOWNLOAD_READ_TIMEOUT_S``, ``TAPMASK_DOWNLOAD_DEADLINE_S``
    and ``TAPMASK_MAX_IMAGE_MB``, read when the client is made."""

    def __init__(
        self,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        max_bytes: int | None = None,
        cache_bytes: int = 512 * 1024 * 1024,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.timeout = float(DOWNLOAD_READ_TIMEOUT_S) if timeout is None else float(timeout)
        self.deadline = float(DOWNLOAD_DEADLINE_S) if deadline is None else float(deadline)
        self.max_bytes = _max_image_bytes() if max_bytes is None else int(max_bytes)
        self._http = httpx.Client(
            timeout=self.timeout, follow_redirects=True, transport=transport, trust_env=False
        )
        self.cache: LRUCache[bytes] = LRUCache(cache_bytes, "image-bytes")
        self.auth = TokenAuth(self._http, self.timeout)

    def close(self) -> None:
        self._http.close()

    # -- authentication ----------------------------------------------------------------------
    def auth_header(self, creds: Credentials) -> dict[str, str]:
        return self.auth.header(creds)

    # -- fetching -----------------------------------------------------------------------------
    def resolve(self, url: str, creds: Credentials) -> str:
        """The absolute URL to download; ``check_url`` refuses a malformed one first."""
        check_url(url)
        if urlsplit(url).scheme:
            return url
        if not creds.url:
            raise ImageFetchError(
                f"task image {_redact(url)!r} is relative, but the Label Studio address is "
                "unknown: set LABEL_STUDIO_URL (the backend has had no /setup call yet)"
            )
        absolute = urljoin(creds.url.rstrip("/") + "/", url.lstrip("/"))
        try:
            httpx.URL(absolute)
        except httpx.InvalidURL as exc:
            raise BadImageUrl(f"image URL {_redact(absolute)!r} is not valid: {exc}") from None
        return absolute

    def fetch(self, url: str, creds: Credentials) -> bytes:
        if url[:5].lower() == "data:":
            return self._data_uri(url)
        absolute = self.resolve(url, creds)
        cached = self.cache.get(absolute)
        if cached is not None:
            return cached
        parts = urlsplit(absolute)
        same_host = creds.origin == (parts.scheme, parts.netloc)
        headers = self.auth_header(creds) if same_host else {}
        data = self._download(absolute, headers)
        self.cache.put(absolute, data, len(data))
        return data

    def _download(self, url: str, headers: dict[str, str]) -> bytes:
        """``_stream`` on its own thread, waited for until the deadline at most.

        httpx bounds each read (``timeout``) but not a whole download: a host trickling a byte
        every few seconds, or a slow name lookup, would hold the request for as long as it
        likes. At the deadline the caller answers 504 and the thread stops at its next read.
        """
        done: Future[bytes] = Future()
        abandoned = threading.Event()

        def run() -> None:
            try:
                done.set_result(self._stream(url, headers, abandoned))
            except BaseException as exc:  # handed to the waiting caller
                done.set_exception(exc)

        threading.Thread(target=run, name="image-download", daemon=True).start()
        try:
            return done.result(timeout=self.deadline)
        except TimeoutError:
            if done.done():  # the download's own timeout, raised just now
                raise
            abandoned.set()
            raise ImageTimeout(
                f"image download ran past its {self.deadline:g} s deadline "
                f"(TAPMASK_DOWNLOAD_DEADLINE_S): {_redact(url)}"
            ) from None

    def _stream(self, url: str, headers: dict[str, str], abandoned: threading.Event) -> bytes:
        shown = _redact(url)
        try:
            with self._http.stream("GET", url, headers=headers, timeout=self.timeout) as response:
                if response.status_code in (401, 403):
                    raise ImageAuthError(
                        f"image download refused ({response.status_code}) by {shown}: the backend "
                        "needs a valid LABEL_STUDIO_API_KEY (legacy tokens are disabled in new "
                        "organisations: use a Personal Access Token)"
                    )
                if response.status_code == 404:
                    raise ImageNotFound(f"image not found (404): {shown}")
                if response.status_code >= 400:
                    raise ImageFetchError(
                        f"image download failed ({response.status_code}): {shown}"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageTooLarge(
                        f"image at {shown} is {int(declared)} bytes, over the "
                        f"{self.max_bytes}-byte download limit"
                    )
                content_type = response.headers.get("content-type", "")
                if content_type.startswith(("text/html", "application/json")):
                    raise ImageError(
                        f"{shown} answered {content_type.split(';')[0]}, not an image "
                        "(a login page or an error?)"
                    )
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    if abandoned.is_set():  # the caller has answered 504 already
                        return b""
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageTooLarge(
                            f"image at {shown} exceeds the {self.max_bytes}-byte download limit"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise ImageTimeout(
                f"image host silent for {self.timeout:g} s (TAPMASK_DOWNLOAD_READ_TIMEOUT_S): "
                f"{shown}"
            ) from exc
        except httpx.InvalidURL as exc:
            raise BadImageUrl(f"image URL {shown!r} is not valid: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot download {shown}: {exc}") from exc

    def _data_uri(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header[:200]:
            raise ImageError("data: image URIs must be base64-encoded")
        if len(payload) > self.max_bytes // 3 * 4 + 4:
            raise ImageTooLarge(f"data: URI image exceeds the {self.max_bytes}-byte limit")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"data: URI is not valid base64: {exc}") from exc
        if len(data) > self.max_bytes:
            raise ImageTooLarge(f"data: URI image exceeds the {self.max_bytes}-byte limit")
        return data


def _max_image_bytes() -> int:
    return max_bytes(MAX_IMAGE_MB)
