"""A real Label Studio 1.23.2 and the real ``tapmask serve labelstudio`` process, for end-to-end
tests: the launchers live in ``backends.benchmarks.labelstudio_proc`` (the pre-annotation bench
starts Label Studio the same way; benchmarks never import tests), re-exported here.
"""

from backends.benchmarks.labelstudio_proc import (
    LS_BIN,
    REPO,
    TOKEN,
    LabelStudio,
    label_studio_server,
    start_backend,
    stop,
    wait_until_up,
)

__all__ = [
    "LS_BIN",
    "REPO",
    "TOKEN",
    "LabelStudio",
    "label_studio_server",
    "start_backend",
    "stop",
    "wait_until_up",
]
