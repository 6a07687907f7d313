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
  went wrong (401/403/404, timeout, not an image, too large).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from backends.cache import LRUCache
from backends.errors import (
    ImageAuthError,
    ImageError,
    ImageFetchError,
    ImageNotFound,
    ImageTooLarge,
    Timeout,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
REFRESH_MARGIN_S = 30.0


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
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path


class ImageClient:
    def __init__(
        self,
        *,
        timeout: float = 30.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_bytes: int = 512 * 1024 * 1024,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self._http = httpx.Client(
            timeout=timeout, follow_redirects=True, transport=transport, trust_env=False
        )
        self.cache: LRUCache[bytes] = LRUCache(cache_bytes, "image-bytes")
        self._access: dict[tuple[str, str], tuple[str, float]] = {}  # (url, PAT) → access, exp
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # -- authentication ----------------------------------------------------------------------
    def auth_header(self, creds: Credentials) -> dict[str, str]:
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
            response = self._http.post(url, json={"refresh": creds.token})
        except httpx.TimeoutException as exc:
            raise Timeout(f"Label Studio token refresh timed out ({_redact(url)})") from exc
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

    # -- fetching -----------------------------------------------------------------------------
    def resolve(self, url: str, creds: Credentials) -> str:
        if url.startswith(("http://", "https://")):
            return url
        if url.startswith("/") or not urlsplit(url).scheme:
            if not creds.url:
                raise ImageFetchError(
                    f"task image {url!r} is relative, but the Label Studio address is unknown: "
                    "set LABEL_STUDIO_URL (the backend has had no /setup call yet)"
                )
            return urljoin(creds.url.rstrip("/") + "/", url.lstrip("/"))
        raise ImageFetchError(
            f"unsupported image URL scheme {urlsplit(url).scheme!r}: expected http(s), a "
            "Label Studio path or a data: URI"
        )

    def fetch(self, url: str, creds: Credentials) -> bytes:
        if url.startswith("data:"):
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
        shown = _redact(url)
        try:
            with self._http.stream("GET", url, headers=headers) as response:
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
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ImageTooLarge(
                            f"image at {shown} exceeds the {self.max_bytes}-byte download limit"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise Timeout(f"image download timed out: {shown}") from exc
        except httpx.HTTPError as exc:
            raise ImageFetchError(f"cannot download {shown}: {exc}") from exc

    def _data_uri(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageError("data: image URIs must be base64-encoded")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"data: URI is not valid base64: {exc}") from exc
        if len(data) > self.max_bytes:
            raise ImageTooLarge(f"data: URI image exceeds the {self.max_bytes}-byte limit")
        return data
