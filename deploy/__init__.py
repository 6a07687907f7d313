"""Deployment manifests (Kubernetes) and their offline checks (``python -m deploy.check``)."""
