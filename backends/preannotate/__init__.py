"""Pre-annotation: whole images of masks at once, before anyone clicks (see ``pipeline``).

Front ends (``tapmask annotate`` for Label Studio, Label Studio's "Retrieve predictions", the CVAT
detector function) turn ``Instance`` records into their tool's regions; the pipeline itself knows
no tool.
"""

from backends.preannotate.pipeline import (
    DEFAULT_NMS_IOU,
    Instance,
    boxes_to_masks,
    phrases_of,
    suppress_overlaps,
    text_to_masks,
)
from backends.preannotate.settings import (
    label_prompts,
    parse_prompt_overrides,
    thresholds_from_env,
)

__all__ = [
    "DEFAULT_NMS_IOU",
    "Instance",
    "boxes_to_masks",
    "label_prompts",
    "parse_prompt_overrides",
    "phrases_of",
    "suppress_overlaps",
    "text_to_masks",
    "thresholds_from_env",
]
