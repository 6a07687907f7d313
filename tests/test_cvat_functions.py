"""``serverless/``: every nuclio function YAML against the rules CVAT lists functions by.

CVAT's lambda manager reads ``metadata.name``, ``metadata.annotations`` (which nuclio stores as
strings) and ``spec.description`` of every function in the nuclio project ``cvat``. A function it
cannot parse is skipped (unknown ``type``) or breaks the whole list with a 500 (no description,
a ``version``/``min_*_points`` that ``int()`` rejects, a ``spec`` that is not JSON). See
``shared/protocols/cvat.md``. The files are generated from ``serverless/functions.py``;
``tests/test_cvat_function_table.py`` checks that they are what the table generates.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.cvat import handler as cvat_handler
from backends.models import registry
from serverless.functions import FUNCTIONS as TABLE

SERVERLESS = Path(__file__).resolve().parents[1] / "serverless"
FUNCTIONS = {function.folder: function for function in TABLE}
YAMLS = sorted(SERVERLESS.glob("*/nuclio/function*.yaml"))
MiB = 1 << 20
#: The kinds tapmask writes (CVAT also knows "reid").
KINDS = ("interactor", "detector", "tracker")


def _load(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), path
    return config


def _id(path: Path) -> str:
    return f"{path.parents[1].name}/{path.name}"


def _is_gpu(path: Path) -> bool:
    return path.name == "function-gpu.yaml"


def _env(config: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in config["spec"].get("env", [])}


def nuclio_annotation(value: Any) -> str:
    """An annotation value as nuclio stores it (a string map) and CVAT receives it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def cvat_lambda_function(config: dict[str, Any]) -> dict[str, Any]:
    """What CVAT's ``LambdaFunction.__init__`` does with a function (raises where CVAT fails)."""
    meta = config["metadata"]
    annotations = {key: nuclio_annotation(v) for key, v in meta["annotations"].items()}
    kind = annotations.get("type")
    if kind not in ("detector", "interactor", "reid", "tracker"):
        raise ValueError(f"unknown type {kind!r}: CVAT skips the function")
    return {
        "id": meta["name"],
        "kind": kind,
        "labels": json.loads(annotations.get("spec") or "[]"),
        "description": config["spec"]["description"],
        "name": annotations.get("name", meta["name"]),
        "min_pos_points": int(annotations.get("min_pos_points", 1)),
        "min_neg_points": int(annotations.get("min_neg_points", -1)),
        "startswith_box": bool(annotations.get("startswith_box", False)),
        "startswith_box_optional": bool(annotations.get("startswith_box_optional", False)),
        "version": int(annotations.get("version", "1")),
        "help_message": annotations.get("help_message", ""),
    }


def _cvat_int(value: Any) -> int:
    """An int, or an int-string, as CVAT's ``int()`` of nuclio's string accepts it."""
    assert not isinstance(value, bool), f"{value!r} is a boolean, not an integer"
    assert isinstance(value, (int, str)), f"{value!r} must be an integer"
    return int(value)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert match, f"eventTimeout {duration!r} is not a Go duration like 120s"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


# --------------------------------------------------------------------------------------------


def test_function_folders_follow_cvats_layout():
    folders = {p.name for p in SERVERLESS.iterdir() if (p / "nuclio").is_dir()}
    assert folders == FUNCTIONS.keys()
    for name, function in FUNCTIONS.items():
        nuclio = SERVERLESS / name / "nuclio"
        assert (nuclio / "function.yaml").is_file() and (nuclio / "main.py").is_file()
        assert (nuclio / "function-gpu.yaml").is_file() == function.gpu, name
    assert (SERVERLESS / "README.md").is_file()


@pytest.mark.parametrize("path", YAMLS, ids=_id)
def test_cvat_lists_the_function(path):
    check_listing(_load(path))


def check_listing(config: dict[str, Any]) -> None:
    """CVAT's listing rules for one function, per kind (also used on entries not yet added)."""
    meta = config["metadata"]
    assert isinstance(meta.get("name"), str)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), "a DNS-1123 name"
    annotations = meta["annotations"]
    kind = annotations["type"]
    assert kind in KINDS
    assert _cvat_int(annotations["version"]) >= 2, "version < 2 greys out Interact"
    spec = annotations.get("spec")
    assert spec in (None, "") or isinstance(json.loads(spec), list), "spec: empty or JSON"
    for key in ("startswith_box", "startswith_box_optional"):
        if key in annotations:
            # Any non-empty string is true for CVAT, "false" included: present means YAML true.
            assert annotations[key] is True, key
    assert not {"startswith_box", "startswith_box_optional"} <= annotations.keys()
    assert isinstance(annotations.get("name"), str) and annotations["name"].strip()
    description = config["spec"].get("description")
    assert isinstance(description, str) and description.strip(), "no description breaks CVAT"

    listed = cvat_lambda_function(config)
    assert listed["kind"] == kind and listed["version"] >= 2
    if kind == "interactor":
        assert _cvat_int(annotations["min_pos_points"]) >= 0
        assert _cvat_int(annotations["min_neg_points"]) == 0, "-1 would disable negative clicks"
        assert isinstance(annotations.get("help_message"), str) and annotations["help_message"]
    else:
        assert "startswith_box" not in annotations and "startswith_box_optional" not in annotations
    if kind == "detector":
        # CVAT maps the labels to a task's labels by name: they must be unique.
        names = [label["name"] for label in listed["labels"]]
        assert names and len(set(names)) == len(names)
        assert all(isinstance(label["id"], int) for label in listed["labels"])
    else:
        assert listed["labels"] == []


@pytest.mark.parametrize("path", YAMLS, ids=_id)
def test_nuclio_spec(path):
    config = _load(path)
    spec = config["spec"]
    gpu = _is_gpu(path)
    assert spec["runtime"] == "python:3.11"
    assert spec["handler"] == "main:handler"
    timeout = _seconds(spec["eventTimeout"])
    assert (30 if gpu else 60) <= timeout <= 120, "CVAT waits 120 s at most"

    triggers = spec["triggers"]
    assert len(triggers) == 1
    (trigger,) = triggers.values()
    assert trigger["kind"] == "http"
    assert trigger["workerAvailabilityTimeoutMilliseconds"] == 10000
    workers = trigger["numWorkers"]
    assert isinstance(workers, int) and workers >= 1
    if gpu or registry.spec(_env(config)["TAPMASK_MODEL"]).extra:
        assert workers == 1, "one process: one model copy, caches shared by all clicks"
    body = trigger["attributes"]["maxRequestBodySize"]
    assert isinstance(body, int) and body >= 128 * MiB

    limits = (spec.get("resources") or {}).get("limits") or {}
    env = _env(config)
    if gpu:
        assert limits.get("nvidia.com/gpu") == 1
        assert env.get("TAPMASK_DEVICE", "").startswith("cuda")
        assert spec["build"]["baseImage"] == "tapmask/tapmask-gpu:latest"
    else:
        assert "nvidia.com/gpu" not in limits
        assert env.get("TAPMASK_DEVICE", "cpu") == "cpu"
        assert spec["build"]["baseImage"] == "tapmask/tapmask-cpu:latest"


@pytest.mark.parametrize("path", YAMLS, ids=_id)
def test_environment_build_and_weights(path):
    config = _load(path)
    spec = config["spec"]
    env = _env(config)
    name = path.parents[1].name
    model = env["TAPMASK_MODEL"]
    assert model in registry.names()
    settings = cvat_handler.settings_from_env(env)
    assert settings.model == model

    embedding = config["metadata"]["name"] == cvat_handler.STOCK_SAM_FUNCTION
    assert embedding == (name == "sam-embedding")
    assert (settings.mode == cvat_handler.MODE_EMBEDDING) == embedding
    if embedding:
        assert model in ("sam", "sam-vit_h"), "the plugin's decoder is exported for ViT-H"

    # Weights: a read-only volume at /models, never baked into the image or downloaded.
    checkpoints = {k: v for k, v in env.items() if k.endswith(("_CHECKPOINT", "_MODEL_DIR"))}
    volumes = spec.get("volumes", [])
    assert bool(checkpoints) == bool(volumes)
    assert bool(checkpoints) == bool(registry.spec(model).extra), "weights-free: GrabCut only"
    if checkpoints:
        assert all(v.startswith("/models/") for v in checkpoints.values())
        mounts = [v["volumeMount"] for v in volumes]
        assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in mounts)
    directives = spec["build"]["directives"]
    commands = [d["value"] for phase in directives.values() for d in phase]
    assert all(
        d["kind"] in ("RUN", "ENV", "WORKDIR") for phase in directives for d in directives[phase]
    )
    text = " ".join(commands)
    assert not re.search(r"curl|wget|\.pth|ADD ", text), "no weights in the image"
    extra = registry.spec(model).extra  # the extra the model's own import error asks for
    expected = f"'tapmask[{extra}]'" if extra else "tapmask"
    installs = [
        c for c in directives["postCopy"] if "--find-links /opt/nuclio/wheels" in c["value"]
    ]
    assert installs and installs[0]["value"].endswith(expected)
    assert any("--force-reinstall /opt/nuclio/wheels/tapmask-" in c for c in commands)


def test_function_names():
    names = {}
    for path in YAMLS:
        names.setdefault(path.parents[1].name, set()).add(_load(path)["metadata"]["name"])
    assert all(len(v) == 1 for v in names.values()), "CPU and GPU variants share a name"
    flat = {name: next(iter(v)) for name, v in names.items()}
    assert flat["sam-embedding"] == "pth-facebookresearch-sam-vit-h"
    assert len(set(flat.values())) == len(flat)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_main_py_imports_the_shared_handler(name):
    path = SERVERLESS / name / "nuclio" / "main.py"
    spec = importlib.util.spec_from_file_location(f"tapmask_nuclio_main_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.handler is cvat_handler.handler
    assert module.init_context is cvat_handler.init_context


def test_deploy_script_dry_run():
    script = SERVERLESS / "deploy.sh"

    def run(*args):
        return subprocess.run(
            ["bash", str(script), "--dry-run", *args], capture_output=True, text=True, timeout=60
        )

    result = run()
    assert result.returncode == 0, result.stderr
    deploys = [line for line in result.stdout.splitlines() if " deploy " in line]
    assert len(deploys) == len(FUNCTIONS)
    for line in deploys:
        assert "--project-name cvat" in line and "--platform local" in line
        assert re.search(r"--file \S+/function\.yaml", line)
    assert "pip wheel" in result.stdout
    # deploy.sh reads baseImage with sed: an unquoted scalar on its own line
    assert "# if tapmask/tapmask-cpu:latest is not built locally" in result.stdout

    result = run("--gpu", "sam", "grabcut")
    assert result.returncode == 0, result.stderr
    deploys = [line for line in result.stdout.splitlines() if " deploy " in line]
    assert "sam/function-gpu.yaml" in deploys[0] and "grabcut/function.yaml" in deploys[1]
    assert "no GPU variant" in result.stderr
    assert "# if tapmask/tapmask-gpu:latest is not built locally" in result.stdout

    assert run("nonexistent").returncode == 2


def test_the_cvat_emulation_rejects_what_breaks_cvat():
    good = _load(SERVERLESS / "sam" / "nuclio" / "function.yaml")
    assert cvat_lambda_function(good)["startswith_box_optional"] is True

    def broken(**annotations):
        config = json.loads(json.dumps(good))
        config["metadata"]["annotations"].update(annotations)
        return config

    for bad in (broken(version="2.0"), broken(min_pos_points="one"), broken(spec="[labels")):
        with pytest.raises(ValueError):
            cvat_lambda_function(bad)
    with pytest.raises(ValueError, match="skips"):
        cvat_lambda_function(broken(type="interactive"))
    no_description = json.loads(json.dumps(good))
    del no_description["spec"]["description"]
    with pytest.raises(KeyError):
        cvat_lambda_function(no_description)
    # nuclio turns YAML false into "false", which CVAT reads as true: the reason to omit it.
    assert cvat_lambda_function(broken(startswith_box_optional=False))["startswith_box_optional"]
