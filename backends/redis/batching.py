"""Batched encodes in a worker: the images of the jobs waiting behind the one it took, in one pass.

A GPU encodes several images in one pass much faster than one by one. When a worker takes a job
whose image is not encoded yet, ``EncodeBatcher`` looks at the jobs *already waiting* in the same
kind of queue for the same model (it never takes them: they stay queued, for this worker or
another), and encodes their images together with this job's, up to ``max_batch`` per pass. The
jobs then find their embeddings cached (here, or through the shared tier on another worker).

Measured on an H200 (README, "GPU serving"), a batch of 8 encodes 1.12–1.18× more images per
second than one at a time (the CPU-side resize and normalise, ~17–20 ms per 1080p image, bounds
the gain; the encoders alone gain up to 4.8×). That pays for prefetches (batch queue), where
throughput is what counts. For clicks it does not: clicks that arrive together and are encoded
in one pass all wait for the whole pass, and the average wait only falls when a pass of n is
more than (n + 1) / 2 times faster than n single encodes. So clicks are batched only when asked
(``--encode-batch-clicks``), and never wait for company: only jobs already queued join.
Prefetches may wait up to ``max_wait`` seconds for more to arrive, which costs nobody a click.

Settings: ``--encode-batch`` / ``TAPMASK_ENCODE_BATCH`` (default 8; 1 turns batching off),
``--encode-batch-wait-ms`` / ``TAPMASK_ENCODE_BATCH_WAIT_MS`` (default 0) and
``--encode-batch-clicks`` / ``TAPMASK_ENCODE_BATCH_CLICKS`` (default off).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.job import Job
from rq.serializers import JSONSerializer

from backends.errors import TapmaskError
from backends.models.base import EncodesBatches
from backends.redis import jobs, protocol

log = logging.getLogger(__name__)

#: How far down a queue the batcher looks for company, in multiples of ``max_batch``.
LOOKAHEAD = 4


def image_job(job: Job) -> tuple[str, str] | None:
    """``(model, image key)`` of a tapmask job that needs its image's embedding, else None."""
    try:
        if job.func_name not in protocol.ENCODING_JOB_NAMES or not job.args:
            return None
        request = job.args[0]
        if not isinstance(request, dict):
            return None
        return (
            protocol.check_model_name(request.get("model")),
            protocol.check_image_key(request.get("image")),
        )
    except Exception:  # undecodable, foreign or malformed: not ours to batch
        return None


class EncodeBatcher:
    """Encodes a taken job's image together with the images of jobs waiting behind it."""

    def __init__(
        self,
        runtime: jobs.WorkerRuntime,
        max_batch: int,
        max_wait: float = 0.0,
        *,
        clicks: bool = False,
    ) -> None:
        self.runtime = runtime
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait))
        self.clicks = clicks
        self.batches = 0  # passes of more than one image

    def before(self, job: Job) -> None:
        """Called with a taken job before it runs; never raises (the job runs regardless)."""
        if self.max_batch <= 1:
            return
        try:
            self._batch(job)
        except Exception:  # batching is an optimisation: the job encodes its own image
            log.warning("batched encode before job %s failed", job.id, exc_info=True)

    def _batch(self, job: Job) -> None:
        rt = self.runtime
        target = image_job(job)
        parsed = rt.keys.parse_queue(job.origin or "")
        if target is None or parsed is None:
            return
        model, key = target
        if parsed[1] == "interactive" and not self.clicks:
            return
        engine = rt.engine
        if not isinstance(engine.model(model), EncodesBatches) or engine.has_embedding(model, key):
            return
        kind = parsed[1]
        keys = [key, *self._waiting(model, kind, {key})]
        if kind == "batch" and self.max_wait > 0 and len(keys) < self.max_batch:
            deadline = time.monotonic() + self.max_wait
            while len(keys) < self.max_batch and time.monotonic() < deadline:
                time.sleep(min(0.01, self.max_wait))
                keys += self._waiting(model, kind, set(keys))
        refs: list[Any] = []
        for image_key in keys[: self.max_batch]:
            try:
                refs.append(jobs.image_ref(rt, image_key))
            except TapmaskError:  # expired image: its own job answers unknown_image
                continue
        if len(refs) > 1:
            engine.prefetch_many(model, refs, self.max_batch)
            self.batches += 1

    def _waiting(self, model: str, kind: str, seen: set[str]) -> list[str]:
        """Image keys of not-yet-encoded images of jobs waiting in ``model``'s ``kind`` queue."""
        rt = self.runtime
        queue = rt.keys.queue(model, kind)
        ids = rt.connection.lrange(rt.keys.queue_list(queue), 0, LOOKAHEAD * self.max_batch)
        waiting = Job.fetch_many(
            [i.decode() if isinstance(i, bytes) else i for i in ids],
            connection=rt.connection,
            serializer=JSONSerializer,
        )
        found: list[str] = []
        for other in waiting:
            target = image_job(other) if other is not None else None
            if target is None or target[0] != model or target[1] in seen:
                continue
            if rt.engine.has_embedding(model, target[1]):
                continue
            seen.add(target[1])
            found.append(target[1])
            if len(found) >= self.max_batch - 1:
                break
        return found
