"""Kubernetes, as far as no API server allows: deploy/kubernetes renders with kustomize; the result passes
schema validation (kubernetes-validate, strict, for core kinds; the JobSet and LeaderWorkerSet CRDs'
openAPIV3Schema, unknown fields refused, for theirs); each JobSet / LWS pod's environment gives the
worker its rank; and the StatefulSet's pods, started as the kubelet would (pod names, pod IPs on
loopback, DNS names in a private /etc/hosts), pass their gRPC probes and train like the embedded
default. Not proven here: scheduling, GPUs, the kubelet itself, the controllers (README)."""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import pytest
from cluster_support import clean_environment
from dist_reference import RTOL
from k8s_pods import CORE_KINDS, NAMESPACE, VARIANTS, Unavailable, crd_schema, pod_of, render, unknown_fields
from namespaces import require_network_namespace, run_driver

from twinkle_worker import cli, placement

DRIVER = pathlib.Path(__file__).resolve().parent / "k8s_driver.py"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    try:
        return {variant: render(variant) for variant in VARIANTS}
    except Unavailable as reason:
        pytest.skip(str(reason))


def check(document: dict[str, Any]) -> None:
    """Raises when the document is not valid for its kind."""
    kind = document["kind"]
    if kind in CORE_KINDS:
        kubernetes_validate = pytest.importorskip("kubernetes_validate")
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
        return
    import jsonschema

    try:
        schema = crd_schema(kind, document["apiVersion"])
    except Unavailable as reason:
        pytest.skip(str(reason))
    jsonschema.validate(document, schema)
    unknown = unknown_fields(document, schema)
    if unknown:
        raise ValueError(f"{kind}: fields the CRD does not declare: {unknown}")


def test_rendered_manifests_pass_schema_validation(rendered) -> None:  # type: ignore[no-untyped-def]
    kinds = {variant: sorted(document["kind"] for document in documents) for variant, documents in rendered.items()}
    assert kinds == {
        "statefulset": ["Secret", "Service", "StatefulSet"],
        "tls": ["Secret", "Service", "StatefulSet"],
        "jobset": ["JobSet", "Secret"],
        "leaderworkerset": ["LeaderWorkerSet", "Secret"],
    }
    for documents in rendered.values():
        for document in documents:
            check(document)
    # The checks can fail: a misspelt field is refused in a core kind and in a custom resource.
    statefulset = copy.deepcopy(next(d for d in rendered["statefulset"] if d["kind"] == "StatefulSet"))
    statefulset["spec"]["replicass"] = 2
    with pytest.raises(Exception, match="replicass"):
        check(statefulset)
    jobset = copy.deepcopy(
        rendered["jobset"][0] if rendered["jobset"][0]["kind"] == "JobSet" else rendered["jobset"][1]
    )
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["completion"] = 2
    with pytest.raises(ValueError, match="completion"):
        check(jobset)


def test_tls_overlay_serves_tls_with_the_secrets_files(rendered) -> None:  # type: ignore[no-untyped-def]
    container = next(d for d in rendered["tls"] if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    args = container["containers"][0]["args"]
    assert {"--tls-cert=/etc/twinkle/tls/tls.crt", "--tls-key=/etc/twinkle/tls/tls.key"} <= set(args)
    assert {"name": "tls", "secret": {"secretName": "twinkle-tls"}} in container["volumes"]


def place(template: dict[str, Any], name: str, labels: dict[str, str], injected: dict[str, str], tmp_path) -> Any:  # type: ignore[no-untyped-def]
    pod = pod_of(template, name, "10.0.0.1", labels, injected, {"twinkle-token": {"token": "t"}}, tmp_path, "python")
    args = cli.parse_args(pod.argv[3:])
    where = placement.resolve(pod.env, {field: getattr(args, field) for field in cli.PLACEMENT_FLAGS})
    return where, placement.rank0_address(where, args.port, args.port_base), args


def test_jobset_pods_get_their_ranks_and_rank0s_name(rendered, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jobset = next(d for d in rendered["jobset"] if d["kind"] == "JobSet")
    job = jobset["spec"]["replicatedJobs"][0]
    labels = {
        "jobset.sigs.k8s.io/jobset-name": jobset["metadata"]["name"],
        "jobset.sigs.k8s.io/replicatedjob-name": job["name"],
        "jobset.sigs.k8s.io/job-index": "0",
        "jobset.sigs.k8s.io/replicatedjob-replicas": str(job["replicas"]),
    }
    completions = job["template"]["spec"]["completions"]
    for index in range(completions):
        name = f"{jobset['metadata']['name']}-{job['name']}-0-{index}"  # JobSet's pod hostname
        injected = {"JOB_COMPLETION_INDEX": str(index)}  # the Job controller's
        where, rank0, args = place(job["template"]["spec"]["template"], name, labels, injected, tmp_path)
        assert (where.rank, where.world_size, where.source) == (index, completions, "kubernetes")
        assert rank0 == "twinkle-workers-0-0.twinkle:50051"
        assert args.advertise_host == f"{name}.twinkle.{NAMESPACE}.svc.cluster.local"


def test_leaderworkerset_pods_get_their_ranks_and_rank0s_name(rendered, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lws = next(d for d in rendered["leaderworkerset"] if d["kind"] == "LeaderWorkerSet")
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    leader = f"twinkle-0.twinkle.{NAMESPACE}"  # what LWS injects: <name>-<group>.<name>.<namespace>
    for index in range(size):
        name = "twinkle-0" if index == 0 else f"twinkle-0-{index}"
        injected = {"LWS_WORKER_INDEX": str(index), "LWS_GROUP_SIZE": str(size), "LWS_LEADER_ADDRESS": leader}
        where, rank0, _ = place(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"], name, {}, injected, tmp_path)
        assert (where.rank, where.world_size, where.master_addr) == (index, size, leader)
        assert rank0 == f"{leader}:50051"


@pytest.mark.slow
def test_statefulset_pods_pass_their_probes_and_train_like_the_embedded_default(
    rendered, tmp_path, embedded_losses
) -> None:  # type: ignore[no-untyped-def]
    require_network_namespace()
    manifest = tmp_path / "rendered.json"
    manifest.write_text(json.dumps(rendered["statefulset"]))
    result_path = tmp_path / "result.json"
    run_driver(["-m", "-n"], DRIVER, [str(manifest), str(tmp_path), str(result_path)], clean_environment())
    result = json.loads(result_path.read_text())
    names = [f"twinkle-{i}.twinkle.{NAMESPACE}.svc.cluster.local:50051" for i in range(2)]
    assert result["addresses"] == names, result  # rank 0's GetMesh gave each pod's stable DNS name
    assert result["readiness"] == ["SERVING", "SERVING"]
    assert result["losses"] == pytest.approx(embedded_losses, rel=RTOL)
    assert result["exit_codes"] == [0, 0], result["logs"]
