"""The Ray manifests rendered from a job file: in sync with the job, standard resources valid
(kubernetes-validate), KubeRay resources within KubeRay's documented spec, and the cluster
launcher config valid against Ray's own schema.

KubeRay's spec, as documented by its API types (``ray.io/v1``; json tags, ``omitempty`` =
optional, otherwise required; kubebuilder defaults):
- ray-project/kuberay ``ray-operator/apis/ray/v1/raycluster_types.go`` (commit 026f1433):
  RayClusterSpec, HeadGroupSpec, WorkerGroupSpec;
- ray-project/kuberay ``ray-operator/apis/ray/v1/rayjob_types.go`` (commit 0057210e): RayJobSpec;
- the KubeRay guide https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/config.html
  (headGroupSpec, workerGroupSpecs, rayStartParams, template) and the RayJob quickstart
  https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/rayjob-quick-start.html
  (entrypoint, rayClusterSpec, shutdownAfterJobFinishes, submissionMode).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from milepost.daemon.cli import main as cli_main
from milepost.engine.contract.config import load_job

ROOT = Path(__file__).resolve().parents[2]
JOB = "examples/tiny-grpo-cpu.toml"
RENDERED = ROOT / "deploy" / "ray" / "tiny-grpo-cpu"
K8S_VERSION = "1.30"

# Field name -> required, from the API types cited above.
RAY_CLUSTER_SPEC = {
    "headGroupSpec": True,
    "workerGroupSpecs": False,
    "rayVersion": False,
    "enableInTreeAutoscaling": False,
    "autoscalerOptions": False,
    "headServiceAnnotations": False,
    "suspend": False,
}
HEAD_GROUP_SPEC = {
    "serviceType": False,
    "headService": False,
    "enableIngress": False,
    "rayStartParams": True,
    "template": True,
}
WORKER_GROUP_SPEC = {
    "groupName": True,
    "replicas": False,
    "minReplicas": True,
    "maxReplicas": True,
    "numOfHosts": False,
    "rayStartParams": True,
    "template": True,
    "scaleStrategy": False,
}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds": False,
    "backoffLimit": False,
    "rayClusterSpec": False,
    "submitterPodTemplate": False,
    "metadata": False,
    "clusterSelector": False,
    "submitterConfig": False,
    "managedBy": False,
    "deletionStrategy": False,
    "entrypoint": False,
    "runtimeEnvYAML": False,
    "jobId": False,
    "submissionMode": False,
    "entrypointResources": False,
    "entrypointNumCpus": False,
    "entrypointNumGpus": False,
    "ttlSecondsAfterFinished": False,
    "shutdownAfterJobFinishes": False,
    "suspend": False,
    "schedule": False,
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _check_fields(obj: dict[str, Any], spec: dict[str, bool], where: str) -> None:
    unknown = set(obj) - set(spec)
    assert not unknown, f"{where}: fields KubeRay's spec does not have: {sorted(unknown)}"
    missing = [k for k, required in spec.items() if required and k not in obj]
    assert not missing, f"{where}: required fields missing: {missing}"


def _check_pod_template(template: dict[str, Any], where: str) -> None:
    """A corev1.PodTemplateSpec: checked as a standard PodTemplate by kubernetes-validate."""
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    for c in template["spec"]["containers"]:
        assert c["image"], f"{where}: container {c['name']} has no image"


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    _check_fields(spec, RAY_CLUSTER_SPEC, where)
    head = spec["headGroupSpec"]
    _check_fields(head, HEAD_GROUP_SPEC, f"{where}.headGroupSpec")
    assert head.get("serviceType", "ClusterIP") in SERVICE_TYPES
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        "rayStartParams is map[string]string"
    )
    _check_pod_template(head["template"], f"{where}.headGroupSpec.template")
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        _check_fields(group, WORKER_GROUP_SPEC, w)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), w
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], w
        _check_pod_template(group["template"], f"{w}.template")


# -- in sync with the job -------------------------------------------------------------------
@pytest.mark.parametrize("target", ["kuberay", "cluster"])
def test_committed_examples_are_in_sync_with_the_job(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert cli_main(["deploy", target, JOB, "--out", str(tmp_path)]) == 0
    for made in tmp_path.iterdir():
        committed = RENDERED / made.name
        assert committed.exists(), f"{committed} missing: run `milepost deploy {target} {JOB}`"
        assert committed.read_text() == made.read_text(), (
            f"{committed} differs: run `milepost deploy {target} {JOB}`"
        )


def test_manifests_follow_the_job() -> None:
    job = load_job(ROOT / JOB)
    pvc, config, service = _docs(RENDERED / "common.yaml")
    (cluster,) = _docs(RENDERED / "raycluster.yaml")
    (rayjob,) = _docs(RENDERED / "rayjob.yaml")
    rendered_job = tomllib.loads(config["data"]["job.toml"])
    original = tomllib.loads((ROOT / JOB).read_text())
    for section, table in original.items():
        for k, v in table.items():
            if (section, k) != ("ray", "address"):  # milepost run --ray-address chooses the cluster
                assert rendered_job[section][k] == v, f"{section}.{k}"
    run_dir = rendered_job["run"]["run_dir"]
    assert run_dir.startswith("/milepost/") and rendered_job["supervisor"]["api_host"] == "0.0.0.0"
    port = rendered_job["supervisor"]["api_port"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    assert service["spec"]["ports"][0]["port"] == port
    for spec in (cluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]["template"]
        assert head["metadata"]["annotations"] == service["metadata"]["annotations"]
        assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items(), (
            "the Service finds the head"
        )
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no rank on the head"
        trainers, rollout = spec["workerGroupSpecs"]
        assert (trainers["replicas"], trainers["minReplicas"], trainers["maxReplicas"]) == (
            job.trainer.world_size,
            job.trainer.min_world_size,
            job.trainer.max_world_size,
        )
        assert rollout["replicas"] == job.rollout.workers
        for pod in (head, trainers["template"], rollout["template"]):
            for c in pod["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["RAY_worker_niceness"] == "0" and "MILEPOST_TOKEN" in env
                assert {"name": "runs", "mountPath": "/milepost"} in c["volumeMounts"]
            claims = [
                v["persistentVolumeClaim"]["claimName"]
                for v in pod["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            ]
            assert claims == [pvc["metadata"]["name"]]
    sidecar = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    assert (
        sidecar["name"] == "milepost-daemon"
        and f"milepost run /etc/milepost/job.toml --run-dir {run_dir}" in sidecar["command"][-1]
    )
    entry = rayjob["spec"]["entrypoint"]
    assert (
        entry.startswith(f"milepost run /etc/milepost/job.toml --run-dir {run_dir}")
        and "--exit-when-done" in entry
    )


def test_world_size_changes_reach_the_manifests(tmp_path: Path) -> None:
    job = tmp_path / "big.toml"
    job.write_text(
        '[run]\nname = "Big Run"\n[trainer]\nworld_size = 8\nmin_world_size = 4\ngpus_per_rank = 1\n'
        "[rollout]\nworkers = 3\n"
    )
    assert cli_main(["deploy", "kuberay", str(job), "--out", str(tmp_path / "out")]) == 0
    (cluster,) = _docs(tmp_path / "out" / "raycluster.yaml")
    trainers, rollout = cluster["spec"]["workerGroupSpecs"]
    assert (trainers["replicas"], trainers["minReplicas"], trainers["maxReplicas"]) == (8, 4, 8)
    assert trainers["rayStartParams"] == {"num-cpus": "1", "num-gpus": "1"}
    assert trainers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert rollout["replicas"] == 3 and cluster["metadata"]["name"] == "milepost-big-run"


def test_a_bad_job_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "bad.toml"
    job.write_text("[trainer]\nworld_size = 0\n")
    assert cli_main(["deploy", "kuberay", str(job), "--out", str(tmp_path / "out")]) == 2
    assert "trainer.world_size=0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- standard resources ---------------------------------------------------------------------
def test_standard_resources_are_valid_kubernetes() -> None:
    kinds = []
    for doc in _docs(RENDERED / "common.yaml"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert kinds == ["PersistentVolumeClaim", "ConfigMap", "Service"]


def test_kubernetes_validate_catches_a_broken_service() -> None:
    """The check can fail: a port given as a string is rejected."""
    service = _docs(RENDERED / "common.yaml")[2]
    service["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# -- KubeRay resources against its documented spec ---------------------------------------------
def test_raycluster_follows_kuberays_spec() -> None:
    (cluster,) = _docs(RENDERED / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert set(cluster) == {"apiVersion", "kind", "metadata", "spec"}
    _check_cluster_spec(cluster["spec"], "RayCluster.spec")


def test_rayjob_follows_kuberays_spec() -> None:
    (job,) = _docs(RENDERED / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    _check_fields(spec, RAY_JOB_SPEC, "RayJob.spec")
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert isinstance(spec["entrypoint"], str) and isinstance(spec["shutdownAfterJobFinishes"], bool)
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")


def test_the_spec_check_can_fail() -> None:
    (cluster,) = _docs(RENDERED / "raycluster.yaml")
    del cluster["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(AssertionError, match="groupName"):
        _check_cluster_spec(cluster["spec"], "RayCluster.spec")
    cluster["spec"]["headGroupSpec"]["headgroupSpec"] = {}  # a misspelt field
    with pytest.raises(AssertionError, match="headgroupSpec"):
        _check_fields(cluster["spec"]["headGroupSpec"], HEAD_GROUP_SPEC, "head")


# -- the cluster launcher ------------------------------------------------------------------
def test_cluster_launcher_config_is_valid_for_ray() -> None:
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _docs(RENDERED / "cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs on it
    job = load_job(ROOT / JOB)
    assert config["max_workers"] == job.trainer.max_world_size + job.rollout.workers
    assert any("milepost run" in c for c in config["head_start_ray_commands"])
    assert tomllib.loads((RENDERED / "job.toml").read_text())["run"]["run_dir"].startswith("/milepost/")
