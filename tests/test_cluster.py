"""cluster/: the launcher configs pass Ray's own validation (offline), the KubeRay manifests carry
what KubeRay and Ray's autoscaler read from them, and cluster/local.sh starts a real two-node
Ray on 127.0.0.1 that a training job runs across, then stops every process it started."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from localcluster import local_cluster
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def pinned_stack() -> dict[str, str]:
    """{distribution: requirement} for what pyproject.toml pins for running the jobs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["jobs"]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower(): r for r in requirements}


RAY_VERSION = pinned_stack()["ray"].split("==")[1]
RAY_IMAGE = re.compile(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py311(-[a-z0-9]+)?")


def assert_installs_stack(commands: str, gpu: bool) -> None:
    """``commands`` install every pin of pyproject.toml (GPU nodes: MXNet's CUDA build, cupy)."""
    for name, requirement in pinned_stack().items():
        if gpu and name == "mxnet":
            version = requirement.split("==")[1]
            assert re.search(rf'"mxnet-cu1\d\d=={re.escape(version)}"', commands), commands
            assert '"mxnet==' not in commands, "the CPU build would shadow the CUDA one"
        else:
            assert f'"{requirement}"' in commands, f"{requirement} is not installed: {commands}"
    if gpu:
        assert '"cupy-cuda12x' in commands, "ray.util.collective's NCCL backend needs cupy"
        assert "whl/cpu" not in commands, "GPU nodes need torch's CUDA build"
    else:
        assert "https://download.pytorch.org/whl/cpu" in commands, "torch's CPU wheel"


# --- Ray cluster launcher (AWS, GCP) ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_passes_ray_validation(name):
    raw = load(name)
    # prepare_config is offline: it merges the provider's defaults.yaml shipped inside Ray and
    # fills per-type min/max workers; validate_config checks ray-schema.json and Ray's own rules.
    # (`ray up` would then call the provider's bootstrap, which needs the cloud: not done here.)
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    for key in ("max_workers", "idle_timeout_minutes", "upscaling_speed"):
        assert key in raw, f"{name}: autoscaling needs {key}"
    head = raw["head_node_type"]
    types = config["available_node_types"]
    assert types[head]["resources"] == {"CPU": 0}, "training workers stay off the head"
    workers = {type_name: t for type_name, t in types.items() if type_name != head}
    gpu = [type_name for type_name, t in workers.items() if t["resources"].get("GPU", 0) > 0]
    cpu = [type_name for type_name in workers if type_name not in gpu]
    assert gpu and cpu, f"{name}: a CPU worker type and a GPU worker type"
    for type_name in workers:
        declared = raw["available_node_types"][type_name]
        assert 0 <= declared["min_workers"] <= declared["max_workers"] <= raw["max_workers"]

    assert RAY_IMAGE.fullmatch(config["docker"]["image"])
    assert_installs_stack(" ".join(config["head_setup_commands"]), gpu=False)
    for type_name in cpu:
        commands = workers[type_name].get("worker_setup_commands", config["worker_setup_commands"])
        assert_installs_stack(" ".join(commands), gpu=False)
    for type_name in gpu:
        # a node type's own worker_setup_commands replace the global setup commands
        assert_installs_stack(" ".join(workers[type_name]["worker_setup_commands"]), gpu=True)
        assert RAY_IMAGE.fullmatch(workers[type_name]["docker"]["worker_image"])


@pytest.mark.timeout(60)
def test_aws_node_configs_are_valid_run_instances_requests():
    """Ray hands each node_config to EC2's RunInstances: check it against botocore's EC2 model
    (shipped with botocore, offline)."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    shape = ec2.operation_model("RunInstances").input_shape
    for type_name, node_type in load("aws.yaml")["available_node_types"].items():
        request = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}
        report = ParamValidator().validate(request, shape)
        assert not report.has_errors(), f"{type_name}: {report.generate_report()}"


@pytest.mark.timeout(60)
def test_gcp_node_configs_follow_compute_engine_shapes():
    for type_name, node_type in load("gcp.yaml")["available_node_types"].items():
        node_config = node_type["node_config"]
        # one object in the Compute Engine API (Ray's own GCP examples write a list)
        scheduling = node_config.get("scheduling", {})
        assert isinstance(scheduling, dict), f"{type_name}: scheduling must be a mapping"
        if node_config.get("guestAccelerators"):
            assert scheduling.get("onHostMaintenance") == "TERMINATE", type_name
            assert node_type["resources"]["GPU"] == sum(
                a["acceleratorCount"] for a in node_config["guestAccelerators"]
            )


# --- KubeRay ---------------------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict, name: str) -> dict:
    """What KubeRay and Ray's autoscaler need from a RayCluster spec; returns the autoscaling
    config Ray's KubeRay autoscaler derives from it (offline, with Ray's own code)."""
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert RAY_IMAGE.fullmatch(head["template"]["spec"]["containers"][0]["image"])
    assert spec["workerGroupSpecs"], "worker groups"
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["minReplicas"], int) and isinstance(group["maxReplicas"], int)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert RAY_IMAGE.fullmatch(group["template"]["spec"]["containers"][0]["image"])
    ray_cr = {"metadata": {"name": name, "namespace": "default"}, "spec": spec}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)  # also runs validate_config
    types = config["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0, "training workers stay off the head"
    for group in spec["workerGroupSpecs"]:
        node_type = types[group["groupName"]]
        assert (node_type["min_workers"], node_type["max_workers"]) == (
            group["minReplicas"],
            group["maxReplicas"],
        )
    return config


@pytest.mark.timeout(60)
def test_kuberay_cluster_manifest():
    cluster = load("kuberay-cluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    config = check_ray_cluster_spec(cluster["spec"], cluster["metadata"]["name"])
    types = config["available_node_types"]
    assert types["cpu"]["resources"]["CPU"] > 0 and "GPU" not in types["cpu"]["resources"]
    assert types["gpu"]["resources"]["GPU"] >= 1

    # Each Ray container installs the stack, then runs KubeRay's own `ray start`; that needs the
    # annotation, else KubeRay replaces the command.
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    for group_name, group in groups:
        container = group["template"]["spec"]["containers"][0]
        (script,) = container["args"]
        assert script.rstrip().endswith("$KUBERAY_GEN_RAY_START_CMD"), group_name
        assert_installs_stack(script, gpu=group_name == "gpu")
        check = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert check.returncode == 0, f"{group_name}: {check.stderr}"


def load_job_script(path: Path):
    """The job script as a module, imported as `python jobs/NAME.py` would run it (with its
    folder on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"cluster_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_kuberay_job_manifest(monkeypatch):
    job = load("kuberay-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], job["metadata"]["name"])

    # The entrypoint runs a job of jobs/ with arguments that job accepts.
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/"), argv
    script = ROOT / argv[1]
    assert script.is_file(), f"{argv[1]} is not in jobs/"
    monkeypatch.syspath_prepend(str(script.parent))
    args = load_job_script(script).parse_args(argv[2:])
    assert args.name and args.run.storage.startswith("s3://")

    # Ray's own validation of the runtime environment (the working_dir URI, the pip options).
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert runtime_env["working_dir"].endswith(".zip")
    packages = runtime_env["pip"]["packages"]
    for name, requirement in pinned_stack().items():
        if name == "ray":
            continue  # the image's own Ray
        if name == "torch":
            requirement += "+cpu"  # the CPU wheel, from the extra index
        assert requirement in packages, f"{requirement} is not installed"


# --- cluster/local.sh ------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_local_cluster_runs_a_training_job_across_two_nodes(tmp_path):
    # Never the pytest session's Ray: no address, no temp dir of its own from the environment.
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TMPDIR", "RAYMODULE_LOCAL_CLUSTER*")
    # 1 CPU per node: the 2 workers' placement group must span both nodes.
    with local_cluster(
        tmp_path, nodes=1, head_cpus=1, cpus=1, object_store_mb=256, env_drop=drop
    ) as cluster:
        exports, recorded = cluster.exports, cluster.state
        assert exports["RAY_ADDRESS"] == recorded["RAY_ADDRESS"]
        assert re.fullmatch(r"127\.0\.0\.1:\d+", exports["RAY_ADDRESS"])
        assert exports["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        dashboard = exports["RAY_API_SERVER_ADDRESS"]
        assert dashboard == recorded["DASHBOARD_URL"] and dashboard in cluster.start.stdout
        assert recorded["NODES"] == "2" and len(cluster.sessions) == 2
        assert cluster.started, "the PIDs of the started processes are recorded"

        train = subprocess.run(
            [sys.executable, "jobs/train.py", "--epochs", "1", "--workers", "2", "--name", "t"]
            + ["--storage", str(tmp_path / "runs")],
            cwd=ROOT,
            env=cluster.job_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert "test accuracy" in train.stdout
        assert (tmp_path / "runs" / "t" / "latest").is_file()

        actors = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "list", "actors"]
            + ["--address", dashboard, "--filter", "class_name=ModuleWorker"]
            + ["--detail", "--format", "json", "--limit", "100"],
            env=cluster.job_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert actors.returncode == 0, actors.stderr
        workers = json.loads(actors.stdout)
        assert len(workers) == 2
        assert len({w["node_id"] for w in workers}) == 2, "one worker on each node"
    # Leaving local_cluster asserted that `stop` succeeded and that nothing of the nodes'
    # sessions is left: neither a process recorded at start nor one the raylets started later.
    assert not cluster.state_file.exists(), "stop forgets the cluster"
    assert not cluster.temp_dir.exists(), "stop deletes the cluster's temp dir"
