"""CVAT front end: the nuclio handler and CVAT's interactor wire format.

* :mod:`backends.cvat.handler`: ``init_context(context)`` and ``handler(context, event)``, which
  every ``serverless/<function>/nuclio/main.py`` re-exports;
* :mod:`backends.cvat.formats`: request parsing/validation, click order, reply building.

Importing this package needs neither nuclio nor torch.
"""
