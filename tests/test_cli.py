"""The core (codecs, images, prompts, Engine, dispatcher, GrabCut, CLI) runs without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np

from tests.conftest import REPO

NO_TORCH = textwrap.dedent(
    """
    import sys
    for name in ("torch", "torchvision", "segment_anything"):
        sys.modules[name] = None  # any import of these now raises ImportError
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_core_imports_and_segments_with_torch_unimportable(grabcut_dir, tmp_path):
    image = grabcut_dir / "data_GT" / "teddy.jpg"
    out_png = tmp_path / "mask.png"
    out_json = tmp_path / "poly.json"
    proc = _run(
        f"""
        import backends.prompts, backends.images, backends.masks, backends.engine
        import backends.dispatch, backends.cli, backends.models.registry, backends.models.grabcut
        import backends.labelstudio.app, backends.cvat.handler, backends.redis.dispatcher
        from backends.cli import main
        args = ["segment", {str(image)!r}, "--click", "150,200", "--out", {str(out_png)!r}]
        assert main(args) == 0
        assert main(["segment", {str(image)!r}, "--click", "150,200,+", "--click", "20,20,-",
                     "--model", "grabcut", "--out", {str(out_json)!r}]) == 0
        try:
            main(["segment", {str(image)!r}, "--click", "1,1", "--model", "sam-vit_b",
                  "--out", {str(out_png)!r}])
        except SystemExit:
            raise
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "tapmask[sam]" in proc.stderr  # a SAM request names the missing extra
    mask = cv2.imread(str(out_png), cv2.IMREAD_GRAYSCALE)
    gt = cv2.imread(str(grabcut_dir / "boundary_GT" / "teddy.bmp"), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == gt.shape and set(np.unique(mask)) <= {0, 255}
    inter = np.logical_and(mask > 0, gt == 255).sum()
    assert inter / np.logical_or(mask > 0, gt == 255).sum() > 0.5  # the teddy, not the background
    payload = json.loads(out_json.read_text())
    assert payload["model"] == "grabcut" and payload["polygons"]
    assert all(len(p) >= 3 for p in payload["polygons"])


def test_segment_rejects_bad_clicks_clearly(grabcut_dir, tmp_path):
    image = grabcut_dir / "data_GT" / "teddy.jpg"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backends.cli",
            "segment",
            str(image),
            "--click",
            "5000,20",
            "--out",
            str(tmp_path / "m.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "outside the image" in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backends.cli",
            "segment",
            str(image),
            "--click",
            "nan,3",
            "--out",
            str(tmp_path / "m.png"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "finite" in proc.stderr
