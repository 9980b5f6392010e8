"""Launching anywhere: the launch-environment mapping, the Kubernetes manifests (validated against
the API schemas offline). Docker: tests/test_docker.py.

The Slurm scripts run on a real local cluster in tests/test_launch_slurm.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from launch.k8s import JobSpec, main, parse_args, render, render_indexed_job, render_pytorchjob, to_yaml
from tests.helpers import REPO
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
SCHEMA = REPO / "launch" / "schemas" / "pytorchjob-kubeflow-v1.schema.yaml"
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
]


def _validate_core(doc: dict) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:  # its str() dumps the whole schema
        pytest.fail(f"{doc['kind']} is not valid Kubernetes {K8S_VERSION}: {err.message} at {list(err.path)}")


@pytest.mark.parametrize("spec", SPECS, ids=["4x8gpu", "1cpu-pvc"])
def test_indexed_job_and_service_validate(spec):
    service, job = render_indexed_job(spec)
    for doc in (service, job):
        _validate_core(doc)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == spec.nodes
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env == {
        "NNODES": str(spec.nodes),
        "NPROC_PER_NODE": str(max(spec.gpus_per_node, 1)),
        "MASTER_ADDR": f"{spec.name}-0.{spec.name}",
        "MASTER_PORT": "29500",
    }
    _check_pod(pod, spec)


def _check_pod(pod: dict, spec: JobSpec) -> None:
    (container,) = pod["containers"]
    assert container["image"] == spec.image
    assert container["args"] == list(spec.overrides)
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    limits = container.get("resources", {}).get("limits", {})
    if spec.gpus_per_node:
        assert limits["nvidia.com/gpu"] == str(spec.gpus_per_node)
        assert container["imagePullPolicy"] == "Always"  # a tag may move: every node pulls it
    else:
        assert "nvidia.com/gpu" not in limits
        assert container["imagePullPolicy"] == "IfNotPresent"  # a digest cannot move


@pytest.fixture(scope="module")
def pytorchjob_validator():
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("spec", SPECS, ids=["4x8gpu", "1cpu-pvc"])
def test_pytorchjob_validates(spec, pytorchjob_validator):
    (job,) = render_pytorchjob(spec)
    errors = [f"{list(e.path)}: {e.message}" for e in pytorchjob_validator.iter_errors(job)]
    assert not errors, errors
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == spec.nodes
    assert set(replicas) == ({"Master", "Worker"} if spec.nodes > 1 else {"Master"})
    assert job["spec"]["nprocPerNode"] == str(max(spec.gpus_per_node, 1))
    for replica in replicas.values():
        # The embedded pod template, in full, against the core API schema.
        _validate_core(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": replica["template"]}
        )
        _check_pod(replica["template"]["spec"], spec)


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


def test_k8s_cli_dry_run_prints_yaml(capsys):
    argv = ["--nodes", "2", "--gpus-per-node", "8", "--image", "img:1", "--dry-run", "--", "experiment=toy"]
    assert main(argv) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    assert main(["--kind", "pytorchjob", *argv]) == 0
    (job,) = yaml.safe_load_all(capsys.readouterr().out)
    assert job["kind"] == "PyTorchJob"
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"] == [
        "experiment=toy"
    ]


def test_k8s_cli_without_kubectl_fails_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no kubectl here
    argv = ["-m", "launch.k8s", "--nodes", "1", "--gpus-per-node", "0", "--image", "img:1", "--", "experiment=toy"]
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 127
    assert result.stderr.strip().count("\n") == 0
    assert "kubectl not found" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--nodes", "0", "--gpus-per-node", "8", "--image", "x"],
        ["--nodes", "1", "--gpus-per-node", "8", "--image", "x", "--name", "Bad_Name"],
        ["--nodes", "1", "--gpus-per-node", "8", "--image", "x", "--pvc", "runs"],
    ],
)
def test_k8s_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2


def test_yaml_has_no_aliases():
    text = to_yaml(render(SPECS[0], "pytorchjob")) + to_yaml(render(SPECS[0], "indexed-job"))
    assert "&id" not in text and "*id" not in text


def test_readme_documents_every_launcher():
    readme = (REPO / "README.md").read_text()
    for heading in ("## Running on a SuperPOD", "## Running on Kubernetes", "## Running in Docker"):
        assert heading in readme
    assert "tracked in the launch issue" not in readme
    for command in ("sbatch slurm/pretrain.sh", "python -m launch.k8s", "docker build -f docker/Dockerfile"):
        assert command in readme
