"""SAM-style models: one segmenter (``core``) in front of interchangeable backbones.

* ``core``: ``SamSegmenter``, the click loop, encode wrapper, shared-embedding bytes and export
  that every SAM-like model shares, and the ``Backbone`` protocol a network implements for it;
* ``backbone``: segment-anything's ``Sam`` as such a backbone (``SamPredictor``'s arithmetic);
* ``loader``: segment-anything checkpoints → a segmenter (the registry's ``sam-*`` factory).

The transformers backbones (SAM, HQ-SAM, SAM 2.1, EdgeTAM) live in ``backends.models.hf``. This
package module imports nothing, so they can use ``core`` without segment-anything installed.
"""
