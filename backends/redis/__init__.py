"""The Redis/rq transport of the shared worker pool, one concern a module.

``protocol``
    what both sides agree on: key and queue names, job names, the request/reply/error codecs.
``connection``
    clients that fail fast, and Redis errors as ``Unavailable``.
``dispatcher``
    ``RedisDispatcher``, the front-end side (stores images once, enqueues JSON jobs, waits).
``embeddings``
    ``RedisEmbeddingStore``, the shared second-tier embedding cache workers plug into the Engine.
``presence``
    worker presence records (heartbeats) and who is alive.
``jobs``
    the only functions a worker runs, and the rq job class that refuses anything else.
``worker``
    ``TapmaskWorker`` (an rq ``SimpleWorker``: loads models once, never forks) and its start-up.
``pool``
    ``tapmask worker`` / ``tapmask workers`` arguments and the pool listing.
"""
