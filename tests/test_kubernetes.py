"""deploy/kubernetes against the code it deploys: rendered the way ``kubectl apply -k`` would
(``deploy.check.build``), validated offline, and tied to what the dispatcher, the worker, the
images and the settings really do. No cluster is needed; one test uses a real redis-server.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from backends import images
from backends.cli import build_parser
from backends.errors import Unavailable
from backends.prompts import Click, Prompt
from backends.redis.dispatcher import RedisDispatcher
from backends.redis.protocol import QUEUE_KINDS, Keys
from deploy import check
from tests.support.docker_files import (
    COMPOSE,
    DOCKERFILES,
    IMAGES,
    exec_form,
    expand,
    load_raw,
    stage_args,
    stages,
)
from tests.support.processes import RedisServer

RENDERINGS = {"gpu": check.KUBERNETES, "cpu": check.KUBERNETES / "overlays" / "cpu"}
HEALTHCHECK_MODES = ("labelstudio", "worker", "redis", "url")
#: Seconds a worker needs after its last job to leave (result write, heartbeat and command
#: threads joined, presence deleted): measured well under 2 s in tests/test_worker_ops.py.
DRAIN_MARGIN_S = 10


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, check.build(RENDERINGS[request.param])


def _by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _config(resources: list[dict[str, Any]]) -> dict[str, str]:
    return _by_kind(resources, "ConfigMap")["tapmask-config"]["data"]


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def _workers(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in _by_kind(resources, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def _cli_args(container: dict[str, Any], env: dict[str, str], monkeypatch) -> argparse.Namespace:
    """The container's arguments parsed by the real ``tapmask`` parser, with the container's
    environment (the ConfigMap) in place: what the entry point would run."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(container["args"])


def _worker_lists(args: argparse.Namespace, keys: Keys) -> set[str]:
    from backends.redis.startup import _split, queue_kinds

    return {
        Keys.queue_list(keys.queue(model, kind))
        for model in _split(args.models)
        for kind in queue_kinds(args.queue_kinds)
    }


# -- validation ------------------------------------------------------------------------------------


def test_every_kustomization_renders_and_validates():
    assert check.check() == []


def test_the_checks_catch_what_a_cluster_would_refuse(rendered):
    _, resources = rendered
    worker = copy.deepcopy(next(iter(_workers(resources).values())))
    _pod(worker)["terminationGracePeriodSecond"] = 90  # a typo: the API server refuses it
    assert any("terminationGracePeriodSecond" in p for p in check.validate_resource(worker))
    scaled = copy.deepcopy(next(iter(_by_kind(resources, "ScaledObject").values())))
    scaled["spec"]["triggers"][0]["metadata"]["listname"] = "x"  # KEDA would ignore it
    assert any("listname" in p for p in check.validate_resource(scaled))
    scaled = copy.deepcopy(next(iter(_by_kind(resources, "ScaledObject").values())))
    scaled["spec"]["minReplicaCount"] = scaled["spec"]["maxReplicaCount"] + 1
    assert check.validate_resource(scaled) == [
        f"minReplicaCount {scaled['spec']['minReplicaCount']} > maxReplicaCount "
        f"{scaled['spec']['maxReplicaCount']}"
    ]


def test_the_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [cm.yaml]\ncommonLabels: {a: b}\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(check.ManifestError, match="commonLabels"):
        check.build(tmp_path)


def test_the_renderer_applies_patches_namespace_and_images(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [d.yaml]\n"
    )
    (base / "d.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "w"},
                "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "a/b:1"}]}}},
            }
        )
    )
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: ns\n"
        "resources: [base]\nimages: [{name: a/b, newName: r.io/a/b, newTag: '2'}]\n"
        "patches:\n- target: {kind: Deployment, name: w}\n  patch: |-\n"
        "    - {op: add, path: /spec/replicas, value: 3}\n"
    )
    (deployment,) = check.build(tmp_path)
    assert deployment["metadata"]["namespace"] == "ns" and deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "r.io/a/b:2"


# -- autoscaling -----------------------------------------------------------------------------------


def test_each_worker_group_scales_on_exactly_the_lists_it_serves(rendered, monkeypatch):
    name, resources = rendered
    config = _config(resources)
    keys = Keys(config["TAPMASK_REDIS_NAMESPACE"])
    scaled = _by_kind(resources, "ScaledObject")
    workers = _workers(resources)
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == set(workers)
    served_interactive: set[str] = set()
    for so in scaled.values():
        deployment = workers[so["spec"]["scaleTargetRef"]["name"]]
        args = _cli_args(_pod(deployment)["containers"][0], config, monkeypatch)
        lists = [t["metadata"]["listName"] for t in so["spec"]["triggers"]]
        assert sorted(lists) == sorted(_worker_lists(args, keys)), so["metadata"]["name"]
        assert all(t["type"] == "redis" for t in so["spec"]["triggers"])
        kinds = set(args.queue_kinds.split(","))
        if "interactive" in kinds:  # the first click must not wait for a pod and a model load
            assert so["spec"]["minReplicaCount"] >= 1, so["metadata"]["name"]
            served_interactive.update(args.models[0].split(","))
        else:  # batch only: back to zero when idle, woken by a real backlog
            assert so["spec"]["minReplicaCount"] == 0
            for trigger in so["spec"]["triggers"]:
                assert int(trigger["metadata"]["activationListLength"]) >= 1
        assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    # The Label Studio backend's model is served by a group that takes clicks.
    assert config["TAPMASK_MODEL"] in served_interactive, name


def test_keda_reads_the_redis_the_workers_use(rendered):
    _, resources = rendered
    config = _config(resources)
    url = re.fullmatch(r"redis://([\w.-]+):(\d+)/(\d+)", config["TAPMASK_REDIS_URL"])
    assert url, config["TAPMASK_REDIS_URL"]
    service = _by_kind(resources, "Service")[url.group(1)]
    namespace = service["metadata"]["namespace"]
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    assert str(port) == url.group(2)
    for so in _by_kind(resources, "ScaledObject").values():
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            # KEDA's operator runs in its own namespace: the address names ours.
            assert meta["address"] == f"{url.group(1)}.{namespace}.svc:{port}"
            assert meta["databaseIndex"] == url.group(3)


def test_list_names_are_the_lists_the_dispatcher_pushes_to():
    """A real enqueue through ``RedisDispatcher`` (a click and a prefetch per model) on a real
    Redis: the only lists it creates are the ones the ScaledObjects count."""
    resources = check.build(check.KUBERNETES)
    config = _config(resources)
    triggers = {
        t["metadata"]["listName"]
        for so in _by_kind(resources, "ScaledObject").values()
        for t in so["spec"]["triggers"]
    }
    models = sorted({lst.split(":")[-2] for lst in triggers})
    png = images.encode_png(np.zeros((8, 8, 3), np.uint8))
    with RedisServer() as server:
        connection = server.client()
        dispatcher = RedisDispatcher(
            server.url, namespace=config["TAPMASK_REDIS_NAMESPACE"], queue_ttl=1, job_timeout=1
        )
        try:
            for model in models:
                with pytest.raises(Unavailable):  # no worker: dropped, its id still listed
                    dispatcher.segment(model, png, Prompt((Click(1, 1),)))
                dispatcher.prefetch(model, png)
            pushed = {
                key.decode()
                for key in connection.scan_iter(count=1000)
                if connection.type(key) == b"list"
            }
        finally:
            dispatcher.close()
            connection.close()
    assert pushed == triggers
    assert len(pushed) == len(models) * len(QUEUE_KINDS)


# -- drain safety ----------------------------------------------------------------------------------


def test_grace_period_exceeds_the_job_timeout(rendered, monkeypatch):
    _, resources = rendered
    config = _config(resources)
    job_timeout = int(config["TAPMASK_JOB_TIMEOUT"])
    assert int(config["TAPMASK_QUEUE_TTL"]) < job_timeout
    for name, deployment in _workers(resources).items():
        grace = _pod(deployment)["terminationGracePeriodSeconds"]
        assert grace >= job_timeout + DRAIN_MARGIN_S, name
        # The worker itself caps every job at the same setting, whatever a front end asked.
        args = _cli_args(_pod(deployment)["containers"][0], config, monkeypatch)
        assert args.job_timeout == job_timeout, name
        rollout = deployment["spec"]["strategy"]["rollingUpdate"]
        assert rollout["maxUnavailable"] == 0, "a new worker is ready before an old one drains"
    # The backend waits at most queue TTL + job timeout + 2 s for a click: it must not be
    # stopped before its own last answer.
    backend = _by_kind(resources, "Deployment")["labelstudio-backend"]
    wait = int(config["TAPMASK_QUEUE_TTL"]) + job_timeout + 2
    assert _pod(backend)["terminationGracePeriodSeconds"] > wait


# -- images, entry points, settings ----------------------------------------------------------------


def _runtime(kind: str) -> dict[str, list[str]]:
    global_args, all_stages = stages(DOCKERFILES[kind])
    runtime = all_stages[-1]
    args = {**global_args, **stage_args(runtime, global_args)}
    by_kind: dict[str, list[str]] = {}
    for keyword, rest in runtime:
        by_kind.setdefault(keyword, []).append(expand(rest, args))
    return by_kind


def test_images_and_entry_points_match_docker(rendered, monkeypatch):
    _, resources = rendered
    config = _config(resources)
    compose_redis = load_raw(COMPOSE)["services"]["redis"]
    dockerfile_of = {image: Path(path).name for image, path in IMAGES.items()}
    for name, deployment in _by_kind(resources, "Deployment").items():
        pod = _pod(deployment)
        (container,) = pod["containers"]
        if name == "redis":
            assert container["image"] == compose_redis["image"]  # one pinned Redis
            args = container["args"]
            assert args[: len(compose_redis["command"])] == compose_redis["command"]
            assert args[args.index("--maxmemory-policy") + 1] == "volatile-lru"
            continue
        image = container["image"]
        assert image in IMAGES, f"{name}: {image} is not built from docker/"
        kind = "gpu" if dockerfile_of[image] == "Dockerfile.gpu" else "cpu"
        runtime = _runtime(kind)
        # No `command`: the image's ENTRYPOINT (tapmask-entrypoint) runs, args are a tapmask
        # subcommand, and the real parser accepts every flag.
        assert "command" not in container, name
        assert exec_form(runtime["ENTRYPOINT"][-1]) == ["tapmask-entrypoint"]
        args = _cli_args(container, config, monkeypatch)
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if args.command == "worker":
            assert (kind == "gpu") == bool(gpus), f"{name}: GPU image iff a GPU is requested"
            assert (args.device or "").startswith("cuda") == bool(gpus), name
            port = container["ports"][0]
            assert port["name"] == "metrics"
            assert (
                port["containerPort"]
                == args.metrics_port
                == int(config["TAPMASK_WORKER_METRICS_PORT"])
            )
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(args.metrics_port)
        else:
            assert args.command == "serve" and args.frontend == "labelstudio", name
            assert not gpus and kind == "cpu"  # the backend loads no model
            assert [p["containerPort"] for p in container["ports"]] == [args.port]
        # Probes run programs the image installs, in modes the health check has.
        installed = {c.split()[-1].rsplit("/", 1)[-1] for c in runtime["COPY"] if "--from" not in c}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[0] in installed, f"{name} {probe}: {command[0]}"
                assert command[1] in HEALTHCHECK_MODES
        # The image's non-root user.
        (user,) = runtime["USER"]
        assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
        # Every worker mounts the models read-only, from the PVC.
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] == "/models":
                assert mount["readOnly"] is True
                (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
                assert volume["persistentVolumeClaim"]["readOnly"] is True
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert claim in _by_kind(resources, "PersistentVolumeClaim")


def test_settings_come_from_one_configmap(rendered):
    _, resources = rendered
    config = _config(resources)
    maxmemory = config["TAPMASK_REDIS_MAXMEMORY"]
    assert int(config["TAPMASK_SHARED_EMBEDDINGS_MB"]) * 2**20 <= _bytes(maxmemory) / 2
    for name, deployment in _by_kind(resources, "Deployment").items():
        (container,) = _pod(deployment)["containers"]
        sources = [
            s["configMapRef"]["name"] for s in container.get("envFrom", []) if "configMapRef" in s
        ]
        if name == "redis":  # reads its one setting from the same ConfigMap
            (env,) = container["env"]
            assert env["valueFrom"]["configMapKeyRef"]["name"] == "tapmask-config"
            limit = container["resources"]["limits"]["memory"]
            assert _bytes(limit) > _bytes(maxmemory), "Redis needs room above maxmemory"
        else:
            assert sources == ["tapmask-config"], name
            assert "env" not in container, f"{name}: settings belong in the ConfigMap"


def test_the_cpu_overlay_needs_no_gpu():
    resources = check.build(RENDERINGS["cpu"])
    text = yaml.safe_dump_all(resources)
    assert "nvidia.com/gpu" not in text and "tapmask-gpu" not in text
    assert _config(resources)["TAPMASK_MODEL"] == "grabcut"
    assert _config(check.build(RENDERINGS["gpu"]))["TAPMASK_MODEL"] == "sam-vit_h"


def test_monitoring_scrapes_the_ports_the_pods_expose():
    monitors = _by_kind(check.build(check.KUBERNETES / "monitoring"), "PodMonitor")
    resources = check.build(check.KUBERNETES)
    for monitor in monitors.values():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        pods = [
            d
            for d in _by_kind(resources, "Deployment").values()
            if wanted.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for deployment in pods:
                ports = {p["name"] for p in _pod(deployment)["containers"][0]["ports"]}
                assert endpoint["port"] in ports


def _bytes(quantity: str) -> int:
    """``4Gi``, ``3gb`` (Redis' unit) or plain bytes."""
    match = re.fullmatch(r"(\d+)\s*([KMGT]i|[kmgt]b|)", quantity.strip())
    assert match, quantity
    units = {"": 1, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    units |= {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}  # Redis: 1gb = 2**30 bytes
    return int(match.group(1)) * units[match.group(2).lower()]
