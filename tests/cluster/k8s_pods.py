"""Kubernetes without an API server, for the tests: render deploy/kubernetes with kustomize, validate the
result (core kinds with kubernetes-validate, strict; JobSet and LeaderWorkerSet against their CRDs'
openAPIV3Schema), and turn a pod template into the command line and environment the kubelet would
give pod N (downward API fields, $(VAR) expansion, Secret and emptyDir mounts mapped to local folders)."""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
VARIANTS = ("statefulset", "tls", "jobset", "leaderworkerset")
CORE_KINDS = ("Service", "StatefulSet", "Secret")
CRD_FILES = {
    "JobSet": "jobset.x-k8s.io_jobsets.yaml",
    "LeaderWorkerSet": "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
}
NAMESPACE = "default"
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class Unavailable(Exception):
    """A tool or a data file the check needs is not here (the reason is the message)."""


def render(variant: str) -> list[dict[str, Any]]:
    """`kustomize build deploy/kubernetes/<variant>` (or `kubectl kustomize`), as documents."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(DEPLOY / variant)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(DEPLOY / variant)]
    else:
        raise Unavailable("neither `kustomize` nor `kubectl` (which has `kubectl kustomize`) is installed")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def crd_text(kind: str) -> str:
    """A CRD's YAML: from $TWINKLE_K8S_CRDS, shared/k8s-crds beside the repository, or the gzipped copies
    in tests/cluster/crds/ (the same files, for a machine that has the repository alone)."""
    for folder in (os.environ.get("TWINKLE_K8S_CRDS"), REPO.parent / "shared" / "k8s-crds"):
        if folder and (pathlib.Path(folder) / CRD_FILES[kind]).is_file():
            return (pathlib.Path(folder) / CRD_FILES[kind]).read_text()
    packed = pathlib.Path(__file__).parent / "crds" / (CRD_FILES[kind] + ".gz")
    if packed.is_file():
        return gzip.decompress(packed.read_bytes()).decode()
    raise Unavailable(f"the {kind} CRD is in none of $TWINKLE_K8S_CRDS, ../shared/k8s-crds, tests/cluster/crds")


def crd_schema(kind: str, api_version: str) -> dict[str, Any]:
    crd = yaml.safe_load(crd_text(kind))
    version = api_version.split("/")[1]
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]
    raise AssertionError(f"{kind} CRD has no version {version}")


def unknown_fields(document: Any, schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (what the API server's strict field validation refuses)."""
    found: list[str] = []
    if isinstance(document, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in document.items():
            if key not in schema["properties"]:
                if not schema.get("additionalProperties"):
                    found.append(f"{path}.{key}")
                continue
            found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(document, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in document.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(document, list) and "items" in schema:
        for index, item in enumerate(document):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


@dataclass
class Pod:
    """What the kubelet would run for one pod: argv, environment, and where its mounts are."""

    name: str
    ip: str
    argv: list[str]
    env: dict[str, str]
    container: dict[str, Any]


def pod_of(
    template: Mapping[str, Any],
    name: str,
    ip: str,
    labels: Mapping[str, str],
    injected: Mapping[str, str],
    secrets: Mapping[str, Mapping[str, str]],
    folder: pathlib.Path,
    python: str,
) -> Pod:
    """Pod `name` of a pod template: downward-API env from `labels`/name/namespace/ip, `injected` (what a
    controller adds: JOB_COMPLETION_INDEX, LWS_*), Secret volumes written under `folder`, emptyDirs made there."""
    container = template["spec"]["containers"][0]
    env = {"HOSTNAME": name, "KUBERNETES_SERVICE_HOST": "10.96.0.1", **injected}
    fields = {"metadata.name": name, "metadata.namespace": NAMESPACE, "status.podIP": ip}
    fields.update({f"metadata.labels['{key}']": value for key, value in labels.items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
        else:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
    mounts: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        local = folder / name / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            for key, value in secrets[volume["secret"]["secretName"]].items():
                (local / key).write_text(value)
        mounts[mount["mountPath"]] = str(local)
    argv = [expand(part, env) for part in container["command"] + container.get("args", [])]
    argv[0] = python if argv[0] in ("python", "python3") else argv[0]
    for path, local in sorted(mounts.items(), key=lambda item: -len(item[0])):
        argv = [part.replace(path, local) for part in argv]
    return Pod(name, ip, argv, env, container)


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables are replaced, $$ is a literal $, others stay."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def secrets_of(documents: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("stringData", {}) for d in documents if d["kind"] == "Secret"}


def hosts_line(ip: str, *names: str) -> str:
    return f"{ip} {' '.join(names)}\n"
