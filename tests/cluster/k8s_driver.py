"""Runs inside private mount and network namespaces (`unshare -m -n`): the rendered StatefulSet's pods
as the kubelet would start them (k8s_pods.pod_of), each on its own loopback address as its pod IP,
with the pods' DNS names in an /etc/hosts bind-mounted for this namespace only, and --device=cpu
for --device=cuda (no GPU here); probes each pod's
health as its startupProbe and readinessProbe say, trains through rank 0's DNS name, writes JSON.

    unshare -m -n python tests/cluster/k8s_driver.py RENDERED.json WORKDIR RESULT.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "distributed"))

from cluster_support import STEPS, WorkerProcess, clean_environment, loopback_up, train  # noqa: E402
from dist_reference import SEED, make_windows, tiny_config  # noqa: E402
from k8s_pods import NAMESPACE, hosts_line, pod_of, secrets_of  # noqa: E402


def main(rendered: str, workdir: str, result_path: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from twinkle_client.local import wait_serving
    from twinkle_client.model import TransformersModel
    from twinkle_protocol.mesh import DeviceMesh

    loopback_up()
    work = pathlib.Path(workdir)
    documents = json.loads(pathlib.Path(rendered).read_text())
    statefulset = next(d for d in documents if d["kind"] == "StatefulSet")
    service = statefulset["spec"]["serviceName"]
    name, replicas = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
    template = statefulset["spec"]["template"]
    pods = [
        pod_of(template, f"{name}-{i}", f"127.0.0.{10 + i}", {}, {}, secrets_of(documents), work, sys.executable)
        for i in range(replicas)
    ]
    hosts = work / "hosts"
    hosts.write_text(
        pathlib.Path("/etc/hosts").read_text()
        + "".join(
            hosts_line(pod.ip, f"{pod.name}.{service}.{NAMESPACE}.svc.cluster.local", f"{pod.name}.{service}")
            for pod in pods
        )
    )
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)  # this mount namespace only

    for pod in pods:  # the one change to the manifest's command: no GPU here (the pods would refuse cuda)
        assert pod.argv[1:3] == ["-m", "twinkle_worker"], pod.argv
        pod.argv = [("--device=cpu" if part == "--device=cuda" else part) for part in pod.argv]
    result: dict[str, object] = {"argv": [pod.argv for pod in pods]}
    processes = [WorkerProcess(pod.argv[3:], clean_environment(pod.env), work / f"{pod.name}.log") for pod in pods]
    try:
        probed = []
        for pod in pods:
            startup, readiness = pod.container["startupProbe"], pod.container["readinessProbe"]
            target = f"{pod.ip}:{startup['grpc']['port']}"
            wait_serving(target, timeout=startup["periodSeconds"] * startup["failureThreshold"])
            with grpc.insecure_channel(f"{pod.ip}:{readiness['grpc']['port']}") as channel:
                request = health_pb2.HealthCheckRequest(service=readiness["grpc"].get("service", ""))
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=readiness.get("timeoutSeconds", 1))
            probed.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        result["readiness"] = probed

        token_path = next(part for part in pods[0].argv if part.startswith("--token-file=")).split("=", 1)[1]
        os.environ["TWINKLE_WORKER_TOKEN"] = pathlib.Path(token_path).read_text().strip()
        rank0 = f"{pods[0].name}.{service}.{NAMESPACE}.svc.cluster.local:50051"
        os.environ["TWINKLE_CLUSTER"] = json.dumps(
            {"groups": {"default": {"rank0": rank0, "token_env": "TWINKLE_WORKER_TOKEN"}}}
        )
        model = TransformersModel(
            config=tiny_config(), device_mesh=DeviceMesh.from_sizes(dp_size=2), mixed_precision="no", seed=SEED
        )
        try:
            result["addresses"] = model.coordinator.addresses
            result["losses"] = train(model, make_windows(SEED, STEPS, 1, 5))
        finally:
            model.close()
    finally:
        result["exit_codes"] = [process.stop() for process in processes]
        result["logs"] = {pod.name: (work / f"{pod.name}.log").read_text()[-3000:] for pod in pods}
        pathlib.Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
