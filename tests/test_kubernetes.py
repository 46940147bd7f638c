"""The Kubernetes manifest (deploy/kubernetes/pcvit-workers.yaml) holds the fields a user would otherwise get
wrong: an Indexed Job of one-GPU pods running the worker, the storage URL from a Secret, and the artifact folder
on a shared (ReadWriteMany) volume mounted exactly where the worker writes; preemption restarts a pod without
spending the backoff budget, and the grace period leaves room to finish a batch."""

from __future__ import annotations

import pytest
import yaml

import storage
from studies.running.worker_args import parse_worker_args
from studies.studyfile.spec import load_spec
from tests.helpers import REPO

MANIFEST = REPO / "deploy" / "kubernetes" / "pcvit-workers.yaml"
WORKDIR = "/app"  # the image's WORKDIR (Dockerfile): relative paths in the worker's arguments start there


@pytest.fixture(scope="module")
def documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), kinds
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def job(documents) -> dict:
    return documents["Job"]


@pytest.fixture(scope="module")
def worker(job) -> dict:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    return containers[0]


def test_an_indexed_job_of_n_workers_at_once(job):
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert isinstance(spec["completions"], int) and spec["completions"] >= 1
    assert spec["parallelism"] == spec["completions"]


def test_one_gpu_per_pod(worker):
    limits = worker["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in (1, "1")


def test_the_worker_runs_on_a_study_file_in_the_image(worker):
    assert worker["command"] == ["pcvit-worker"]
    args = parse_worker_args(worker["args"])  # the worker's own parser: a typo fails here
    assert args.study_file and not args.storage  # the URL comes from the Secret, never the command line
    path = args.study_file if args.study_file.startswith("/") else f"{WORKDIR}/{args.study_file}"
    assert path.startswith(f"{WORKDIR}/")
    load_spec(str(REPO / path[len(WORKDIR) + 1:]))  # shipped in the repository, hence in the image, and valid


def test_the_storage_url_comes_from_a_secret(worker):
    env = {e["name"]: e for e in worker["env"]}
    ref = env[storage.URL_ENV]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and "value" not in env[storage.URL_ENV]
    assert not [e for e in worker["env"] if "value" in e and "://" in str(e["value"])]  # no URL in plain text
    password = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == ref["name"]


def test_the_artifact_dir_is_a_shared_volume_mounted_where_the_worker_writes(documents, job, worker):
    artifact_dir = parse_worker_args(worker["args"]).artifact_dir
    assert artifact_dir and artifact_dir.startswith("/")
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert artifact_dir in mounts, f"--artifact-dir {artifact_dir} is not a mount path: {sorted(mounts)}"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[artifact_dir]["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = documents["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes write checkpoints there


def test_preemption_restarts_a_pod_without_spending_the_backoff_and_bad_input_stops_the_job(job):
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy needs it
    rules = spec["podFailurePolicy"]["rules"]
    assert any(r["action"] == "Ignore" and {"type": "DisruptionTarget"} in r.get("onPodConditions", [])
               for r in rules)
    assert any(r["action"] == "FailJob" and 2 in r.get("onExitCodes", {}).get("values", []) for r in rules)
    assert spec["backoffLimitPerIndex"] >= 1 and spec["backoffLimit"] >= spec["backoffLimitPerIndex"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # SIGTERM to SIGKILL: a batch and a re-queue fit
