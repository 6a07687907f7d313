"""nuclio entry point: tapmask's shared CVAT handler (configured by ``spec.env`` in the YAML)."""

from backends.cvat.handler import handler, init_context

__all__ = ["handler", "init_context"]
