"""Settings read from the environment, each in one place (stdlib only).

Every front end and worker reads the same names, so a container or a nuclio ``spec.env`` sets a
value once. The model a front end serves is ``TAPMASK_MODEL`` (``MODEL``, the Makefile's
variable, is accepted as a fallback).
"""

from __future__ import annotations

import os

DEFAULT_MODEL = "grabcut"


def model_name(default: str = DEFAULT_MODEL) -> str:
    """``$TAPMASK_MODEL``, else ``$MODEL``, else ``default``."""
    for name in ("TAPMASK_MODEL", "MODEL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return default
