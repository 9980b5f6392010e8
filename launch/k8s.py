"""Run vlm_train on Kubernetes: render an Indexed Job + headless Service, a JobSet, or a Kubeflow PyTorchJob.

    python -m launch.k8s --nodes 4 --gpus-per-node 8 --image registry/vlm-train:25.08 --dry-run \\
        -- experiment=llava15-7b-stage2 run.dir=/runs/stage2

prints the YAML; without --dry-run it goes to `kubectl create`. Every argument after `--` is a
Hydra override for vlm_train. Each submission gets its own name, `<--name>-<UTC yymmdd-hhmmss>`,
so running the command again starts a new job, which resumes from run.dir's latest checkpoint.

One pod per node. Each pod runs the image's entrypoint (docker/entrypoint.sh), which starts
torchrun with one worker per GPU, or the trainer itself when a pod has a single worker:

- Indexed Job (core API only, `--kind indexed-job`, the default): the Job controller gives each
  pod JOB_COMPLETION_INDEX (its node rank) and the hostname `<name>-<index>`; the headless Service
  `<name>` makes `<name>-0.<name>` resolvable, and the manifest sets MASTER_ADDR to it together
  with NNODES, NPROC_PER_NODE and MASTER_PORT.
- JobSet (`--kind jobset`, needs the JobSet controller): one replicated Indexed Job `node`; JobSet
  makes the headless Service `<name>` and the hostnames `<name>-node-0-<index>`, and restarts the
  whole gang on a failure (`--backoff-limit` restarts).
- PyTorchJob (`--kind pytorchjob`, needs the Kubeflow training operator): the operator creates the
  Service and sets MASTER_ADDR/MASTER_PORT and PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE in
  each pod; the container must be named `pytorch` and expose the port `pytorchjob-port`.

vlm_train/parallel/launch_env.py reads these variables; see it for the order of precedence.

A pod asked to stop (eviction, preemption, `kubectl delete`) gets SIGTERM: the trainer finishes
its step, saves and exits 75. `terminationGracePeriodSeconds` gives it the time that takes: the
planned step plus writing the planned checkpoint (`plan_stop`), plus a margin, at least 300 s.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import yaml

KINDS = ("indexed-job", "jobset", "pytorchjob")
ENTRYPOINT = "vlm-train-entrypoint"  # installed by docker/Dockerfile
CONTAINER = "pytorch"  # the PyTorchJob operator finds its container and port by these names
PORT_NAME = "pytorchjob-port"
REPLICATED_JOB = "node"  # the JobSet's one replicated Job: pods <name>-node-0-<index>
IMAGE_GID = 10001  # the image's user and group `vlm` (docker/Dockerfile)
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MULTUS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"
REQUIRE_NET_ENV = "VLM_NCCL_REQUIRE_NET"  # the trainer fails at start unless NCCL's init log shows this transport
RENDEZVOUS_TIMEOUT_S = 3600  # torchrun's static rendezvous waits 600 s by default: short for cold image pulls
TTL_AFTER_FINISHED_S = 7 * 24 * 3600  # a finished job (and its pods' logs) stays a week, then goes
GRACE_FLOOR_S = 300
GRACE_MARGIN_S = 120  # the exit itself: the final barrier, process teardown, torchrun's own shutdown
# Aggregate write bandwidth to run.dir assumed by the plan: an NFS-class ReadWriteMany volume (cloud
# file stores, EFS, a small NFS server) sustains a few hundred MB/s to ~1 GB/s for large sequential
# writes; 0.5 GB/s leaves room. Parallel file systems (Lustre, GPFS, Weka) reach far more.
CHECKPOINT_WRITE_GBPS = 0.5
# Sustained training FLOP/s per GPU assumed for the planned step: H100/H200 reach 300-450 TFLOP/s
# in bf16 at a usual 30-45% MFU; 100 TFLOP/s overestimates the step three- to fourfold.
GPU_FLOPS = 100e12
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)[-A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class JobSpec:
    """What to run, on how many nodes, with which resources, network and scheduling."""

    name: str
    image: str
    nodes: int
    gpus_per_node: int
    overrides: tuple[str, ...] = ()
    namespace: str | None = None
    port: int = 29500
    shm_size: str = "32Gi"  # /dev/shm for data-loader workers and NCCL's shared-memory transport
    pull_policy: str | None = None  # None: Always for a tag, IfNotPresent for a digest
    cpus: str | None = None  # requests = limits; none given: no CPU/memory requests (Burstable QoS)
    memory: str | None = None
    pvcs: tuple[tuple[str, str], ...] = ()  # (claim name, mount path): data, run dirs, models
    backoff_limit: int = 0  # JobSet: gang restarts; Indexed Job and PyTorchJob: 0 only
    grace_period_s: int = GRACE_FLOOR_S  # terminationGracePeriodSeconds: see grace_seconds
    ttl_after_finished_s: int = TTL_AFTER_FINISHED_S
    rdma_resources: tuple[tuple[str, int], ...] = ()  # e.g. (("rdma/rdma_shared_device_a", 1),)
    network_annotation: str | None = None  # Multus secondary networks, e.g. "default/ib-sriov"
    host_network: bool = False
    nccl_ib_hca: str | None = None
    nccl_socket_ifname: str | None = None
    queue: str | None = None  # Kueue LocalQueue; the Volcano queue with scheduler="volcano"
    scheduler: str | None = None  # "volcano" (PyTorchJob only): gang scheduling by a PodGroup
    tolerations: tuple[tuple[str, str | None, str | None], ...] = ()  # (key, value, effect)
    node_selector: tuple[tuple[str, str], ...] = ()

    @property
    def workers_per_node(self) -> int:
        return max(self.gpus_per_node, 1)  # a CPU pod runs one worker (gloo)

    @property
    def rdma(self) -> bool:
        """An RDMA fabric was asked for: the pods get IPC_LOCK and multi-node runs must use it."""
        return bool(self.rdma_resources or self.network_annotation or self.host_network)

    @property
    def image_pull_policy(self) -> str:
        # Every rank must run the same code. A tag can be re-pushed while nodes keep whatever they
        # cached, so a tag is always pulled; a digest cannot change, so a cached copy is reused.
        if self.pull_policy:
            return self.pull_policy
        return "IfNotPresent" if "@sha256:" in self.image else "Always"


def render_indexed_job(spec: JobSpec) -> list[dict]:
    """A headless Service and an Indexed Job: one pod per node, rank = completion index."""
    env = _rendezvous_env(spec, master=f"{spec.name}-0.{spec.name}")  # pod 0's name via the Service
    template = _pod_template(spec, env, restart_policy="Never")
    template["spec"]["subdomain"] = spec.name  # with the Job's hostnames: <name>-<i>.<name> DNS records
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec),  # `submit` makes the Job its owner: it goes with the Job
        "spec": {
            "clusterIP": "None",
            "selector": _labels(spec),
            # Ranks look up pod 0 while it is still starting; without this its DNS record
            # appears only once it is Ready.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": spec.port, "targetPort": spec.port}],
        },
    }
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec, queue=True)}
    job["spec"] = {**_indexed_job_spec(spec, template), "ttlSecondsAfterFinished": spec.ttl_after_finished_s}
    return [service, job]


def render_jobset(spec: JobSpec) -> list[dict]:
    """A JobSet (jobset.x-k8s.io/v1alpha2) of one Indexed Job; a failure restarts the whole gang."""
    env = _rendezvous_env(spec, master=f"{spec.name}-{REPLICATED_JOB}-0-0.{spec.name}")
    job = _indexed_job_spec(spec, _pod_template(spec, env, restart_policy="Never"))
    jobset = {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": _metadata(spec, queue=True),
        "spec": {
            # A restart recreates every Job, so the static rendezvous starts afresh; Blocking waits
            # until the old pods (perhaps still saving) are gone before the new ones start.
            "failurePolicy": {"maxRestarts": spec.backoff_limit, "restartStrategy": "BlockingRecreate"},
            "network": {"enableDNSHostnames": True},  # <pod>.<name> records, not-ready ones too (the default)
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job}}],
            "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
        },
    }
    return [jobset]


def render_pytorchjob(spec: JobSpec) -> list[dict]:
    """A Kubeflow PyTorchJob (kubeflow.org/v1): a Master pod and nodes - 1 Worker pods."""
    template = _pod_template(spec, _rendezvous_env(spec, master=None), restart_policy="Never")
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if spec.nodes > 1:
        worker = copy.deepcopy(template)  # the same pod, but its own object
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "Never", "template": worker}
    run_policy: dict = {
        "backoffLimit": spec.backoff_limit,
        # Running: when one pod fails, the operator deletes the survivors, which would otherwise
        # hold their GPUs in a collective until NCCL's timeout (None keeps them running).
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": spec.ttl_after_finished_s,
    }
    if spec.scheduler == "volcano":
        # The operator makes a PodGroup: Volcano binds all the pods or none.
        run_policy["schedulingPolicy"] = {"minAvailable": spec.nodes, **({"queue": spec.queue} if spec.queue else {})}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec, queue=spec.scheduler != "volcano"),
        "spec": {"nprocPerNode": str(spec.workers_per_node), "runPolicy": run_policy, "pytorchReplicaSpecs": replicas},
    }
    return [job]


def _indexed_job_spec(spec: JobSpec, template: dict) -> dict:
    return {
        "completionMode": "Indexed",
        "completions": spec.nodes,
        "parallelism": spec.nodes,  # all ranks at once: a collective needs every one of them
        # One failed pod leaves the others hung in a collective, and a replacement cannot join
        # their static rendezvous: fail the Job (JobSet then restarts the gang; otherwise a
        # resubmission resumes from run.dir's latest checkpoint).
        "backoffLimit": 0,
        "template": template,
    }


def _rendezvous_env(spec: JobSpec, master: str | None) -> list[dict]:
    """The pod's environment: the rendezvous (unless the operator sets it), torchrun, NCCL."""
    env = []
    if master is not None:
        env += [
            _env("NNODES", spec.nodes),
            _env("NPROC_PER_NODE", spec.workers_per_node),
            _env("MASTER_ADDR", master),
            _env("MASTER_PORT", spec.port),
        ]
    if spec.workers_per_node > 1:  # read by docker/entrypoint.sh and the torchrun it starts
        if spec.nodes > 1:
            env.append(_env("RDZV_TIMEOUT", RENDEZVOUS_TIMEOUT_S))
        # torch >= 2.12: torchrun waits this long for its workers to save after SIGTERM (else 30 s)
        env.append(_env("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", spec.grace_period_s))
    if spec.nccl_ib_hca:
        env.append(_env("NCCL_IB_HCA", spec.nccl_ib_hca))
    if spec.nccl_socket_ifname:
        env.append(_env("NCCL_SOCKET_IFNAME", spec.nccl_socket_ifname))
    if spec.rdma and spec.nodes > 1:
        env.append(_env(REQUIRE_NET_ENV, "IB"))  # no silent fallback to TCP sockets
    return env


def _pod_template(spec: JobSpec, env: list[dict], restart_policy: str) -> dict:
    metadata: dict = {"labels": _labels(spec)}
    if spec.network_annotation:
        metadata["annotations"] = {MULTUS_ANNOTATION: spec.network_annotation}
    pod: dict = {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": spec.grace_period_s,
        # Volumes (a fresh PVC is root-owned) become group-writable for the image's user.
        "securityContext": {"fsGroup": IMAGE_GID, "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [_container(spec, env)],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}],
    }
    pod["volumes"] += [
        {"name": f"data-{i}", "persistentVolumeClaim": {"claimName": c}} for i, (c, _) in enumerate(spec.pvcs)
    ]
    if spec.host_network:
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"  # still resolve the Service's pod names
    if spec.scheduler:
        pod["schedulerName"] = spec.scheduler
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [_toleration(*t) for t in spec.tolerations]
    return {"metadata": metadata, "spec": pod}


def _container(spec: JobSpec, env: list[dict]) -> dict:
    # Docker's default /dev/shm is 64 MiB; DataLoader workers and NCCL need far more.
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    mounts += [{"name": f"data-{i}", "mountPath": path} for i, (_, path) in enumerate(spec.pvcs)]
    container: dict = {
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
    limits: dict[str, str] = {}
    if spec.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    limits.update((name, str(count)) for name, count in spec.rdma_resources)
    if spec.cpus:
        limits["cpu"] = spec.cpus
    if spec.memory:
        limits["memory"] = spec.memory
    if limits:  # requests = limits: extended resources demand it, and it gives Guaranteed QoS
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    # Registering RDMA memory pins pages. The capability is effective for root; for the image's
    # non-root user the node's memlock limit for containers is what counts (RDMA nodes set it
    # unlimited), and VLM_NCCL_REQUIRE_NET makes a run that still falls back to sockets fail.
    if spec.rdma:
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    return container


def _toleration(key: str, value: str | None, effect: str | None) -> dict:
    toleration = {"key": key, "operator": "Equal" if value is not None else "Exists"}
    if value is not None:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


def _labels(spec: JobSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vlm-train", "app.kubernetes.io/instance": spec.name}


def _metadata(spec: JobSpec, queue: bool = False) -> dict:
    meta: dict = {"name": spec.name, "labels": _labels(spec)}
    if queue and spec.queue:
        meta["labels"][KUEUE_LABEL] = spec.queue  # Kueue admits the whole job at once, or none of it
    if spec.namespace:
        meta["namespace"] = spec.namespace
    return meta


def _env(name: str, value: object) -> dict[str, str]:
    return {"name": name, "value": str(value)}  # env values must be strings


def render(spec: JobSpec, kind: str) -> list[dict]:
    """The manifests of `kind` (indexed-job, jobset or pytorchjob) for `spec`."""
    renderers = {"indexed-job": render_indexed_job, "jobset": render_jobset, "pytorchjob": render_pytorchjob}
    return renderers[kind](spec)


# --- the grace period -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StopPlan:
    """What a graceful stop must fit in: the step under way, then writing a checkpoint."""

    step_s: float
    checkpoint_bytes: float

    def seconds(self, write_gbps: float = CHECKPOINT_WRITE_GBPS) -> float:
        return self.step_s + self.checkpoint_bytes / (write_gbps * 1e9)


def plan_stop(overrides: Sequence[str], nodes: int, gpus_per_node: int) -> StopPlan:
    """The step time and checkpoint size of the run `overrides` describe, as vlm-plan sizes it
    (meta tensors, config-only model folders: no weights read). Raises UserError or OSError."""
    from vlm_train.plan import build_meta_model, compose_for_plan, flops_per_sample, resolve_precision

    cfg = compose_for_plan(list(overrides))
    model = build_meta_model(cfg)
    precision = resolve_precision(cfg)
    # A checkpoint holds the trainable parameters in the run's precision, Adam's two fp32 moments
    # and the fp32 master copy where DeepSpeed keeps one (vlm_train/plan.py); frozen weights are
    # rebuilt on resume, not saved (training/checkpoint.py).
    master = 4 if precision == "bf16" or cfg.parallel.zero_stage > 0 else 0
    per_param = (2 if precision == "bf16" else 4) + 8 + master
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranks = nodes * max(gpus_per_node, 1)
    batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum * ranks
    step_s = flops_per_sample(model, cfg) * batch / (ranks * GPU_FLOPS)
    return StopPlan(step_s, float(trainable * per_param))


def grace_seconds(stop_s: float) -> int:
    """terminationGracePeriodSeconds for a stop planned to take `stop_s` (step + save)."""
    return max(GRACE_FLOOR_S, math.ceil(stop_s + GRACE_MARGIN_S))


def unique_name(base: str, now: float | None = None) -> str:
    """`<base>-<UTC yymmdd-hhmmss>`: a new object per submission, sortable by submission time."""
    return f"{base}-{time.strftime('%y%m%d-%H%M%S', time.gmtime(now))}"


# --- YAML and kubectl -----------------------------------------------------------------------------


class _NoAliasDumper(yaml.SafeDumper):
    # Master and Worker share one pod template; write it out twice rather than as &id001/*id001.
    def ignore_aliases(self, data: object) -> bool:
        return True


def to_yaml(docs: Sequence[dict]) -> str:
    """Multi-document YAML, as `kubectl create -f -` reads it."""
    return yaml.dump_all(docs, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


def submit(docs: Sequence[dict]) -> int:
    """`kubectl create` the job, then any Service owned by it, so that the Service is deleted with
    the Job (ttlSecondsAfterFinished). A clear one-line error when kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(
            "launch.k8s: error: kubectl not found on PATH; install it, or use --dry-run and create the YAML elsewhere",
            file=sys.stderr,
        )
        return 127
    services = [copy.deepcopy(d) for d in docs if d["kind"] == "Service"]
    (owner,) = [d for d in docs if d["kind"] != "Service"]
    created = subprocess.run(
        [kubectl, "create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
        input=to_yaml([owner]),
        text=True,
        stdout=subprocess.PIPE,
    )
    if created.returncode != 0:
        return created.returncode
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"]}
    print(f"{ref['kind']} {ref['name']} created", flush=True)
    if not services:
        return 0
    for service in services:
        service["metadata"]["ownerReferences"] = [{**ref, "uid": created.stdout.strip()}]
    return subprocess.run([kubectl, "create", "-f", "-"], input=to_yaml(services), text=True).returncode


# --- the command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str], now: float | None = None) -> tuple[JobSpec, str, bool]:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    spec = JobSpec(
        name=unique_name(args.name, now),
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
        pvcs=tuple((claim, path) for claim, _, path in (item.partition(":") for item in args.pvc)),
        backoff_limit=args.backoff_limit,
        grace_period_s=_grace(parser, args),
        ttl_after_finished_s=args.ttl_after_finished,
        rdma_resources=tuple((name, int(count)) for name, _, count in (r.partition("=") for r in args.rdma_resource)),
        network_annotation=args.network_annotation,
        host_network=args.host_network,
        nccl_ib_hca=args.nccl_ib_hca,
        nccl_socket_ifname=args.nccl_socket_ifname,
        queue=args.queue,
        scheduler=None if args.scheduler == "default" else args.scheduler,
        tolerations=tuple(_parse_toleration(parser, t) for t in args.toleration),
        node_selector=tuple((key, value) for key, _, value in (s.partition("=") for s in args.node_selector)),
    )
    return spec, args.kind, args.dry_run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.k8s",
        description="Render (and create) a vlm_train job for Kubernetes. Arguments after -- are Hydra overrides.",
    )
    add = parser.add_argument
    add("--nodes", type=int, required=True, help="pods, one per node")
    add("--gpus-per-node", type=int, required=True, help="GPUs per pod (0: CPU, one gloo worker)")
    add("--image", required=True, help="container image with vlm_train (docker/Dockerfile)")
    add("--kind", choices=KINDS, default="indexed-job", help="default: indexed-job (core API only)")
    add("--name", default="vlm-train", help="name prefix, a DNS label; a UTC time is appended per submission")
    add("--namespace", help="namespace (default: kubectl's current one)")
    add("--port", type=int, default=29500, help="rendezvous port (default: 29500)")
    add("--shm-size", default="32Gi", help="size of the in-memory /dev/shm (default: 32Gi)")
    add("--pull-policy", choices=("Always", "IfNotPresent", "Never"), help="default: see README")
    add("--cpus", help="CPU request and limit per pod, e.g. 96 (default: none)")
    add("--memory", help="memory request and limit per pod, e.g. 1500Gi; /dev/shm counts against it")
    add("--pvc", action="append", default=[], metavar="CLAIM:PATH", help="mount a PersistentVolumeClaim (repeatable)")
    add("--backoff-limit", type=int, default=0, help="jobset: gang restarts (default 0); other kinds: 0 only")
    add("--ttl-after-finished", type=int, default=TTL_AFTER_FINISHED_S, help="seconds a finished job is kept")
    grace = parser.add_argument_group("grace period (terminationGracePeriodSeconds)")
    grace.add_argument("--grace-period", type=int, metavar="S", help="explicit; default: planned from the overrides")
    grace.add_argument(
        "--save-seconds", type=float, metavar="S", help="time to finish a step and save (skips the plan)"
    )
    grace.add_argument(
        "--checkpoint-write-gbps",
        type=float,
        default=CHECKPOINT_WRITE_GBPS,
        help=f"aggregate write bandwidth to run.dir in GB/s (gigabytes) for the plan (default: {CHECKPOINT_WRITE_GBPS})",
    )
    net = parser.add_argument_group("RDMA / InfiniBand")
    net.add_argument("--rdma-resource", action="append", default=[], metavar="NAME=COUNT", help="e.g. rdma/ib=1")
    net.add_argument("--network-annotation", metavar="NETWORKS", help=f"Multus {MULTUS_ANNOTATION} value")
    net.add_argument("--host-network", action="store_true", help="use the node's network (and its IB devices)")
    net.add_argument("--nccl-ib-hca", help="NCCL_IB_HCA for this fabric, e.g. =mlx5_0,mlx5_3 (default: unset)")
    net.add_argument("--nccl-socket-ifname", help="NCCL_SOCKET_IFNAME, e.g. =eth0 (default: unset)")
    sched = parser.add_argument_group("scheduling")
    sched.add_argument("--queue", help=f"Kueue LocalQueue ({KUEUE_LABEL}); with --scheduler volcano, the Volcano queue")
    sched.add_argument(
        "--scheduler", choices=("default", "volcano"), default="default", help="volcano: pytorchjob only"
    )
    sched.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]", help="repeatable")
    sched.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    add("--dry-run", action="store_true", help="print the YAML instead of creating it")
    add("overrides", nargs="*", help="Hydra overrides for vlm_train (after --)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0:
        parser.error("--nodes must be >= 1 and --gpus-per-node >= 0")
    # The name names the Service and, with a suffix, every pod's hostname: a DNS label of <= 63.
    longest = {"indexed-job": "", "jobset": f"-{REPLICATED_JOB}-0", "pytorchjob": "-worker"}[args.kind]
    longest = f"{unique_name(args.name, 0)}{longest}-{args.nodes - 1}"
    if not _DNS_LABEL.match(args.name) or len(longest) > 63:
        parser.error(f"--name {args.name!r} must be a DNS label (a-z, 0-9, '-') short enough for {longest!r}")
    if not 0 < args.port < 65536:
        parser.error("--port must be 1-65535")
    for item in args.pvc:
        claim, _, path = item.partition(":")
        if not claim or not path.startswith("/"):
            parser.error(f"--pvc {item!r}: expected CLAIM:/absolute/path")
    if args.backoff_limit < 0 or (args.backoff_limit > 0 and args.kind != "jobset"):
        parser.error(
            f"--backoff-limit {args.backoff_limit}: a replaced pod cannot join the static rendezvous of the "
            "others; use --kind jobset, which restarts the whole gang"
        )
    for item in args.rdma_resource:
        name, _, count = item.partition("=")
        if not _RESOURCE.match(name) or not count.isdigit() or int(count) < 1:
            parser.error(f"--rdma-resource {item!r}: expected DOMAIN/NAME=COUNT, e.g. rdma/rdma_shared_device_a=1")
    if args.scheduler == "volcano" and args.kind != "pytorchjob":
        parser.error("--scheduler volcano needs --kind pytorchjob (use --queue with Kueue for the other kinds)")
    for item in args.node_selector:
        if not item.partition("=")[0] or "=" not in item:
            parser.error(f"--node-selector {item!r}: expected KEY=VALUE")
    for item in args.toleration:
        _parse_toleration(parser, item)
    if args.grace_period is not None and args.grace_period < 1:
        parser.error("--grace-period must be >= 1 second")
    if args.checkpoint_write_gbps <= 0 or (args.save_seconds is not None and args.save_seconds < 0):
        parser.error("--checkpoint-write-gbps must be > 0 and --save-seconds >= 0")


def _parse_toleration(parser: argparse.ArgumentParser, item: str) -> tuple[str, str | None, str | None]:
    head, colon, effect = item.rpartition(":") if ":" in item else (item, "", "")
    key, equals, value = head.partition("=")
    if not key or (colon and effect not in TOLERATION_EFFECTS):
        parser.error(f"--toleration {item!r}: expected KEY[=VALUE][:{'|'.join(TOLERATION_EFFECTS)}]")
    return key, value if equals else None, effect or None


def _grace(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.grace_period is not None:
        return args.grace_period
    if args.save_seconds is not None:
        return grace_seconds(args.save_seconds)
    from vlm_train.errors import UserError

    try:
        plan = plan_stop(args.overrides, args.nodes, args.gpus_per_node)
    except (UserError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        parser.error(
            f"cannot plan the save time from the overrides ({reason}); pass --save-seconds S or --grace-period S"
        )
    return grace_seconds(plan.seconds(args.checkpoint_write_gbps))


def main(argv: Sequence[str] | None = None) -> int:
    spec, kind, dry_run = parse_args(sys.argv[1:] if argv is None else argv)
    docs = render(spec, kind)
    if dry_run:
        sys.stdout.write(to_yaml(docs))
        return 0
    return submit(docs)


if __name__ == "__main__":
    sys.exit(main())
