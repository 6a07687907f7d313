"""Video files for the Label Studio video tests: synthetic clips written as real MP4 files,
their ground-truth boxes, and a static file host to download them from."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from backends.masks import mask_bbox
from backends.video.synthetic import SyntheticClip


def write_mp4(clip: SyntheticClip, path: Path, fps: float = 25.0) -> list[list[np.ndarray]]:
    """``clip`` as an MPEG-4 file (OpenCV's ``mp4v``: what pip's OpenCV can encode); returns the
    per-frame ground-truth masks (frame index → object → mask)."""
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (clip.width, clip.height)
    )
    assert writer.isOpened()
    truth = []
    for index in range(len(clip)):
        frame, masks = clip.frame(index)
        writer.write(np.ascontiguousarray(frame[..., ::-1]))
        truth.append(masks)
    writer.release()
    return truth


def percent_box(mask: np.ndarray) -> dict[str, float]:
    """A mask's bounding box as Label Studio's keyframe fields (percent of the frame)."""
    height, width = mask.shape
    bbox = mask_bbox(mask)
    assert bbox is not None
    x1, y1, x2, y2 = bbox
    return {
        "x": x1 / width * 100,
        "y": y1 / height * 100,
        "width": (x2 - x1 + 1) / width * 100,
        "height": (y2 - y1 + 1) / height * 100,
    }


def box_iou(keyframe: dict, mask: np.ndarray) -> float:
    """IoU of a keyframe's box (percent) and a ground-truth mask's bounding box."""
    height, width = mask.shape
    bbox = mask_bbox(mask)
    if bbox is None:
        return 0.0
    gx1, gy1, gx2, gy2 = bbox[0], bbox[1], bbox[2] + 1, bbox[3] + 1
    x1, y1 = keyframe["x"] / 100 * width, keyframe["y"] / 100 * height
    x2 = x1 + keyframe["width"] / 100 * width
    y2 = y1 + keyframe["height"] / 100 * height
    ix = max(0.0, min(x2, gx2) - max(x1, gx1))
    iy = max(0.0, min(y2, gy2) - max(y1, gy1))
    inter = ix * iy
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    return inter / union if union > 0 else 0.0


@contextmanager
def file_host(folder: Path) -> Iterator[str]:
    """An HTTP server for the files in ``folder`` (its base URL), stopped on exit."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
