"""``serverless/functions.py``: the one table the CVAT functions' files are generated from.

The committed files must be exactly what the table generates, so a hand edit to one YAML, or a CPU
file drifting from its GPU twin, fails here; the generated YAML must parse back to what the
generator means; and a detector or a tracker must be one more entry. CVAT's listing rules on the
committed files are in ``tests/test_cvat_functions.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from serverless import generate
from serverless.functions import CPU, FUNCTIONS, GPU, Function, Label, Variant
from tests.test_cvat_functions import check_listing, cvat_lambda_function

REPO = Path(__file__).resolve().parents[1]
CASES = [(function, variant) for function in FUNCTIONS for variant in function.variants]
#: Where a function's CPU and GPU files may differ: the variant rule, nothing per function.
VARIANT_PATHS = {
    ("spec", "eventTimeout"),
    ("spec", "env", "TAPMASK_DEVICE"),
    ("spec", "build", "image"),
    ("spec", "build", "baseImage"),
    ("spec", "build", "directives", "preCopy"),
    ("spec", "resources"),
}


SAM = next(function for function in FUNCTIONS if function.folder == "sam")


def _id(value: Function | Variant) -> str:
    return value.folder if isinstance(value, Function) else value.label


def _flat(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaves by key path; ``spec.env`` keyed by variable name, other lists are leaves."""
    if path == ("spec", "env"):
        return {(*path, item["name"]): item["value"] for item in value}
    if not isinstance(value, dict):
        return {path: value}
    flat: dict[tuple[str, ...], Any] = {}
    for key, item in value.items():
        flat |= _flat(item, (*path, key))
    return flat


# --------------------------------------------------------------------------------------------
# The committed files


def test_committed_files_are_what_the_table_generates():
    stale = generate.stale()
    expected = generate.files()
    report = []
    for path in stale:
        name = str(path.relative_to(REPO))
        if path not in expected:
            report.append(f"{name}: not in the table")
        elif not path.is_file():
            report.append(f"{name}: missing")
        else:
            old = path.read_text(encoding="utf-8").splitlines(keepends=True)
            new = expected[path].splitlines(keepends=True)
            report.append("".join(difflib.unified_diff(old, new, name, "generated")))
    assert not stale, (
        "serverless/ differs from the table in serverless/functions.py: edit the table and run "
        "`make cvat-functions`\n" + "\n".join(report)
    )


def test_generate_check_runs_as_documented():
    done = subprocess.run(
        [sys.executable, "-m", "serverless.generate", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("function", [f for f in FUNCTIONS if f.gpu], ids=_id)
def test_cpu_and_gpu_files_differ_by_the_variant_rule_only(function):
    folder = generate.SERVERLESS / function.folder / "nuclio"
    cpu = _flat(yaml.safe_load((folder / CPU.yaml).read_text()))
    gpu = _flat(yaml.safe_load((folder / GPU.yaml).read_text()))
    differing = {path for path in cpu.keys() | gpu.keys() if cpu.get(path) != gpu.get(path)}
    assert differing, "the variants are the same"
    outside = {p for p in differing if not any(p[: len(rule)] == rule for rule in VARIANT_PATHS)}
    assert not outside, f"CPU and GPU differ outside the variant rule: {sorted(outside)}"


def test_deploy_script_rewrites_the_generated_models_folder():
    """deploy.sh swaps ``path: <default>`` for MODELS_DIR: the default must be what is written."""
    script = (generate.SERVERLESS / "deploy.sh").read_text()
    match = re.search(r'^DEFAULT_MODELS_DIR="([^"]+)"$', script, re.M)
    assert match and match.group(1) == generate.MODELS_HOST_DIR
    text = generate.yaml_text(SAM, CPU)
    assert re.search(rf"^ +path: {re.escape(generate.MODELS_HOST_DIR)}$", text, re.M)


# --------------------------------------------------------------------------------------------
# The generator


@pytest.mark.parametrize(("function", "variant"), CASES, ids=_id)
def test_the_text_means_the_document(function, variant):
    text = generate.yaml_text(function, variant)
    assert yaml.safe_load(text) == generate.document(function, variant)
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comments[0].startswith("# tapmask: ")
    assert all(len(line) <= generate.WIDTH for line in comments)


def test_check_and_write_find_and_fix_hand_edits(tmp_path):
    root = tmp_path / "serverless"
    for path, text in generate.files(root).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert generate.stale(root) == []

    edited = root / "sam" / "nuclio" / GPU.yaml
    edited.write_text(edited.read_text().replace("eventTimeout: 30s", "eventTimeout: 60s"))
    missing = root / "ritm" / "nuclio" / "main.py"
    missing.unlink()
    orphan = root / "retired" / "nuclio" / CPU.yaml
    orphan.parent.mkdir(parents=True)
    orphan.write_text("metadata: {}\n")
    assert set(generate.stale(root)) == {edited, missing, orphan}

    assert set(generate.write(root)) == {edited, missing, orphan}
    assert generate.stale(root) == []
    assert not (root / "retired").exists()


def test_main_py_is_generated_like_the_committed_ones():
    for function in FUNCTIONS:
        main_py = generate.SERVERLESS / function.folder / "nuclio" / "main.py"
        assert main_py.read_text() == generate.MAIN_PY


# --------------------------------------------------------------------------------------------
# Functions to come: one entry each

DETECTOR = Function(
    folder="detector",
    name="tapmask-detector",
    title="Text-prompted detector (tapmask)",
    kind="detector",
    description="Boxes per label, then one mask per box",
    about="A detector in front of a SAM-family model.",
    model="sam2.1-hiera-large",
    env=(("SAM2_MODEL_DIR", "/models/sam2.1-hiera-large"),),
    extra="hf",
    labels=(Label("car"), Label("person", "polygon")),
)
TRACKER = Function(
    folder="sam2-tracker",
    name="tapmask-sam2-tracker",
    title="SAM 2.1 tracker (tapmask)",
    kind="tracker",
    description="SAM 2.1 tracking by tapmask",
    about="Tracks masks across frames with a bounded memory bank.",
    model="sam2.1-hiera-large",
    env=(("SAM2_MODEL_DIR", "/models/sam2.1-hiera-large"),),
    extra="hf",
)
WEIGHTS_FREE_TRACKER = Function(
    folder="flow-tracker",
    name="tapmask-flow-tracker",
    title="Optical-flow tracker (tapmask)",
    kind="tracker",
    description="A weights-free tracker by tapmask (OpenCV, CPU)",
    about="Moves shapes along the optical flow.",
    model="grabcut",
    gpu=False,
    framework="opencv",
)


@pytest.mark.parametrize("function", [DETECTOR, TRACKER, WEIGHTS_FREE_TRACKER], ids=_id)
def test_a_detector_or_a_tracker_is_one_entry(function):
    for variant in function.variants:
        text = generate.yaml_text(function, variant)
        config = yaml.safe_load(text)
        assert config == generate.document(function, variant)
        check_listing(config)
        listed = cvat_lambda_function(config)
        assert listed["kind"] == function.kind
        assert "min_pos_points" not in config["metadata"]["annotations"]
        env = _flat(config)
        spec = config["spec"]
        if function.torch:
            assert env[("spec", "env", "TAPMASK_DEVICE")] == variant.device
        else:
            assert ("spec", "env", "TAPMASK_DEVICE") not in env
            assert "preCopy" not in spec["build"]["directives"]
        if function.weights:
            assert spec["volumes"][0]["volumeMount"]["mountPath"] == "/models"
        else:
            assert "volumes" not in spec
        if function.kind == "detector":
            assert "    spec: |\n      [\n" in text  # a label a line, as CVAT's detectors write it
            assert listed["labels"] == [
                {"id": 0, "name": "car", "type": "mask"},
                {"id": 1, "name": "person", "type": "polygon"},
            ]


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Tapmask_SAM"},  # not a DNS-1123 label
        {"extra": "sam3"},  # no CPU_TORCH entry
        {"extra": None},  # a GPU variant without torch
        {"min_pos_points": None},  # an interactor needs it
        {"help_message": ""},  # an interactor needs it
        {"labels": (Label("car"),)},  # labels are for detectors
        {"workers": 2},  # without a workers_note
    ],
    ids=str,
)
def test_the_table_refuses_entries_cvat_or_nuclio_would_not_take(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(SAM, **changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"labels": ()},
        {"labels": (Label("car"), Label("car", "polygon"))},
        {"min_pos_points": 0},
        {"box": "optional"},
    ],
    ids=str,
)
def test_the_table_refuses_detectors_cvat_would_not_take(changes):
    with pytest.raises(ValueError):
        dataclasses.replace(DETECTOR, **changes)
