"""Launching anywhere: the launch-environment mapping, the Kubernetes manifests (validated against
the API schemas offline). Docker: tests/test_docker.py.

The Slurm scripts run on a real local cluster in tests/test_launch_slurm.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.k8s import (
    GRACE_FLOOR_S,
    GRACE_MARGIN_S,
    JobSpec,
    grace_seconds,
    main,
    parse_args,
    plan_stop,
    render,
    render_indexed_job,
    render_jobset,
    render_pytorchjob,
    submit,
    to_yaml,
)
from tests.helpers import REPO, write_config_only_folders
from vlm_train.parallel.launch_env import LaunchEnv, LaunchError, expand_nodelist, first_host, launch_env

# --- the launch environment ---------------------------------------------------------------------


def test_torchrun_variables():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0", "MASTER_PORT": "29511"}
    assert launch_env(env) == LaunchEnv(3, 1, 4, "node0", 29511, "torchrun")


def test_torchrun_wins_over_slurm_and_kubernetes():
    # torchrun runs inside Slurm steps and pods: their variables describe the launcher, not the worker.
    env = {
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "16",
        "MASTER_ADDR": "dgx001",
        "MASTER_PORT": "20042",
        **_slurm(procid=1, localid=0, ntasks=2, nodelist="dgx[001-002]"),
        "JOB_COMPLETION_INDEX": "1",
        "NNODES": "2",
    }
    assert launch_env(env) == LaunchEnv(9, 1, 16, "dgx001", 20042, "torchrun")


def _slurm(procid: int, localid: int, ntasks: int, nodelist: str, job_id: int = 4242) -> dict[str, str]:
    """The variables srun gives each task of a job step (as seen on the local cluster)."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }


def test_slurm_one_node_several_tasks():
    env = _slurm(procid=1, localid=1, ntasks=2, nodelist="vm", job_id=17)
    assert launch_env(env) == LaunchEnv(1, 1, 2, "vm", 20017, "slurm")


def test_slurm_one_task_per_node_several_nodes():
    env = _slurm(procid=2, localid=0, ntasks=4, nodelist="dgx[001-004]", job_id=123456)
    assert launch_env(env) == LaunchEnv(2, 0, 4, "dgx001", 20000 + 123456 % 10000, "slurm")


def test_slurm_eight_tasks_per_node_several_nodes():
    # Task 13 of 2 nodes x 8 GPUs: the sixth task on the second node; rank 0 lives on the first.
    env = _slurm(procid=13, localid=5, ntasks=16, nodelist="pod1-dgx[07-08],pod2-dgx01")
    env["SLURM_STEP_NODELIST"] = "pod1-dgx[07-08]"  # the step runs on two of the job's three nodes
    assert launch_env(env) == LaunchEnv(13, 5, 16, "pod1-dgx07", 24242, "slurm")


def test_slurm_master_overrides():
    env = {**_slurm(procid=0, localid=0, ntasks=2, nodelist="a,b"), "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31000"}
    assert launch_env(env) == LaunchEnv(0, 0, 2, "10.0.0.5", 31000, "slurm")


def test_slurm_batch_shell_is_a_single_process():
    # The sbatch script itself carries SLURM_PROCID=0 (and SLURM_NTASKS with --ntasks) but no
    # step id: starting the trainer there must not wait for ranks that srun never started.
    env = _slurm(procid=0, localid=0, ntasks=8, nodelist="dgx[001-002]")
    del env["SLURM_STEP_ID"]
    assert launch_env(env).source == "single"
    assert launch_env(env).world == 1


def test_kubernetes_indexed_job_pod():
    env = {"JOB_COMPLETION_INDEX": "2", "NNODES": "4", "NPROC_PER_NODE": "1", "MASTER_ADDR": "vlm-0.vlm"}
    assert launch_env(env) == LaunchEnv(2, 0, 4, "vlm-0.vlm", 29500, "kubernetes")
    assert launch_env({**env, "MASTER_PORT": "23456"}).master_port == 23456


def test_kubernetes_pod_without_manifest_variables():
    with pytest.raises(LaunchError, match="NNODES, MASTER_ADDR"):
        launch_env({"JOB_COMPLETION_INDEX": "0"})


def test_kubernetes_pod_with_several_workers_needs_torchrun():
    env = {"JOB_COMPLETION_INDEX": "0", "NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "vlm-0.vlm"}
    with pytest.raises(LaunchError, match="torchrun"):
        launch_env(env)


def test_pytorchjob_pod():
    # The operator sets RANK to the pod's rank and WORLD_SIZE to pods x nprocPerNode.
    one = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "vlm-master-0", "MASTER_PORT": "29500"}
    assert launch_env({**one, "PET_NPROC_PER_NODE": "1"}) == LaunchEnv(1, 0, 2, "vlm-master-0", 29500, "torchrun")
    with pytest.raises(LaunchError, match="torchrun"):
        launch_env({**one, "WORLD_SIZE": "16", "PET_NPROC_PER_NODE": "8"})


def test_single_process():
    env = launch_env({})
    assert (env.rank, env.local_rank, env.world, env.master_addr, env.source) == (0, 0, 1, "127.0.0.1", "single")
    assert 0 < env.master_port < 65536


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2, local rank 0, world size 2"),
        ({**_slurm(procid=0, localid=0, ntasks=1, nodelist="n[1-2"), "SLURM_JOB_ID": "1"}, "unbalanced"),
    ],
)
def test_bad_launch_variables(env, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        launch_env(env)


def test_launch_env_importable_from_distributed():
    from vlm_train.parallel import distributed

    assert distributed.launch_env is launch_env
    assert distributed.LaunchEnv is LaunchEnv


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vm", ["vm"]),
        ("a,b", ["a", "b"]),
        ("dgx[001-003]", ["dgx001", "dgx002", "dgx003"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("gpu[1,3-4],login5", ["gpu1", "gpu3", "gpu4", "login5"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("pod-a[7]-x", ["pod-a7-x"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


# --- Kubernetes ---------------------------------------------------------------------------------

K8S_VERSION = "1.30.0"  # an API version every maintained cluster serves; the manifests use nothing newer
SCHEMAS = REPO / "launch" / "schemas"
FABRIC = JobSpec(  # every network, scheduling and hygiene option at once
    "ib-run-260101-000000",
    "nvcr.io/acme/vlm-train:25.05",
    nodes=2,
    gpus_per_node=8,
    overrides=("experiment=toy", "run.dir=/runs/ib"),
    cpus="96",
    memory="1500Gi",
    pvcs=(("runs", "/runs"),),
    grace_period_s=777,
    rdma_resources=(("rdma/rdma_shared_device_a", 1), ("nvidia.com/hostdev", 8)),
    network_annotation="default/ib-sriov-0,default/ib-sriov-1",
    host_network=True,
    nccl_ib_hca="=mlx5_0,mlx5_3",
    nccl_socket_ifname="=eth0",
    queue="team-a",
    tolerations=(("nvidia.com/gpu", None, "NoSchedule"), ("dedicated", "training", None)),
    node_selector=(("nvidia.com/gpu.product", "NVIDIA-H200"),),
)
SPECS = [
    JobSpec("vlm-train", "nvcr.io/acme/vlm-train:25.05", nodes=4, gpus_per_node=8, overrides=("experiment=toy",)),
    JobSpec(
        "stage2",
        "registry.local/vlm@sha256:" + "a" * 64,
        nodes=1,
        gpus_per_node=0,
        overrides=("experiment=toy", "run.dir=/runs/a b"),
        namespace="research",
        cpus="8",
        memory="32Gi",
        pvcs=(("runs", "/runs"), ("data", "/data")),
    ),
    FABRIC,
]
SPEC_IDS = ["4x8gpu", "1cpu-pvc", "2x8gpu-rdma-kueue"]


def _validate_core(doc: dict) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:  # its str() dumps the whole schema
        pytest.fail(f"{doc['kind']} is not valid Kubernetes {K8S_VERSION}: {err.message} at {list(err.path)}")


def _validator(schema_file: str):
    import jsonschema

    schema = yaml.safe_load((SCHEMAS / schema_file).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, doc: dict) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]


def _pods(docs: list[dict]) -> list[dict]:
    """Every pod template (metadata + spec) of a rendering, whatever the kind."""
    pods = []
    for doc in docs:
        if doc["kind"] == "Job":
            pods.append(doc["spec"]["template"])
        elif doc["kind"] == "JobSet":
            pods += [r["template"]["spec"]["template"] for r in doc["spec"]["replicatedJobs"]]
        elif doc["kind"] == "PyTorchJob":
            pods += [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    return pods


def _env_of(pod: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", [])}


def _torchrun_env(spec: JobSpec) -> dict[str, str]:
    # docker/entrypoint.sh passes both on to torchrun
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(spec.grace_period_s)} if spec.gpus_per_node > 1 else {}
    if spec.gpus_per_node > 1 and spec.nodes > 1:
        env["RDZV_TIMEOUT"] = "3600"  # torchrun's static rendezvous: 600 s by default
    return env


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_indexed_job_and_service_validate(spec):
    service, job = render_indexed_job(spec)
    for doc in (service, job):
        _validate_core(doc)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == spec.nodes
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    env = _env_of(pod)
    assert {k: env[k] for k in ("NNODES", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT")} == {
        "NNODES": str(spec.nodes),
        "NPROC_PER_NODE": str(max(spec.gpus_per_node, 1)),
        "MASTER_ADDR": f"{spec.name}-0.{spec.name}",
        "MASTER_PORT": "29500",
    }
    _check_pod(pod, spec)


def _check_pod(pod: dict, spec: JobSpec) -> None:
    container = _check_pod_spec(pod["spec"], spec)
    fabric = {k: v for k, v in _env_of(pod).items() if k.startswith(("NCCL_", "VLM_", "RDZV_", "TORCH_"))}
    expected = _torchrun_env(spec)
    if spec.nccl_ib_hca:
        expected["NCCL_IB_HCA"] = spec.nccl_ib_hca
    if spec.nccl_socket_ifname:
        expected["NCCL_SOCKET_IFNAME"] = spec.nccl_socket_ifname
    if spec.rdma and spec.nodes > 1:
        expected["VLM_NCCL_REQUIRE_NET"] = "IB"  # the trainer checks NCCL's init log for NET/IB
    assert fabric == expected  # nothing forced on a fabric nobody asked for
    annotations = pod.get("metadata", {}).get("annotations", {})
    if spec.network_annotation:
        assert annotations == {"k8s.v1.cni.cncf.io/networks": spec.network_annotation}
    else:
        assert annotations == {}
    assert container["args"] == list(spec.overrides)  # run.dir is the user's: a new job resumes it


def _check_pod_spec(pod: dict, spec: JobSpec) -> dict:
    (container,) = pod["containers"]
    assert container["image"] == spec.image
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["terminationGracePeriodSeconds"] == spec.grace_period_s
    # The image's user vlm is uid/gid 10001: fresh volumes must become writable for it.
    assert pod["securityContext"] == {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
    resources = container.get("resources", {})
    limits = resources.get("limits", {})
    assert resources.get("requests", {}) == limits  # extended resources need it; Guaranteed QoS
    expected = {"nvidia.com/gpu": str(spec.gpus_per_node)} if spec.gpus_per_node else {}
    expected.update({name: str(count) for name, count in spec.rdma_resources})
    expected.update({k: v for k, v in (("cpu", spec.cpus), ("memory", spec.memory)) if v})
    assert limits == expected
    if spec.gpus_per_node:
        assert container["imagePullPolicy"] == "Always"  # a tag may move: every node pulls it
    else:
        assert container["imagePullPolicy"] == "IfNotPresent"  # a digest cannot move
    capabilities = container.get("securityContext", {}).get("capabilities", {}).get("add", [])
    assert capabilities == (["IPC_LOCK"] if spec.rdma else [])  # RDMA registration pins memory
    assert pod.get("hostNetwork", False) == spec.host_network
    assert pod.get("dnsPolicy") == ("ClusterFirstWithHostNet" if spec.host_network else None)
    assert pod.get("nodeSelector", {}) == dict(spec.node_selector)
    tolerations = [(t["key"], t["operator"], t.get("value"), t.get("effect")) for t in pod.get("tolerations", [])]
    assert tolerations == [(k, "Exists" if v is None else "Equal", v, e) for k, v, e in spec.tolerations]
    return container


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_jobset_validates(spec):
    (jobset,) = render_jobset(spec)
    assert not (errors := _errors(_validator("jobset-v1alpha2.schema.yaml"), jobset)), errors
    (replicated,) = jobset["spec"]["replicatedJobs"]
    # The schema leaves the embedded Job to the core API's: the whole Job, strictly.
    _validate_core(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"}, "spec": replicated["template"]["spec"]}
    )
    job = replicated["template"]["spec"]
    assert replicated["replicas"] == 1
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == spec.nodes
    assert job["backoffLimit"] == 0  # any failed pod fails the Job, and JobSet restarts the gang
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": spec.backoff_limit, "restartStrategy": "BlockingRecreate"}
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    pod = job["template"]
    assert "subdomain" not in pod["spec"]  # JobSet sets it to its own headless Service
    # JobSet's pod hostnames: <jobset>-<replicatedJob>-<job index>-<completion index>.<subdomain>
    assert _env_of(pod)["MASTER_ADDR"] == f"{spec.name}-{replicated['name']}-0-0.{spec.name}"
    assert _env_of(pod)["NNODES"] == str(spec.nodes)
    _check_pod(pod, spec)


def test_jobset_schema_is_strict():
    (jobset,) = render_jobset(SPECS[0])
    jobset["spec"]["failurePolicy"]["restartStrategy"] = "Restart"
    jobset["spec"]["failurePolicy"]["maxRestarts"] = "3"
    jobset["spec"]["replicatedJobs"][0]["replica"] = 2  # misspelt: the API server would drop it
    jobset["spec"]["ttlSecondsAfterFinished"] = -1
    jobset["spec"]["failurepolicy"] = {}
    jobset["metadata"]["name"] = "Vlm_Train"
    messages = " | ".join(e.message for e in _validator("jobset-v1alpha2.schema.yaml").iter_errors(jobset))
    for expected in (
        "'Restart' is not one of",
        "'3' is not of type 'integer'",
        "'replica' was unexpected",
        "'failurepolicy' was unexpected",
        "-1 is less than the minimum of 0",
        "'Vlm_Train' does not match",
    ):
        assert expected in messages


@pytest.fixture(scope="module")
def pytorchjob_validator():
    return _validator("pytorchjob-kubeflow-v1.schema.yaml")


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_pytorchjob_validates(spec, pytorchjob_validator):
    (job,) = render_pytorchjob(spec)
    assert not (errors := _errors(pytorchjob_validator, job)), errors
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == spec.nodes
    assert set(replicas) == ({"Master", "Worker"} if spec.nodes > 1 else {"Master"})
    assert job["spec"]["nprocPerNode"] == str(max(spec.gpus_per_node, 1))
    # Running: the survivors of a failed pod are deleted instead of holding their GPUs until NCCL times out.
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": 0,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 7 * 24 * 3600,
    }
    for replica in replicas.values():
        # The embedded pod template, in full, against the core API schema.
        _validate_core(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": replica["template"]}
        )
        _check_pod(replica["template"], spec)
        assert not {"NNODES", "MASTER_ADDR"} & set(_env_of(replica["template"]))  # the operator sets them


def test_pytorchjob_schema_rejects_what_the_operator_would(pytorchjob_validator):
    (job,) = render_pytorchjob(SPECS[0])
    spec = job["spec"]
    spec["nprocPerNode"] = 8  # a number where v1 wants a string
    spec["runPolicy"]["cleanPodPolicy"] = "Sometimes"
    spec["pytorchReplicaSpecs"]["Worker"]["replicas"] = "3"
    spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    spec["pytorchReplicaSpecs"]["Chief"] = spec["pytorchReplicaSpecs"]["Master"]
    spec["runpolicy"] = {}  # a misspelt field, which the API server would silently drop
    messages = " | ".join(e.message for e in pytorchjob_validator.iter_errors(job))
    for expected in ("8 is not of type 'string'", "'Sometimes' is not one of", "'3' is not of type 'integer'"):
        assert expected in messages
    assert "does not contain items matching" in messages  # no container named pytorch
    assert "'Chief' is not one of" in messages
    assert "'runpolicy' was unexpected" in messages


def test_fabric_env_only_where_it_applies():
    # One node: no inter-node traffic, so no IB requirement (the fabric's pod options stay).
    one = dataclasses.replace(FABRIC, nodes=1)
    for pod in _pods(render_jobset(one)):
        assert "VLM_NCCL_REQUIRE_NET" not in _env_of(pod)
        assert pod["spec"]["containers"][0]["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    # Each RDMA option on its own asks for IB (and IPC_LOCK); NCCL names alone do not.
    for option in ({"rdma_resources": (("rdma/ib", 1),)}, {"network_annotation": "ib"}, {"host_network": True}):
        spec = dataclasses.replace(SPECS[0], **option)
        for pod in _pods(render(spec, "indexed-job")):
            assert _env_of(pod)["VLM_NCCL_REQUIRE_NET"] == "IB"
            assert "IPC_LOCK" in pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    spec = dataclasses.replace(SPECS[0], nccl_socket_ifname="=eth0")
    (pod,) = _pods(render(spec, "indexed-job"))
    assert "VLM_NCCL_REQUIRE_NET" not in _env_of(pod) and "securityContext" not in pod["spec"]["containers"][0]


@pytest.mark.parametrize("kind", ["indexed-job", "jobset", "pytorchjob"])
def test_kueue_queue_label_on_the_job(kind):
    docs = render(FABRIC, kind)
    (job,) = [d for d in docs if d["kind"] != "Service"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    for doc in docs:
        if doc["kind"] == "Service":
            assert "kueue.x-k8s.io/queue-name" not in doc["metadata"]["labels"]  # Kueue admits jobs, not Services
    for pod in _pods(docs):
        assert "schedulerName" not in pod["spec"]


def test_volcano_gang_for_pytorchjob(pytorchjob_validator):
    spec, kind, _ = parse_args([*K8S_ARGS, "--kind", "pytorchjob", "--scheduler", "volcano", "--queue", "research"])
    (job,) = render(spec, kind)
    assert not (errors := _errors(pytorchjob_validator, job)), errors
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "queue": "research"}
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]  # the queue is Volcano's here
    for pod in _pods([job]):
        assert pod["spec"]["schedulerName"] == "volcano"


K8S_ARGS = ["--nodes", "2", "--gpus-per-node", "8", "--image", "img:1", "--grace-period", "600"]


def test_cli_options_reach_the_spec():
    spec, kind, dry_run = parse_args(
        [
            *K8S_ARGS,
            "--kind=jobset",
            "--backoff-limit=3",
            "--rdma-resource=rdma/rdma_shared_device_a=1",
            "--rdma-resource=nvidia.com/hostdev=8",
            "--network-annotation=default/ib-sriov",
            "--host-network",
            "--nccl-ib-hca==mlx5_0,mlx5_3",
            "--nccl-socket-ifname==eth0",
            "--queue=team-a",
            "--toleration=nvidia.com/gpu:NoSchedule",
            "--toleration=dedicated=training",
            "--node-selector=nvidia.com/gpu.product=NVIDIA-H200",
            "--ttl-after-finished=3600",
            "--dry-run",
            "--",
            "run.dir=/runs/x",
        ],
        now=0,
    )
    assert (kind, dry_run, spec.backoff_limit, spec.grace_period_s, spec.ttl_after_finished_s) == (
        "jobset",
        True,
        3,
        600,
        3600,
    )
    assert spec.rdma_resources == (("rdma/rdma_shared_device_a", 1), ("nvidia.com/hostdev", 8))
    assert (spec.network_annotation, spec.host_network) == ("default/ib-sriov", True)
    assert (spec.nccl_ib_hca, spec.nccl_socket_ifname, spec.queue) == ("=mlx5_0,mlx5_3", "=eth0", "team-a")
    assert spec.tolerations == (("nvidia.com/gpu", None, "NoSchedule"), ("dedicated", "training", None))
    assert spec.node_selector == (("nvidia.com/gpu.product", "NVIDIA-H200"),)
    (jobset,) = render(spec, kind)
    assert not (errors := _errors(_validator("jobset-v1alpha2.schema.yaml"), jobset)), errors
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert jobset["spec"]["ttlSecondsAfterFinished"] == 3600
    _check_pod(_pods([jobset])[0], spec)


def test_each_submission_gets_a_new_name():
    first, _, _ = parse_args([*K8S_ARGS, "--name", "stage2", "--", "run.dir=/runs/stage2"], now=0)
    again, _, _ = parse_args([*K8S_ARGS, "--name", "stage2", "--", "run.dir=/runs/stage2"], now=3661)
    assert first.name == "stage2-700101-000000" and again.name == "stage2-700101-010101"
    assert first.overrides == again.overrides == ("run.dir=/runs/stage2",)  # the same run.dir: it resumes
    for kind in ("indexed-job", "jobset", "pytorchjob"):
        names = {d["metadata"]["name"] for d in render(again, kind)}
        assert names == {again.name}
    assert re.fullmatch(r"vlm-train-\d{6}-\d{6}", parse_args(K8S_ARGS)[0].name)


# --- the grace period: the planned step and save ------------------------------------------------


@pytest.fixture(scope="module")
def llava_7b_overrides(tmp_path_factory):
    llm, vision = write_config_only_folders(tmp_path_factory.mktemp("models"))
    return ["experiment=llava15-7b-stage2", f"vision.path={vision}", f"llm.path={llm}"]


def test_grace_period_follows_the_planned_save_time(llava_7b_overrides):
    base = ["--nodes", "4", "--gpus-per-node", "8", "--image", "img:1"]
    toy, _, _ = parse_args([*base, "--", "experiment=toy"])
    assert toy.grace_period_s == GRACE_FLOOR_S  # a toy checkpoint takes no time: the floor

    plan = plan_stop(llava_7b_overrides, nodes=4, gpus_per_node=8)
    # LLaVA-1.5 stage 2 trains Llama-2-7B and the projector (6.76e9 parameters): bf16 weights,
    # fp32 Adam moments and master copy, 14 bytes each; the frozen CLIP tower is not saved.
    assert plan.checkpoint_bytes == pytest.approx(14 * 6.76e9, rel=0.01)
    assert 0 < plan.step_s < 60
    big, _, _ = parse_args([*base, "--", *llava_7b_overrides])
    assert big.grace_period_s == math.ceil(plan.step_s + plan.checkpoint_bytes / 0.5e9 + GRACE_MARGIN_S)
    assert big.grace_period_s > toy.grace_period_s  # a bigger checkpoint: a longer grace
    slow, _, _ = parse_args([*base, "--checkpoint-write-gbps", "0.25", "--", *llava_7b_overrides])
    assert slow.grace_period_s == math.ceil(plan.step_s + plan.checkpoint_bytes / 0.25e9 + GRACE_MARGIN_S)
    frozen, _, _ = parse_args([*base, "--", *llava_7b_overrides, "llm.freeze=true"])  # stage 1: the projector only
    assert frozen.grace_period_s == GRACE_FLOOR_S
    for kind in ("indexed-job", "jobset", "pytorchjob"):
        for pod in _pods(render(big, kind)):
            assert pod["spec"]["terminationGracePeriodSeconds"] == big.grace_period_s
            assert _env_of(pod)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(big.grace_period_s)  # torchrun waits as long


def test_grace_period_given_directly():
    assert parse_args([*K8S_ARGS[:-2], "--save-seconds", "1000"])[0].grace_period_s == 1000 + GRACE_MARGIN_S
    assert parse_args([*K8S_ARGS[:-2], "--save-seconds", "10"])[0].grace_period_s == GRACE_FLOOR_S
    assert parse_args([*K8S_ARGS[:-2], "--grace-period", "90", "--save-seconds", "1000"])[0].grace_period_s == 90
    assert grace_seconds(400.2) == 521


def test_grace_period_unplannable_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*K8S_ARGS[:-2], "--", "experiment=llava15-7b-stage2", f"llm.path={tmp_path}/none"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m launch.k8s: error: cannot plan the save time from the overrides (")
    assert last.endswith("pass --save-seconds S or --grace-period S")


# --- the command line ---------------------------------------------------------------------------


def test_k8s_cli_dry_run_prints_yaml(capsys):
    argv = ["--nodes", "2", "--gpus-per-node", "8", "--image", "img:1", "--dry-run", "--", "experiment=toy"]
    assert main(argv) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    assert main(["--kind", "jobset", *argv]) == 0
    (jobset,) = yaml.safe_load_all(capsys.readouterr().out)
    assert jobset["kind"] == "JobSet"
    assert main(["--kind", "pytorchjob", *argv]) == 0
    (job,) = yaml.safe_load_all(capsys.readouterr().out)
    assert job["kind"] == "PyTorchJob"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"] == [
        "experiment=toy"
    ]


def _fake_kubectl(folder: Path, uid: str = "8d6c1f3e-0000-4000-8000-000000000001") -> Path:
    """A kubectl that records its arguments and stdin, one JSON line per call, and prints a uid."""
    log = folder / "calls.jsonl"
    script = folder / "kubectl"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"call = {{'argv': sys.argv[1:], 'stdin': sys.stdin.read()}}\n"
        f"open({str(log)!r}, 'a').write(json.dumps(call) + '\\n')\n"
        f"print({uid!r}, end='')\n"
    )
    script.chmod(0o755)
    return log


def test_submit_creates_the_job_then_a_service_it_owns(tmp_path, monkeypatch, capsys):
    log = _fake_kubectl(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    docs = render_indexed_job(SPECS[0])
    assert submit(docs) == 0
    assert capsys.readouterr().out == "Job vlm-train created\n"
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    # create, not apply: a second submission (a new name) starts a new job instead of "unchanged"
    assert first["argv"] == ["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"]
    assert [d["kind"] for d in yaml.safe_load_all(first["stdin"])] == ["Job"]
    assert second["argv"] == ["create", "-f", "-"]
    (service,) = yaml.safe_load_all(second["stdin"])
    _validate_core(service)
    # Deleted with its Job (ttlSecondsAfterFinished), so Services do not pile up per submission.
    assert service["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "vlm-train", "uid": "8d6c1f3e-0000-4000-8000-000000000001"}
    ]
    assert "ownerReferences" not in docs[0]["metadata"]  # the rendering itself is left as it was
    log.unlink()
    assert submit(render_jobset(SPECS[0])) == 0
    (only,) = (json.loads(line) for line in log.read_text().splitlines())
    assert [d["kind"] for d in yaml.safe_load_all(only["stdin"])] == ["JobSet"]


def test_k8s_cli_without_kubectl_fails_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no kubectl here
    argv = ["-m", "launch.k8s", "--nodes", "1", "--gpus-per-node", "0", "--image", "img:1", "--save-seconds", "0"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 127
    assert result.stderr.strip().count("\n") == 0
    assert "kubectl not found" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nodes", "0"], "--nodes must be >= 1"),
        (["--name", "Bad_Name"], "must be a DNS label"),
        (["--kind", "jobset", "--name", "a" * 41], "short enough for"),
        (["--pvc", "runs"], "expected CLAIM:/absolute/path"),
        (["--backoff-limit", "1"], "--backoff-limit 1: a replaced pod cannot join the static rendezvous"),
        (["--kind", "pytorchjob", "--backoff-limit", "2"], "use --kind jobset"),
        (["--kind", "jobset", "--backoff-limit", "-1"], "--backoff-limit -1"),
        (["--rdma-resource", "rdma_shared_device_a=1"], "expected DOMAIN/NAME=COUNT"),
        (["--rdma-resource", "rdma/ib=0"], "expected DOMAIN/NAME=COUNT"),
        (["--rdma-resource", "rdma/ib"], "expected DOMAIN/NAME=COUNT"),
        (["--scheduler", "volcano"], "--scheduler volcano needs --kind pytorchjob"),
        (["--toleration", "nvidia.com/gpu:NoRun"], "expected KEY[=VALUE][:NoSchedule|PreferNoSchedule|NoExecute]"),
        (["--toleration", "=x"], "--toleration '=x'"),
        (["--node-selector", "gpu"], "--node-selector 'gpu': expected KEY=VALUE"),
        (["--grace-period", "0"], "--grace-period must be >= 1"),
        (["--checkpoint-write-gbps", "0"], "--checkpoint-write-gbps must be > 0"),
    ],
)
def test_k8s_cli_rejects_bad_arguments(extra, message, capsys):
    argv = ["--nodes", "2", "--gpus-per-node", "8", "--image", "x", "--grace-period", "600"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, *extra])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then one line
    assert last.startswith("python -m launch.k8s: error: ") and message in last


def test_yaml_has_no_aliases():
    text = "".join(to_yaml(render(FABRIC, kind)) for kind in ("pytorchjob", "indexed-job", "jobset"))
    assert "&id" not in text and "*id" not in text


def test_readme_documents_every_launcher():
    readme = (REPO / "README.md").read_text()
    for heading in ("## Running on a SuperPOD", "## Running on Kubernetes", "## Running in Docker"):
        assert heading in readme
    assert "tracked in the launch issue" not in readme
    for command in ("sbatch slurm/pretrain.sh", "python -m launch.k8s", "docker build -f docker/Dockerfile"):
        assert command in readme
