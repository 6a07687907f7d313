"""``docker/``: the Dockerfiles (read instruction by instruction, no Docker engine), the build
context's ``.dockerignore``, and how ``serverless/`` and the Makefile build on the images.
``make lint`` adds hadolint.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.docker_files import (
    DOCKERFILES,
    FUNCTION_YAMLS,
    IMAGES,
    REPO,
    WEIGHT_SUFFIXES,
    exec_form,
    expand,
    from_image,
    instructions,
    is_pinned,
    stage_args,
    stages,
)


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
        "tests/test_dockerfiles.py",
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
