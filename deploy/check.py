"""``python -m deploy.check``: render and validate ``deploy/kubernetes`` offline (``make lint``).

No cluster and no kustomize binary: ``build`` renders a kustomization with the subset of
kustomize the manifests use (``resources``, ``namespace``, ``patches`` as JSON 6902 operations,
``images``, ``configMapGenerator`` without name hashes) and refuses any other field, so a
kustomize feature this renderer does not implement fails here instead of being checked wrongly.

Then every rendered object is validated:

* Kubernetes kinds against the Kubernetes OpenAPI schemas that the ``kubernetes-validate``
  package carries (strict: unknown fields are errors), for the oldest and the newest Kubernetes
  version the manifests claim (``K8S_VERSIONS``);
* KEDA ``ScaledObject`` s against ``deploy/kubernetes/schemas/keda-scaledobject-v2.20.json``
  (written from KEDA 2.20.2's CRD and Redis-list scaler, see its ``$comment``), plus the CRD's
  CEL rule and KEDA's own consistency rules (min <= max, idleReplicaCount < minReplicaCount);
* ``PrometheusRule`` / ``PodMonitor`` against ``schemas/monitoring-coreos-v1.json``;
* the Grafana dashboard JSON for its shape (every panel has a query).

Anything else is an error (no silent "schema not found" warning).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DEPLOY = Path(__file__).resolve().parent
KUBERNETES = DEPLOY / "kubernetes"
#: Every kustomization a user applies, by name.
KUSTOMIZATIONS = {
    "gpu (default)": KUBERNETES,
    "cpu overlay": KUBERNETES / "overlays" / "cpu",
    "monitoring": KUBERNETES / "monitoring",
}
SCHEMAS = KUBERNETES / "schemas"
KEDA_SCHEMA = SCHEMAS / "keda-scaledobject-v2.20.json"
MONITORING_SCHEMA = SCHEMAS / "monitoring-coreos-v1.json"
DASHBOARDS = sorted((KUBERNETES / "monitoring").glob("*.json"))
#: The oldest Kubernetes the manifests claim to run on, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", "1.37")

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "images",
    "configMapGenerator",
}
#: Kinds without a namespace (kustomize's namespace transformer leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "ClusterTriggerAuthentication",
}


class ManifestError(Exception):
    """A kustomization this renderer cannot render, or a malformed manifest."""


# --------------------------------------------------------------------------------------------
# Rendering (a kustomize subset)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a manifest file (empty documents dropped)."""
    with open(path) as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise ManifestError(f"{path}: every document must be an object with apiVersion/kind")
    return docs


def identity(resource: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = resource.get("metadata", {})
    return (resource["apiVersion"], resource["kind"], meta.get("namespace", ""), meta["name"])


def build(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k path`` would send (for the fields this repo uses)."""
    path = Path(path)
    kfile = path / "kustomization.yaml"
    if not kfile.is_file():
        raise ManifestError(f"{path}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = sorted(set(spec) - SUPPORTED_FIELDS)
    if unknown:
        raise ManifestError(f"{kfile}: fields this renderer does not implement: {unknown}")
    if spec.get("kind") != "Kustomization":
        raise ManifestError(f"{kfile}: kind must be Kustomization")

    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (path / entry).resolve()
        if target.is_dir():
            resources += build(target)
        elif target.is_file():
            resources += load_documents(target)
        else:
            raise ManifestError(f"{kfile}: resource {entry!r} does not exist")
    for generator in spec.get("configMapGenerator", []):
        resources.append(_generate_configmap(path, generator))
    for patch in spec.get("patches", []):
        _apply_patch(path, patch, resources)
    namespace = spec.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = namespace
    for image in spec.get("images", []):
        _set_image(resources, image)

    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        key = identity(resource)
        if key in seen:
            raise ManifestError(f"{kfile}: {key} is defined twice")
        seen.add(key)
    return resources


def _generate_configmap(path: Path, generator: dict[str, Any]) -> dict[str, Any]:
    options = generator.get("options", {})
    if not options.get("disableNameSuffixHash"):
        raise ManifestError(
            f"{path}: configMapGenerator {generator.get('name')!r} needs "
            "options.disableNameSuffixHash: true (name hashes are not implemented here)"
        )
    unknown = set(generator) - {"name", "files", "literals", "options"}
    unknown |= set(options) - {"disableNameSuffixHash", "labels", "annotations"}
    if unknown:
        raise ManifestError(f"{path}: configMapGenerator fields not implemented: {unknown}")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
        data[key or Path(source).name] = (path / source).read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    metadata: dict[str, Any] = {"name": generator["name"]}
    for field in ("labels", "annotations"):
        if options.get(field):
            metadata[field] = dict(options[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _matches(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise ManifestError(f"patch target selectors not implemented: {unknown}")
    api = resource["apiVersion"]
    group, _, version = api.rpartition("/")
    meta = resource.get("metadata", {})
    checks = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(checks[key] == value for key, value in target.items())


def _apply_patch(path: Path, patch: dict[str, Any], resources: list[dict[str, Any]]) -> None:
    if set(patch) - {"target", "patch", "path"} or "target" not in patch:
        raise ManifestError(f"{path}: only JSON 6902 patches with a target are implemented")
    text = patch["patch"] if "patch" in patch else (path / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise ManifestError(f"{path}: a patch must be a list of JSON 6902 operations")
    matched = [r for r in resources if _matches(r, patch["target"])]
    if not matched:
        raise ManifestError(f"{path}: patch target {patch['target']} matches nothing")
    for resource in matched:
        for operation in operations:
            json_patch(resource, operation)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ManifestError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, remove, replace, test) in place."""
    op, parts = operation.get("op"), _pointer(str(operation.get("path", "")))
    parent: Any = document
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    value = copy.deepcopy(operation.get("value"))
    try:
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op == "add":
                parent.insert(index, value)
            elif op == "remove":
                del parent[index]
            elif op == "replace":
                parent[index] = value
            elif op == "test":
                assert parent[index] == value
            else:
                raise ManifestError(f"JSON patch op {op!r} is not implemented")
        else:
            if op in ("remove", "replace", "test") and last not in parent:
                raise ManifestError(f"JSON patch {op} {operation['path']}: no such member")
            if op in ("add", "replace"):
                parent[last] = value
            elif op == "remove":
                del parent[last]
            elif op == "test":
                assert parent[last] == value
            else:
                raise ManifestError(f"JSON patch op {op!r} is not implemented")
    except (IndexError, KeyError, ValueError, AssertionError) as exc:
        raise ManifestError(f"JSON patch {operation} failed: {exc!r}") from exc


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers (and init containers) of a workload's pod template."""
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def _set_image(resources: list[dict[str, Any]], image: dict[str, Any]) -> None:
    for resource in resources:
        for container in containers(resource):
            name, _, tag = container["image"].partition(":")
            if name != image["name"]:
                continue
            new_name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{new_name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


# --------------------------------------------------------------------------------------------
# Validation


def _schema(path: Path) -> jsonschema.Draft202012Validator:
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, resource: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(resource), key=lambda e: list(e.path))
    ]


def keda_rules(resource: dict[str, Any]) -> list[str]:
    """What KEDA checks beyond the CRD's schema (CEL rule, admission webhook, scaler)."""
    spec = resource.get("spec", {})
    problems = []
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if low > high:
        problems.append(f"minReplicaCount {low} > maxReplicaCount {high}")
    idle = spec.get("idleReplicaCount")
    if idle is not None and idle >= low:
        problems.append(f"idleReplicaCount {idle} must be below minReplicaCount {low}")
    names = [t.get("name") for t in spec.get("triggers", []) if t.get("name")]
    if len(names) != len(set(names)):
        problems.append(f"trigger names must be unique: {names}")
    for trigger in spec.get("triggers", []):
        meta = trigger.get("metadata", {})
        if int(meta.get("listLength", "5")) < 1:
            problems.append(f"trigger {trigger.get('name')}: listLength must be at least 1")
    return problems


#: A Kubernetes resource quantity (the OpenAPI schemas accept any string for one).
QUANTITY = re.compile(
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$"
)


def quantity_problems(resource: dict[str, Any]) -> list[str]:
    """Container requests/limits and PVC sizes that are not quantities ("4Gi", "500m", 2)."""
    found: list[tuple[str, Any]] = []
    for container in containers(resource):
        for section in ("requests", "limits"):
            for name, value in container.get("resources", {}).get(section, {}).items():
                found.append((f"{container.get('name')}.{section}.{name}", value))
    if resource["kind"] == "PersistentVolumeClaim":
        for name, value in resource["spec"].get("resources", {}).get("requests", {}).items():
            found.append((f"requests.{name}", value))
    return [
        f"{where}: {value!r} is not a quantity"
        for where, value in found
        if not QUANTITY.match(str(value))
    ]


def validate_resource(resource: dict[str, Any]) -> list[str]:
    """Problems of one rendered object (empty when valid)."""
    import kubernetes_validate

    api, kind = resource["apiVersion"], resource["kind"]
    if api.startswith("keda.sh/"):
        if kind != "ScaledObject":
            return [f"{kind}: only ScaledObject has a schema here"]
        return _errors(_schema(KEDA_SCHEMA), resource) + keda_rules(resource)
    if api.startswith("monitoring.coreos.com/"):
        return _errors(_schema(MONITORING_SCHEMA), resource)
    problems = quantity_problems(resource)
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(root)"
            problems.append(f"Kubernetes {version}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"Kubernetes {version} has no schema for {api} {kind}")
    return problems


def validate_dashboard(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text())
    problems = [f"missing {key}" for key in ("uid", "title", "panels") if not dashboard.get(key)]
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets or not all(str(t.get("expr", "")).strip() for t in targets):
            problems.append(f"panel {panel.get('title')!r} has a target without a query")
    return problems


def check(kustomizations: dict[str, Path] | None = None) -> list[str]:
    """Every problem of every kustomization and dashboard (empty when all is valid)."""
    problems: list[str] = []
    for label, path in (kustomizations or KUSTOMIZATIONS).items():
        try:
            resources = build(path)
        except (ManifestError, OSError, yaml.YAMLError) as exc:
            problems.append(f"{label}: {exc}")
            continue
        for resource in resources:
            name = f"{label}: {resource['kind']}/{resource.get('metadata', {}).get('name')}"
            problems += [f"{name}: {problem}" for problem in validate_resource(resource)]
        print(f"{label} ({_relative(path)}): {len(resources)} objects rendered and validated")
    for dashboard in DASHBOARDS:
        problems += [f"{dashboard.name}: {p}" for p in validate_dashboard(dashboard)]
    return problems


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(DEPLOY.parent))
    except ValueError:
        return str(path)


def main(argv: Iterable[str] | None = None) -> int:
    problems = check()
    for problem in problems:
        print(f"ERROR {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"OK: Kubernetes {' and '.join(K8S_VERSIONS)} schemas (kubernetes-validate, strict), "
        f"KEDA {json.loads(KEDA_SCHEMA.read_text())['x-keda-version']} ScaledObject schema"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
