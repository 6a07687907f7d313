"""Real processes for tests: a private ``redis-server`` and ``tapmask worker``s.

They are the launchers ``make bench`` uses for its queue rows (``backends.benchmarks``), so a
test and a benchmark start workers the same way; tests import them from here only.
"""

from backends.benchmarks.redis_procs import RedisServer, WorkerProcess, free_port

__all__ = ["RedisServer", "WorkerProcess", "free_port"]
