"""Distributed fine-tune on Kubernetes: the k8s/training templates render with kustomize and are
exactly what kubetune.steps.distributed creates; the launcher's job handling; the pipeline switch."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from kubetune.core.config import config_from_args
from kubetune.errors import ConfigError
from kubetune.steps.distributed import JobConfig, JobFailed, job_name, render, run_job, worker_command
from kubetune.steps.finetune import FinetuneConfig, build_parser

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "k8s" / "training"
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (renders k8s/ with kustomize)")


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@needs_kubectl
@pytest.mark.parametrize("backend", ["pytorchjob", "trainjob"])
def test_job_templates_are_what_the_launcher_creates(backend):
    [rendered] = kustomize(TRAINING / backend)
    container = (rendered["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
                 if backend == "pytorchjob" else rendered["spec"]["trainer"])
    command = container["command"] + container["args"]
    job = JobConfig(backend=backend, workers=2, gpus_per_worker=1, image=container["image"])
    ours = render(job, "kubetune-finetune", "kubetune", command)
    assert rendered["apiVersion"] == ours["apiVersion"] and rendered["kind"] == ours["kind"]
    assert rendered["metadata"]["labels"] == ours["metadata"]["labels"] and rendered["metadata"]["namespace"] == "kubetune"
    assert rendered["spec"] == ours["spec"]
    # the template's command is a valid fine-tune command line
    assert command[:3] == ["torchrun", "-m", "kubetune.steps.finetune"]
    build_parser().parse_args(command[3:])


@needs_kubectl
def test_launcher_rbac_lets_the_pipeline_runner_manage_jobs():
    docs = kustomize(TRAINING)
    role = next(d for d in docs if d["kind"] == "Role")
    granted = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for key in (("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs")):
        assert {"create", "patch", "get"} <= granted[key], key  # server-side apply is a PATCH
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune-pipeline-runner", "namespace": "kubetune"}]
    assert all(d["metadata"]["namespace"] == "kubetune" for d in docs)


def test_worker_command_forwards_the_training_settings():
    cfg = FinetuneConfig(epochs=3, batch_size=64, learning_rate=8e-5, peft="lora", lora_rank=16, compile=True, seed=7)
    cmd = worker_command(store="s3://b/kt", run_id="r1", model_uri="builtin:all-minilm-l6-v2", tokens_uri="s3://b/kt/runs/r1/finetune/tokens",
                         publish="runs/r1/finetune/model", cfg=cfg)
    a = build_parser().parse_args(cmd[3:])
    assert config_from_args(FinetuneConfig, a) == replace(cfg, device="auto", cpu_threads=0)
    assert (a.store, a.run_id, a.publish) == ("s3://b/kt", "r1", "runs/r1/finetune/model")


def test_render_scales_workers_and_gpus():
    cmd = ["torchrun", "-m", "kubetune.steps.finetune"]
    job = render(JobConfig(workers=4, gpus_per_worker=8), job_name("20261123-ABC_1"), "team", cmd)
    assert job["metadata"]["name"] == "kubetune-ft-20261123-abc-1"
    assert job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    single_cpu = render(JobConfig(workers=1, gpus_per_worker=0), "j", "team", cmd)["spec"]
    assert "Worker" not in single_cpu["pytorchReplicaSpecs"] and single_cpu["nprocPerNode"] == "1"
    assert "tolerations" not in single_cpu["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    trainjob = render(JobConfig(backend="trainjob", workers=3, gpus_per_worker=2), "j", "team", cmd)["spec"]["trainer"]
    assert trainjob["numNodes"] == 3 and trainjob["numProcPerNode"] == 2
    with pytest.raises(ConfigError, match="backend='mpijob'"):
        JobConfig(backend="mpijob").check()


def cond(kind: str, message: str = "") -> dict:
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": kind, "status": "True", "message": message}]}


def test_run_job_applies_the_job_and_waits_for_the_outcome(tmp_path):
    """Against tests/helpers/fake_kube.py: real HTTP, the real kubernetes client via kubetune.release.kube."""
    from kubetune.release.kube import connect
    from tests.helpers import fake_kube

    job = JobConfig(poll_s=0)
    manifest = render(job, "j", "ns", ["torchrun", "-m", "kubetune.steps.finetune"])
    with fake_kube.FakeKube() as fake:
        kube = connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig")))
        states = iter([{}, cond("Running"), cond("Succeeded")])
        fake.controller = lambda obj: next(states)
        run_job(manifest, "pytorchjob", job, kube)
        assert fake.objects[("ns", "j")]["spec"] == manifest["spec"]
        assert any(r["path"] == "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j" and r["method"] == "PATCH" for r in fake.requests)
        fake.controller = lambda obj: cond("Succeeded")
        run_job(manifest, "pytorchjob", job, kube)  # a retried launcher re-applies the same job: no second one
        assert len(fake.objects) == 1 and fake.objects[("ns", "j")]["metadata"]["generation"] == 1
        trainjob = replace(job, backend="trainjob")
        fake.controller = lambda obj: cond("Complete")
        run_job(render(trainjob, "t", "ns", ["torchrun"]), "trainjob", trainjob, kube)
        fake.controller = lambda obj: cond("Failed", "worker-0 exited with code 1")
        with pytest.raises(JobFailed, match="PyTorchJob ns/f failed.*worker-0 exited with code 1"):
            run_job(render(job, "f", "ns", ["torchrun"]), "pytorchjob", job, kube)
