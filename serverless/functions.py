"""Every CVAT function in ``serverless/``: one table entry each, and the CPU/GPU variant rule.

``python -m serverless.generate`` (``make cvat-functions``) writes each entry's
``serverless/<folder>/nuclio/`` files: ``function.yaml`` (CPU), ``function-gpu.yaml`` (GPU, when
``gpu``) and ``main.py``. A test fails when a committed file differs from what this table
generates, so edit here, never the YAML files.

An entry holds what is particular to a function. What every function shares (runtime, trigger,
build directives, the ``/models`` volume…) is in ``serverless/generate.py``; what the CPU and GPU
builds differ by is :data:`VARIANTS`, written once for all functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["interactor", "detector", "tracker"]
Box = Literal["no", "optional", "required"]

#: Where the weights folder is mounted (read-only) in a function's container.
MODELS_MOUNT = "/models"

#: The packages a CPU build installs from the PyTorch CPU index before ``tapmask[extra]``, so pip
#: does not pull the CUDA wheels from PyPI when the base image has no torch. ``hf`` needs
#: torchvision too: timm imports it. An extra missing here cannot be generated.
CPU_TORCH: dict[str | None, tuple[str, ...]] = {
    None: (),
    "sam": ("torch", "torchvision"),
    "ritm": ("torch",),
    "hf": ("torch", "torchvision"),
}

HELP = "Left click adds positive points, right click negative ones"
BOX_HELP = f"{HELP}; you may start with a box around the object"
#: What tapmask's trackers follow (``backends.cvat.tracking.SHAPE_TYPES``).
TRACKED_SHAPES = ("rectangle", "polygon")
TRACKER_ABOUT = (
    " CVAT sends {image, shapes, states} per frame and gets {shapes, states}; a state is a small "
    "JSON handle to the tracker's memory kept in the worker (and in Redis with a worker pool)."
)


@dataclass(frozen=True)
class Variant:
    """What the CPU and GPU builds of every function differ by."""

    label: str
    yaml: str  # file name in nuclio/
    deploy_flags: str  # serverless/deploy.sh options that deploy this file
    event_timeout: str  # exceeding it answers 408 and restarts the worker (a model reload)
    device: str  # TAPMASK_DEVICE, written for torch functions only
    base_image: str  # built from docker/ (tests/test_dockerfiles.py ties them)
    image_suffix: str  # of the function's own image, tapmask/cvat-<folder><suffix>:latest
    gpus: int  # resources.limits nvidia.com/gpu; 0 writes no resources
    torch_index: str | None  # preCopy: CPU_TORCH[extra] from this index first; None: no preCopy


#: A first SAM ViT-H encode on a CPU takes tens of seconds (CVAT gives up after 120 s).
CPU = Variant(
    label="CPU",
    yaml="function.yaml",
    deploy_flags="",
    event_timeout="120s",
    device="cpu",
    base_image="tapmask/tapmask-cpu:latest",
    image_suffix="",
    gpus=0,
    torch_index="https://download.pytorch.org/whl/cpu",
)
#: No preCopy: the GPU base image has CUDA torch, and python:3.11-slim takes PyPI's CUDA wheels.
GPU = Variant(
    label="GPU",
    yaml="function-gpu.yaml",
    deploy_flags="--gpu",
    event_timeout="30s",
    device="cuda",
    base_image="tapmask/tapmask-gpu:latest",
    image_suffix="-gpu",
    gpus=1,
    torch_index=None,
)
VARIANTS = (CPU, GPU)


@dataclass(frozen=True)
class Label:
    """A detector's label, listed in ``metadata.annotations.spec`` (id = position in the list)."""

    name: str
    type: Literal["mask", "polygon", "rectangle", "points", "skeleton"] = "mask"


@dataclass(frozen=True)
class Function:
    """One CVAT function: a folder ``serverless/<folder>/nuclio/`` and its nuclio YAML files."""

    folder: str
    name: str  # metadata.name: the id CVAT knows the function by
    title: str  # metadata.annotations.name: what CVAT shows
    kind: Kind  # metadata.annotations.type
    description: str  # spec.description (mandatory: a missing one breaks CVAT's function list)
    about: str  # the files' header comment (wrapped to 100 columns)
    model: str  # TAPMASK_MODEL
    env: tuple[tuple[str, str], ...] = ()  # after TAPMASK_MODEL: mode, checkpoint or model folder
    extra: str | None = None  # installs tapmask[extra]; a key of CPU_TORCH
    gpu: bool = True  # also a function-gpu.yaml
    framework: str = "pytorch"
    help_message: str = ""
    # interactors
    min_pos_points: int | None = None  # 0: a box alone is enough
    box: Box = "no"  # "optional": startswith_box_optional; "required": startswith_box
    # detectors
    labels: tuple[Label, ...] = ()
    # trackers: metadata.annotations.supported_shape_types (newer CVAT sends {type, points})
    shape_types: tuple[str, ...] = ()
    workers: int = 1  # one process per worker, each with its own model copy and caches
    workers_note: str = ""  # why, when not 1

    def __post_init__(self) -> None:
        where = f"serverless/functions.py, {self.folder}"
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(f"{where}: name {self.name!r} is not a DNS-1123 label")
        if self.extra not in CPU_TORCH:
            raise ValueError(f"{where}: extra {self.extra!r} has no CPU_TORCH entry")
        if self.gpu and not self.torch:
            raise ValueError(f"{where}: a GPU variant of a function without torch")
        if (self.kind == "interactor") != (self.min_pos_points is not None):
            raise ValueError(f"{where}: min_pos_points is for interactors, and they need it")
        if self.kind == "interactor" and not self.help_message:
            raise ValueError(f"{where}: an interactor needs a help_message")
        if self.kind != "interactor" and self.box != "no":
            raise ValueError(f"{where}: box is for interactors")
        names = [label.name for label in self.labels]
        if (self.kind == "detector") != bool(names) or len(set(names)) != len(names):
            raise ValueError(f"{where}: a detector, and only one, lists labels, with unique names")
        if self.shape_types and self.kind != "tracker":
            raise ValueError(f"{where}: shape_types are for trackers")
        if self.workers != 1 and not self.workers_note:
            raise ValueError(f"{where}: say in workers_note why {self.workers} workers")

    @property
    def torch(self) -> bool:
        """A torch model: it reads ``TAPMASK_DEVICE``, and CPU builds install CPU torch first."""
        return bool(CPU_TORCH[self.extra])

    @property
    def weights(self) -> bool:
        """Its env points under ``/models``: the weights folder is mounted there."""
        return any(value.startswith(f"{MODELS_MOUNT}/") for _, value in self.env)

    @property
    def variants(self) -> tuple[Variant, ...]:
        return VARIANTS if self.gpu else (CPU,)


FUNCTIONS: tuple[Function, ...] = (
    Function(
        folder="grabcut",
        name="tapmask-grabcut",
        title="GrabCut (tapmask)",
        kind="interactor",
        description="GrabCut interactive segmentation by tapmask (OpenCV, CPU, no weights)",
        about="GrabCut (OpenCV) click segmentation, the weights-free default: CPU only, no torch, "
        "no checkpoint. Clicks seed a watershed that initialises GrabCut; a box (optional, drawn "
        "first) initialises GrabCut's rectangle. Replies {mask, bounds, points}.",
        model="grabcut",
        gpu=False,
        framework="opencv",
        help_message=BOX_HELP,
        min_pos_points=1,
        box="optional",
        workers=2,
        workers_note="Two workers serve two annotators at once; each keeps its own (cheap) image "
        "cache.",
    ),
    Function(
        folder="sam",
        name="tapmask-sam",
        title="Segment Anything (tapmask)",
        kind="interactor",
        description="Segment Anything by tapmask, decoded on the server (any SAM checkpoint); "
        "each frame is encoded once",
        about="Segment Anything decoded on the server. Any segment-anything checkpoint (vit_b / "
        "vit_l / vit_h, the variant is read from the file); replies {mask, bounds, points}. The "
        "frame is encoded once (cached); every further click on it is a decoder pass only.",
        model="sam",
        env=(("SAM_CHECKPOINT", "/models/sam_vit_h_4b8939.pth"),),
        extra="sam",
        help_message=BOX_HELP,
        min_pos_points=0,
        box="optional",
    ),
    Function(
        folder="sam-embedding",
        name="pth-facebookresearch-sam-vit-h",
        title="Segment Anything ViT-H (tapmask, browser decoder)",
        kind="interactor",
        description="Segment Anything ViT-H image embeddings by tapmask for the CVAT SAM browser "
        "plugin (cached per frame)",
        about="image embeddings for CVAT's stock SAM browser plugin. CVAT loads the plugin only "
        "for a function named exactly pth-facebookresearch-sam-vit-h: the browser asks once per "
        'frame for {"blob": base64 float32 [1, 256, 64, 64]} (SamPredictor.set_image of the '
        "original-size frame) and decodes every click itself with its bundled ViT-H ONNX "
        "decoder. Serve ViT-H weights only; other SAM variants decode badly with that decoder "
        "(use serverless/sam, which decodes here). Replaces CVAT's own function of the same "
        "name. Repeat requests for a frame are cache hits.",
        model="sam-vit_h",
        env=(
            ("TAPMASK_CVAT_MODE", "embedding"),
            ("SAM_CHECKPOINT", "/models/sam_vit_h_4b8939.pth"),
        ),
        extra="sam",
        help_message=f"{BOX_HELP}. Clicks are decoded in your browser",
        min_pos_points=0,
        box="optional",
    ),
    Function(
        folder="ritm",
        name="tapmask-ritm-hrnet18",
        title="RITM HRNet18 (tapmask)",
        kind="interactor",
        description="RITM HRNet18 click-based interactive segmentation by tapmask (official "
        "checkpoints)",
        about='RITM (HRNet18 + OCR, the official COCO+LVIS "itermask" weights) click '
        "segmentation; replies {mask, bounds, points}. Each click refines the previous click's "
        "probability map. Other variants: TAPMASK_MODEL=ritm-h18s / ritm-h32 with their "
        "RITM_CHECKPOINT.",
        model="ritm-h18",
        env=(("RITM_CHECKPOINT", "/models/coco_lvis_h18_itermask.pth"),),
        extra="ritm",
        help_message=HELP,
        min_pos_points=1,
    ),
    Function(
        folder="sam2",
        name="tapmask-sam2",
        title="SAM 2.1 (tapmask)",
        kind="interactor",
        description="SAM 2.1 (Hiera, any size) by tapmask through transformers, decoded on the "
        "server; each frame is encoded once",
        about="SAM 2.1 through Hugging Face transformers, decoded on the server. Any size: set "
        "TAPMASK_MODEL to sam2.1-hiera-tiny|small|base-plus|large and SAM2_MODEL_DIR to its "
        "folder.",
        model="sam2.1-hiera-large",
        env=(("SAM2_MODEL_DIR", "/models/sam2.1-hiera-large"),),
        extra="hf",
        help_message=BOX_HELP,
        min_pos_points=0,
        box="optional",
    ),
    Function(
        folder="edgetam",
        name="tapmask-edgetam",
        title="EdgeTAM (tapmask)",
        kind="interactor",
        description="EdgeTAM by tapmask, a SAM 2 with a RepViT encoder, fast on CPUs; each frame "
        "is encoded once",
        about="EdgeTAM (RepViT-M1 SAM 2) through Hugging Face transformers, decoded on the "
        "server. Encodes a 1080p frame in well under a second on a CPU.",
        model="edgetam",
        env=(("EDGETAM_MODEL_DIR", "/models/edgetam"),),
        extra="hf",
        help_message=BOX_HELP,
        min_pos_points=0,
        box="optional",
    ),
    Function(
        folder="flow-tracker",
        name="tapmask-flow-tracker",
        title="Optical-flow tracker (tapmask)",
        kind="tracker",
        description="Weights-free video tracker by tapmask: optical flow + GrabCut refinement "
        "(OpenCV, CPU)",
        about="the weights-free video tracker: dense optical flow carries the object's mask to "
        "the next frame and GrabCut refines its edges; rectangles and polygons, no torch, no "
        "checkpoint." + TRACKER_ABOUT,
        model="flow",
        gpu=False,
        framework="opencv",
        shape_types=TRACKED_SHAPES,
    ),
    Function(
        folder="sam2-tracker",
        name="tapmask-sam2-tracker",
        title="SAM 2.1 tracker (tapmask)",
        kind="tracker",
        description="SAM 2.1 video tracker by tapmask (transformers), bounded memory bank",
        about="SAM 2.1 video propagation through Hugging Face transformers, with the official "
        "predictor's bounded memory bank. Other sizes: TAPMASK_MODEL=sam2.1-hiera-small|"
        "base-plus|large-video and SAM2_MODEL_DIR to its folder." + TRACKER_ABOUT,
        model="sam2.1-hiera-tiny-video",
        env=(("SAM2_MODEL_DIR", "/models/sam2.1-hiera-tiny"),),
        extra="hf",
        shape_types=TRACKED_SHAPES,
    ),
    Function(
        folder="edgetam-video",
        name="tapmask-edgetam-tracker",
        title="EdgeTAM tracker (tapmask)",
        kind="tracker",
        description="EdgeTAM video tracker by tapmask (transformers), fast on CPUs",
        about="EdgeTAM video propagation (RepViT-M1 SAM 2 with a compact memory) through Hugging "
        "Face transformers." + TRACKER_ABOUT,
        model="edgetam-video",
        env=(("EDGETAM_MODEL_DIR", "/models/edgetam"),),
        extra="hf",
        shape_types=TRACKED_SHAPES,
    ),
    Function(
        folder="grounding-sam2",
        name="tapmask-grounding-sam2",
        title="Grounding DINO + SAM 2.1 (tapmask)",
        kind="detector",
        description="Text-prompted masks by tapmask: Grounding DINO finds each label by its name, "
        "SAM 2.1 segments every box",
        about="a detector for CVAT's Automatic annotation: each label's name (or its "
        "TAPMASK_LABEL_PROMPTS text) prompts Grounding DINO (transformers), every box above the "
        "threshold becomes a SAM 2.1 mask. Replies CVAT's detector items: type mask (flat crop + "
        "bounds, and points for 'convert masks to polygons'), or polygon for polygon labels. "
        "Edit the labels in serverless/functions.py and regenerate; the spec and "
        "TAPMASK_DETECTOR_LABELS are written from the same list.",
        model="sam2.1-hiera-large",
        env=(
            ("TAPMASK_CVAT_MODE", "detector"),
            ("SAM2_MODEL_DIR", "/models/sam2.1-hiera-large"),
            ("TAPMASK_DETECTOR", "grounding-dino-tiny"),
            ("GROUNDING_DINO_MODEL_DIR", "/models/grounding-dino-tiny"),
        ),
        extra="hf",
        labels=tuple(
            Label(name)
            for name in (
                "person",
                "car",
                "truck",
                "bus",
                "bicycle",
                "motorcycle",
                "dog",
                "cat",
                "bird",
                "horse",
            )
        ),
    ),
)
