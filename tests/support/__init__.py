"""Helpers shared by the tests, in one home.

``processes``
    ``free_port``, ``RedisServer`` and ``WorkerProcess``: a private redis-server and real
    ``tapmask worker`` processes (the same launchers ``make bench`` uses).
``cvat_harness``
    requests built the way CVAT's lambda manager builds them, and nuclio's own test platform.
``fake_labelstudio``
    a local HTTP server that serves task images and checks tokens like Label Studio does.
``servers``
    ``tapmask serve labelstudio`` as a real process (timings, RSS), and image hosts that stall.
``queue_models``
    a worker plugin (``--plugin tests.support.queue_models``) registering small test models.
"""
