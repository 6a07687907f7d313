"""tapmask: AI clicks for CVAT and Label Studio."""

__version__ = "0.1.0"
