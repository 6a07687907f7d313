"""A small Label Studio REST client: the calls whole-project commands make (``tapmask annotate``,
``tapmask prefetch``), measured against Label Studio 1.23.2.

* ``GET /api/projects/{id}``: the project, its ``label_config``;
* ``GET /api/tasks?project=&page=&page_size=``: ``{"tasks": [...], "total": n}`` per page, a 404
  ("Invalid page.") past the last one; these list entries carry no annotations or predictions;
* ``GET /api/tasks/{id}``: one task with its ``annotations``, ``predictions`` and ``drafts``;
* ``GET /api/predictions?task=``, ``POST /api/predictions`` (``task``, ``result``, ``score``,
  ``model_version``; 201; Label Studio 1.23 validates ``result`` against the label config and
  answers 400 for a region its config does not allow), ``DELETE /api/predictions/{id}`` (204).

Authentication is the image client's (``client.TokenAuth``): a legacy token as ``Token …``, a
Personal Access Token exchanged for a ``Bearer`` access token and refreshed. The token comes from
``--token`` or ``LABEL_STUDIO_API_KEY`` and never appears in a log or an error. Failures are
``LabelStudioApiError`` (502, ``label_studio_api``) naming the call and Label Studio's answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from backends.errors import LabelStudioApiError
from backends.labelstudio.client import Credentials, ImageClient, TokenAuth

PAGE_SIZE = 100


class LabelStudioApi:
    """Label Studio's REST API at ``url`` with ``token`` (default ``LABEL_STUDIO_API_KEY``)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url:
            raise LabelStudioApiError(
                "no Label Studio address: pass --label-studio or set LABEL_STUDIO_URL"
            )
        self.url = url.rstrip("/")
        self.credentials = Credentials(self.url, token or os.environ.get("LABEL_STUDIO_API_KEY"))
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout, transport=transport, trust_env=False
        )
        self.images = ImageClient(transport=transport)
        self.auth: TokenAuth = self.images.auth  # one access token for API calls and images

    def close(self) -> None:
        self._http.close()
        self.images.close()

    def __enter__(self) -> LabelStudioApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, ok: Sequence[int] = (200,), **kw: Any) -> Any:
        try:
            response = self._http.request(
                method, path, headers=self.auth.header(self.credentials), **kw
            )
        except httpx.HTTPError as exc:
            raise LabelStudioApiError(f"{method} {path}: cannot reach Label Studio: {exc}") from exc
        if response.status_code not in ok:
            raise LabelStudioApiError(
                f"{method} {path}: Label Studio answered {response.status_code}: "
                f"{response.text[:300]}",
                status=response.status_code,
            )
        return response.json() if response.content else None

    def project(self, project: int) -> dict[str, Any]:
        return self._call("GET", f"/api/projects/{int(project)}")

    def tasks(self, project: int, page_size: int = PAGE_SIZE) -> Iterator[dict[str, Any]]:
        """The project's tasks (list entries: ``id``, ``data``…, no annotations), page by page."""
        page, seen = 1, 0
        while True:
            params = {"project": int(project), "page": page, "page_size": page_size}
            body = self._call("GET", "/api/tasks", params=params, ok=(200, 404))
            chunk = body.get("tasks") if isinstance(body, dict) else None
            if not chunk:  # a 404 "Invalid page." past the last page, or an empty page
                return
            yield from chunk
            seen += len(chunk)
            if seen >= int(body.get("total") or 0):
                return
            page += 1

    def count_tasks(self, project: int) -> int:
        body = self._call("GET", "/api/tasks", params={"project": int(project), "page_size": 1})
        return int(body.get("total") or 0)

    def task(self, task_id: int) -> dict[str, Any]:
        """One task in full: ``annotations``, ``predictions`` and ``drafts`` included."""
        return self._call("GET", f"/api/tasks/{int(task_id)}")

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self._call("GET", "/api/predictions", params={"task": int(task_id)})

    def post_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> dict[str, Any]:
        body = {"task": int(task_id), "result": result, "score": score}
        body["model_version"] = model_version
        return self._call("POST", "/api/predictions", json=body, ok=(200, 201))

    def delete_prediction(self, prediction_id: int) -> None:
        self._call("DELETE", f"/api/predictions/{int(prediction_id)}", ok=(200, 204))

    def image(self, url: str) -> bytes:
        """A task's image (relative URLs resolve against Label Studio, with the token)."""
        return self.images.fetch(url, self.credentials)
