"""Write the CVAT functions' files from the table in ``serverless/functions.py``.

    python -m serverless.generate            # rewrite serverless/*/nuclio/ (make cvat-functions)
    python -m serverless.generate --check    # list the files that differ; exit 1 if any

The generated files are committed, because ``nuctl deploy`` and CVAT users read them;
``tests/test_cvat_function_table.py`` fails when one differs from what this module writes. What
all functions share is written here once; :mod:`serverless.functions` holds the entries and the
CPU/GPU variant rule.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from serverless.functions import CPU_TORCH, FUNCTIONS, MODELS_MOUNT, Function, Label, Variant

SERVERLESS = Path(__file__).resolve().parent
WIDTH = 100
#: The host folder mounted at /models; serverless/deploy.sh rewrites ``path: <it>`` for MODELS_DIR.
MODELS_HOST_DIR = "/opt/tapmask/models"
#: Where nuclio puts the wheels/ folder that deploy.sh stages next to main.py.
WHEELS = "/opt/nuclio/wheels"
MAX_REQUEST_BODY = 128 << 20
BODY_NOTE = "128 MiB: the base64 image is ~4/3 of the file"
GENERATED = "Generated from serverless/functions.py by `make cvat-functions`: edit the table there."

MAIN_PY = '''\
"""nuclio entry point: tapmask's shared CVAT handler (configured by ``spec.env`` in the YAML)."""

from backends.cvat.handler import handler, init_context

__all__ = ["handler", "init_context"]
'''

#: Keys preceded by an empty line, so a reader sees the sections of a function.
BLANK_BEFORE = {
    ("spec",),
    ("spec", "build"),
    ("spec", "triggers"),
    ("spec", "resources"),
    ("spec", "volumes"),
    ("spec", "platform"),
}
TRIGGER = ("spec", "triggers", "myHttpTrigger")


class SingleQuoted(str):
    """A string written in single quotes although YAML does not need them (``'python:3.11'``)."""


# --------------------------------------------------------------------------------------------
# The document: what a YAML file means


def document(function: Function, variant: Variant) -> dict[str, Any]:
    """The parsed content of ``function``'s ``variant`` YAML file."""
    spec: dict[str, Any] = {
        "description": function.description,
        "runtime": SingleQuoted("python:3.11"),  # nuclio >= 1.14.1 builds only 3.9 to 3.11
        "handler": "main:handler",
        "eventTimeout": variant.event_timeout,
        "env": [{"name": name, "value": value} for name, value in environment(function, variant)],
        "build": {
            "image": f"tapmask/cvat-{function.folder}{variant.image_suffix}:latest",
            "baseImage": variant.base_image,
            "directives": directives(function, variant),
        },
        "triggers": {
            TRIGGER[-1]: {
                "kind": "http",
                "numWorkers": function.workers,
                "workerAvailabilityTimeoutMilliseconds": 10000,
                "attributes": {"maxRequestBodySize": MAX_REQUEST_BODY},
            }
        },
    }
    if variant.gpus:
        spec["resources"] = {"limits": {"nvidia.com/gpu": variant.gpus}}
    if function.weights:
        spec["volumes"] = [
            {
                "volume": {"name": "tapmask-models", "hostPath": {"path": MODELS_HOST_DIR}},
                "volumeMount": {
                    "name": "tapmask-models",
                    "mountPath": MODELS_MOUNT,
                    "readOnly": True,
                },
            }
        ]
    spec["platform"] = {
        "attributes": {
            "restartPolicy": {"name": "always", "maximumRetryCount": 3},
            "mountMode": "volume",
        }
    }
    return {
        "metadata": {
            "name": function.name,
            "namespace": "cvat",
            "annotations": annotations(function),
        },
        "spec": spec,
    }


def annotations(function: Function) -> dict[str, Any]:
    """``metadata.annotations``: all CVAT reads besides the name and the description."""
    result: dict[str, Any] = {
        "name": function.title,
        "version": 2,  # < 2 greys out the Interact button
        "type": function.kind,
        "spec": labels_json(function.labels),
        "framework": function.framework,
    }
    if function.kind == "interactor":
        result["min_pos_points"] = function.min_pos_points
        result["min_neg_points"] = 0  # CVAT's default, -1, disables negative clicks
    # Written only when true: nuclio stores "false", which CVAT reads as true.
    if function.box == "optional":
        result["startswith_box_optional"] = True
    elif function.box == "required":
        result["startswith_box"] = True
    if function.help_message:
        result["help_message"] = function.help_message
    if function.shape_types:
        result["supported_shape_types"] = ", ".join(function.shape_types)
    return result


def labels_json(labels: tuple[Label, ...]) -> str | None:
    """A detector's labels as CVAT parses ``spec``: a JSON list, one label a line."""
    if not labels:
        return None
    items = (
        json.dumps({"id": index, "name": label.name, "type": label.type})
        for index, label in enumerate(labels)
    )
    return "[\n" + ",\n".join(f"  {item}" for item in items) + "\n]\n"


def environment(function: Function, variant: Variant) -> list[tuple[str, str]]:
    env = [("TAPMASK_MODEL", function.model), *function.env]
    if function.labels:  # the handler's copy of spec (backends/cvat/detector.py reads it)
        labels = [{"name": label.name, "type": label.type} for label in function.labels]
        env.append(("TAPMASK_DETECTOR_LABELS", json.dumps(labels)))
    if function.weights:
        env.append(("TAPMASK_MODELS_DIR", MODELS_MOUNT))
    if function.torch:
        env.append(("TAPMASK_DEVICE", variant.device))
    return env


def directives(function: Function, variant: Variant) -> dict[str, list[dict[str, str]]]:
    """Install tapmask with the function's extra from the staged wheel, then that wheel over any
    tapmask in the base image, so a function always runs the code it was deployed from."""
    result = {}
    torch = CPU_TORCH[function.extra]
    if variant.torch_index and torch:
        pip = f"pip install --no-cache-dir --index-url {variant.torch_index}"
        result["preCopy"] = [_run(f"{pip} {' '.join(torch)}")]
    requirement = f"'tapmask[{function.extra}]'" if function.extra else "tapmask"
    result["postCopy"] = [
        _run(f"pip install --no-cache-dir --find-links {WHEELS} {requirement}"),
        _run(f"pip install --no-cache-dir --no-deps --force-reinstall {WHEELS}/tapmask-*.whl"),
    ]
    return result


def _run(command: str) -> dict[str, str]:
    return {"kind": "RUN", "value": command}


def notes(function: Function) -> dict[tuple[str, ...], str]:
    """Comments by key path: at the end of the key's line where it fits, else on the line above."""
    result = {(*TRIGGER, "attributes", "maxRequestBodySize"): BODY_NOTE}
    if function.workers_note:
        result[(*TRIGGER, "numWorkers")] = function.workers_note
    return result


def header(function: Function, variant: Variant) -> list[str]:
    """The file's opening comment: what the function is, how to deploy it, where it comes from."""
    about = textwrap.wrap(
        f"tapmask: {function.about}", WIDTH - 2, break_long_words=False, break_on_hyphens=False
    )
    deploy = f"Deploy: {_deploy(function, variant)}"
    others = [other for other in function.variants if other != variant]
    if others:
        alternatives = "; ".join(f"{other.label}: {_deploy(function, other)}" for other in others)
        deploy += f" ({variant.label}; {alternatives})"
    else:
        deploy += " (CPU only: there is no GPU variant)"
    return [*about, deploy, GENERATED]


def _deploy(function: Function, variant: Variant) -> str:
    return " ".join(filter(None, ["serverless/deploy.sh", variant.deploy_flags, function.folder]))


# --------------------------------------------------------------------------------------------
# The text: a document written as YAML a person reads


def yaml_text(function: Function, variant: Variant) -> str:
    return render(document(function, variant), notes(function), header(function, variant))


def render(doc: Mapping[str, Any], comments: Mapping[tuple[str, ...], str], top: list[str]) -> str:
    """Block-style YAML of ``doc`` in its key order, with ``top`` and ``comments`` as comments.

    PyYAML cannot write comments, so this writes the structure and lets PyYAML write each scalar
    (quoting what needs it); the tests parse the result back and compare it with ``doc``.
    """
    lines = [f"# {line}" for line in top]
    lines += _mapping(doc, 0, (), comments)
    return "\n".join(lines) + "\n"


def _mapping(
    mapping: Mapping[str, Any], indent: int, path: tuple[str, ...], comments: Mapping
) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, value in mapping.items():
        here = (*path, key)
        if here in BLANK_BEFORE:
            lines.append("")
        comment = comments.get(here)
        if isinstance(value, (Mapping, list)) and value:
            body = [f"{pad}{key}:"]
            if isinstance(value, Mapping):
                body += _mapping(value, indent + 2, here, comments)
            else:
                for item in value:
                    body += _item(item, indent + 2, (*here, "-"), comments)
        elif isinstance(value, str) and "\n" in value:
            chomp = "" if value.endswith("\n") else "-"
            body = [f"{pad}{key}: |{chomp}"]
            body += [f"{pad}  {line}".rstrip() for line in value.removesuffix("\n").split("\n")]
        else:
            line = f"{pad}{key}: {_scalar(value)}".rstrip()
            if comment and len(f"{line} # {comment}") <= WIDTH:
                line, comment = f"{line} # {comment}", None
            body = [line]
        if comment:
            lines.append(f"{pad}# {comment}")
        lines += body
    return lines


def _item(item: Any, indent: int, path: tuple[str, ...], comments: Mapping) -> list[str]:
    pad = " " * indent
    if isinstance(item, Mapping) and item:
        first, *rest = _mapping(item, indent + 2, path, comments)
        return [f"{pad}- {first[indent + 2 :]}", *rest]
    return [f"{pad}- {_scalar(item)}"]


def _scalar(value: Any) -> str:
    if isinstance(value, SingleQuoted):
        return "'" + value.replace("'", "''") + "'"
    if value is None:
        return ""  # `key:` alone, as CVAT's functions write an empty spec
    text = yaml.safe_dump(value, width=math.inf, allow_unicode=True, default_flow_style=True)
    text = text.removesuffix("\n...\n").removesuffix("\n")
    if "\n" in text:
        raise ValueError(f"{value!r} does not fit on one line")
    return text


# --------------------------------------------------------------------------------------------
# The files


def files(root: Path = SERVERLESS) -> dict[Path, str]:
    """Every generated file under ``root`` (``serverless/``) and its text."""
    result: dict[Path, str] = {}
    for function in FUNCTIONS:
        folder = root / function.folder / "nuclio"
        if folder / "main.py" in result:
            raise ValueError(f"serverless/functions.py: two entries for {function.folder}")
        for variant in function.variants:
            result[folder / variant.yaml] = yaml_text(function, variant)
        result[folder / "main.py"] = MAIN_PY
    return result


def stale(root: Path = SERVERLESS) -> list[Path]:
    """Generated files that differ or are missing, then function files the table no longer has."""
    expected = files(root)
    changed = [
        path
        for path, text in expected.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    on_disk = {*root.glob("*/nuclio/function*.yaml"), *root.glob("*/nuclio/main.py")}
    return changed + sorted(on_disk - expected.keys())


def write(root: Path = SERVERLESS) -> list[Path]:
    """Bring ``root`` in line with the table; returns the files written or removed."""
    expected = files(root)
    done = stale(root)
    for path in done:
        if path in expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected[path], encoding="utf-8", newline="\n")
        else:
            path.unlink()
            for folder in (path.parent, path.parent.parent):  # nuclio/, then the function's
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serverless.generate",
        description="Write serverless/*/nuclio/ from the table in serverless/functions.py.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file differs"
    )
    args = parser.parse_args(argv)
    root = SERVERLESS.parent
    if args.check:
        paths = stale()
        for path in paths:
            print(f"stale: {path.relative_to(root)}")
        if paths:
            print("regenerate: make cvat-functions", file=sys.stderr)
        return 1 if paths else 0
    expected = files()
    for path in write():
        print(f"{'wrote' if path in expected else 'removed'} {path.relative_to(root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
