"""Run vlm_train on Kubernetes: render an Indexed Job + headless Service, or a Kubeflow PyTorchJob.

    python -m launch.k8s --nodes 4 --gpus-per-node 8 --image registry/vlm-train:25.08 --dry-run \\
        -- experiment=llava15-7b-stage2 run.dir=/runs/stage2

prints the YAML; without --dry-run it is piped to `kubectl apply -f -`. Every argument after `--`
is a Hydra override for vlm_train.

One pod per node. Each pod runs the image's entrypoint (docker/entrypoint.sh), which starts
torchrun with one worker per GPU, or the trainer itself when a pod has a single worker:

- Indexed Job (core API only, `--kind indexed-job`, the default): the Job controller gives each
  pod JOB_COMPLETION_INDEX (its node rank) and the hostname `<name>-<index>`; the headless Service
  `<name>` makes `<name>-0.<name>` resolvable, and the manifest sets MASTER_ADDR to it together
  with NNODES, NPROC_PER_NODE and MASTER_PORT.
- PyTorchJob (`--kind pytorchjob`, needs the Kubeflow training operator): the operator creates the
  Service and sets MASTER_ADDR/MASTER_PORT and PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE in
  each pod; the container must be named `pytorch` and expose the port `pytorchjob-port`.

vlm_train/parallel/launch_env.py reads these variables; see it for the order of precedence.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

KINDS = ("indexed-job", "pytorchjob")
ENTRYPOINT = "vlm-train-entrypoint"  # installed by docker/Dockerfile
CONTAINER = "pytorch"  # the PyTorchJob operator finds its container and port by these names
PORT_NAME = "pytorchjob-port"
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class JobSpec:
    """What to run, on how many nodes, and with which resources."""

    name: str
    image: str
    nodes: int
    gpus_per_node: int
    overrides: tuple[str, ...] = ()
    namespace: str | None = None
    port: int = 29500
    shm_size: str = "32Gi"  # /dev/shm for data-loader workers and NCCL's shared-memory transport
    pull_policy: str | None = None  # None: Always for a tag, IfNotPresent for a digest
    cpus: str | None = None
    memory: str | None = None
    pvcs: tuple[tuple[str, str], ...] = ()  # (claim name, mount path): data, run dirs, models
    backoff_limit: int = 0

    @property
    def workers_per_node(self) -> int:
        return max(self.gpus_per_node, 1)  # a CPU pod runs one worker (gloo)

    @property
    def image_pull_policy(self) -> str:
        # Every rank must run the same code. A tag can be re-pushed while nodes keep whatever they
        # cached, so a tag is always pulled; a digest cannot change, so a cached copy is reused.
        if self.pull_policy:
            return self.pull_policy
        return "IfNotPresent" if "@sha256:" in self.image else "Always"


def render_indexed_job(spec: JobSpec) -> list[dict]:
    """A headless Service and an Indexed Job: one pod per node, rank = completion index."""
    labels = _labels(spec)
    env = [
        _env("NNODES", spec.nodes),
        _env("NPROC_PER_NODE", spec.workers_per_node),
        _env("MASTER_ADDR", f"{spec.name}-0.{spec.name}"),  # pod 0's DNS name via the headless Service
        _env("MASTER_PORT", spec.port),
    ]
    pod = _pod_spec(spec, env, restart_policy="Never")
    pod["subdomain"] = spec.name  # with the Job's hostnames this gives <name>-<i>.<name> DNS records
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec),
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            # Ranks look up pod 0 while it is still starting; without this its DNS record
            # appears only once it is Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": spec.port, "targetPort": spec.port}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec),
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.nodes,
            "parallelism": spec.nodes,  # all ranks at once: a collective needs every one of them
            # One failed pod leaves the others hung in a collective; fail the Job (a resubmission
            # resumes from run.dir's latest checkpoint) rather than restart a lone pod.
            "backoffLimit": spec.backoff_limit,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    return [service, job]


def render_pytorchjob(spec: JobSpec) -> list[dict]:
    """A Kubeflow PyTorchJob (kubeflow.org/v1): a Master pod and nodes - 1 Worker pods."""
    template = {"metadata": {"labels": _labels(spec)}, "spec": _pod_spec(spec, [], restart_policy="Never")}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if spec.nodes > 1:
        worker = copy.deepcopy(template)  # the same pod, but its own object
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "Never", "template": worker}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec),
        "spec": {
            "nprocPerNode": str(spec.workers_per_node),
            "runPolicy": {"backoffLimit": spec.backoff_limit, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
    return [job]


def _pod_spec(spec: JobSpec, env: list[dict], restart_policy: str) -> dict:
    limits: dict[str, str] = {}
    if spec.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    if spec.cpus:
        limits["cpu"] = spec.cpus
    if spec.memory:
        limits["memory"] = spec.memory
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    # Docker's default /dev/shm is 64 MiB; DataLoader workers and NCCL need far more.
    volumes: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    for i, (claim, path) in enumerate(spec.pvcs):
        mounts.append({"name": f"data-{i}", "mountPath": path})
        volumes.append({"name": f"data-{i}", "persistentVolumeClaim": {"claimName": claim}})
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": [ENTRYPOINT],
        "args": list(spec.overrides),
        "ports": [{"name": PORT_NAME, "containerPort": spec.port, "protocol": "TCP"}],
        "volumeMounts": mounts,
    }
    if env:
        container["env"] = env
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    return {"restartPolicy": restart_policy, "containers": [container], "volumes": volumes}


def _labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vlm-train", "app.kubernetes.io/instance": spec.name}


def _metadata(spec: JobSpec) -> dict:
    meta: dict = {"name": spec.name, "labels": _labels(spec)}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def _env(name: str, value: object) -> dict[str, str]:
    return {"name": name, "value": str(value)}  # env values must be strings


def render(spec: JobSpec, kind: str) -> list[dict]:
    """The manifests of `kind` (indexed-job or pytorchjob) for `spec`."""
    return render_indexed_job(spec) if kind == "indexed-job" else render_pytorchjob(spec)


class _NoAliasDumper(yaml.SafeDumper):
    # Master and Worker share one pod template; write it out twice rather than as &id001/*id001.
    def ignore_aliases(self, data: object) -> bool:
        return True


def to_yaml(docs: Sequence[dict]) -> str:
    """Multi-document YAML, as `kubectl apply -f -` reads it."""
    return yaml.dump_all(docs, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


def apply(manifest: str) -> int:
    """`kubectl apply -f -` with the manifest; a clear one-line error when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(
            "launch.k8s: error: kubectl not found on PATH; install it, or use --dry-run and apply the YAML elsewhere",
            file=sys.stderr,
        )
        return 127
    return subprocess.run([kubectl, "apply", "-f", "-"], input=manifest, text=True).returncode


def parse_args(argv: Sequence[str]) -> tuple[JobSpec, str, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m launch.k8s",
        description="Render (and apply) a vlm_train job for Kubernetes. Arguments after -- are Hydra overrides.",
    )
    parser.add_argument("--nodes", type=int, required=True, help="pods, one per node")
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per pod (0: CPU, one gloo worker)")
    parser.add_argument("--image", required=True, help="container image with vlm_train (docker/Dockerfile)")
    parser.add_argument("--kind", choices=KINDS, default="indexed-job", help="default: indexed-job (core API only)")
    parser.add_argument("--name", default="vlm-train", help="job name, a DNS label (default: vlm-train)")
    parser.add_argument("--namespace", help="namespace (default: kubectl's current one)")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port (default: 29500)")
    parser.add_argument("--shm-size", default="32Gi", help="size of the in-memory /dev/shm (default: 32Gi)")
    parser.add_argument("--pull-policy", choices=("Always", "IfNotPresent", "Never"), help="default: see README")
    parser.add_argument("--cpus", help="CPU request and limit per pod, e.g. 96")
    parser.add_argument("--memory", help="memory request and limit per pod, e.g. 1500Gi")
    parser.add_argument(
        "--pvc", action="append", default=[], metavar="CLAIM:PATH", help="mount a PersistentVolumeClaim (repeatable)"
    )
    parser.add_argument("--backoff-limit", type=int, default=0, help="job retries (default 0: fail fast)")
    parser.add_argument("--dry-run", action="store_true", help="print the YAML instead of applying it")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for vlm_train (after --)")
    args = parser.parse_args(argv)
    _check(parser, args)
    spec = JobSpec(
        name=args.name,
        image=args.image,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        overrides=tuple(args.overrides),
        namespace=args.namespace,
        port=args.port,
        shm_size=args.shm_size,
        pull_policy=args.pull_policy,
        cpus=args.cpus,
        memory=args.memory,
        pvcs=tuple(tuple(item.split(":", 1)) for item in args.pvc),
        backoff_limit=args.backoff_limit,
    )
    return spec, args.kind, args.dry_run


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0:
        parser.error("--nodes must be >= 1 and --gpus-per-node >= 0")
    # The name is the Service's name and, with "-<index>", every pod's hostname: a DNS label.
    if not _DNS_LABEL.match(args.name) or len(args.name) + 1 + len(str(args.nodes - 1)) > 63:
        parser.error(f"--name {args.name!r} must be a DNS label (a-z, 0-9, '-'; short enough for '-<index>')")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1-65535")
    for item in args.pvc:
        claim, _, path = item.partition(":")
        if not claim or not path.startswith("/"):
            parser.error(f"--pvc {item!r}: expected CLAIM:/absolute/path")


def main(argv: Sequence[str] | None = None) -> int:
    spec, kind, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    manifest = to_yaml(render(spec, kind))
    if dry_run:
        sys.stdout.write(manifest)
        return 0
    return apply(manifest)


if __name__ == "__main__":
    sys.exit(main())
