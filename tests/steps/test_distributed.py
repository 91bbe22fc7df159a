"""Distributed fine-tune on Kubernetes: the k8s/training templates render with kustomize and are
exactly what kubetune.steps.distributed creates; the launcher's job handling; the pipeline switch."""

from __future__ import annotations

import json
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
    job = render(JobConfig(backend="pytorchjob", workers=4, gpus_per_worker=8), job_name("20261123-ABC_1"), "team", cmd)
    assert job["metadata"]["name"] == "kubetune-ft-20261123-abc-1"
    assert job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    assert replicas["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    single_cpu = render(JobConfig(backend="pytorchjob", workers=1, gpus_per_worker=0), "j", "team", cmd)["spec"]
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

    job = JobConfig(backend="pytorchjob", poll_s=0)
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


def _pod(name: str, labels: dict, **status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "status": {"phase": "Running", **status}}


def test_the_launcher_shows_rank_0_and_the_job_progress_then_the_failing_pod(tmp_path, capsys):
    """While a TrainJob runs, the launcher's log (the KFP step's) gets rank 0's new lines once each
    and the job's progress status (status.trainerStatus); when it fails, the failing pod's reason and
    last lines, not just a kubectl hint."""
    from kubetune.release.kube import connect
    from tests.helpers import fake_kube

    job = JobConfig(poll_s=0)
    assert job.backend == "trainjob"  # the default distributed backend (PyTorchJob is legacy)
    rank = {"jobset.sigs.k8s.io/jobset-name": "t", "jobset.sigs.k8s.io/job-index": "0"}
    with fake_kube.FakeKube() as fake:
        kube = connect(kubeconfig=str(fake.kubeconfig(tmp_path / "kubeconfig")))
        fake.pods[("ns", "t-node-0-0")] = _pod("t-node-0-0", {**rank, "batch.kubernetes.io/job-completion-index": "0"})
        fake.pods[("ns", "t-node-0-1")] = _pod("t-node-0-1", {**rank, "batch.kubernetes.io/job-completion-index": "1"})
        fake.logs[("ns", "t-node-0-1")] = ["rank 1 says nothing worth showing"]
        polls = iter(range(100))

        def running(obj):
            i = next(polls)
            if i >= 3:
                return cond("Complete")
            fake.logs.setdefault(("ns", "t-node-0-0"), []).append(f"[kubetune finetune] epoch 1/1 step {i + 1}/3")
            return {**cond("Running"), "trainerStatus": {"progressPercentage": 30 * (i + 1), "estimatedRemainingSeconds": 90 - 30 * i,
                                                          "metrics": [{"name": "loss", "value": f"{0.6 / (i + 1):.3f}"}],
                                                          "lastUpdatedTime": "2026-12-07T10:00:00Z"}}

        fake.controller = running
        run_job(render(job, "t", "ns", ["torchrun"]), "trainjob", job, kube)
        out = capsys.readouterr().out
        for i in range(3):
            assert out.count(f"[t-node-0-0] [kubetune finetune] epoch 1/1 step {i + 1}/3") == 1, out
        assert "job progress 30%, ETA 1m30s, loss 0.600" in out and "job progress 90%, ETA 30s, loss 0.200" in out
        assert "rank 1 says" not in out and "TrainJob ns/t succeeded" in out

        fake.pods[("ns", "f-node-0-1")] = _pod("f-node-0-1", {"jobset.sigs.k8s.io/jobset-name": "f"}, phase="Failed", containerStatuses=[
            {"name": "node", "ready": False, "restartCount": 0, "image": "x", "imageID": "", "state": {
                "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])
        fake.logs[("ns", "f-node-0-1")] = ["loading shard 3", "RuntimeError: CUDA out of memory"]
        fake.controller = lambda obj: cond("Failed", "jobset failed")
        with pytest.raises(JobFailed, match=r"TrainJob ns/f failed: .*jobset failed; pod f-node-0-1: container node OOMKilled "
                                            r"\(exit code 137\); its last lines:\n    loading shard 3\n    RuntimeError: CUDA out of memory"):
            run_job(render(job, "f", "ns", ["torchrun"]), "trainjob", job, kube)
        fake.forbidden_logs = True  # no RBAC for pods: said once, the job is still waited for
        fake.controller = lambda obj: cond("Complete")
        run_job(render(job, "g", "ns", ["torchrun"]), "trainjob", job, kube)
        assert capsys.readouterr().out.count("cannot read the workers' logs") == 1


# ---- the fine-tune's progress in the TrainJob's status (Kubeflow Trainer's progress API) -----------


@pytest.fixture
def status_server(tmp_path):
    """An HTTPS endpoint like the Trainer controller's status server (a self-signed certificate made
    with openssl): records each POST's body and Authorization header."""
    import http.server
    import ssl
    import subprocess
    import threading

    cert, key = tmp_path / "ca.crt", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            received.append({"auth": self.headers.get("Authorization"),
                             "body": json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "token").write_text("projected-sa-token\n")
    env = {"KUBEFLOW_TRAINER_STATUS_URL": f"https://127.0.0.1:{server.server_address[1]}/status/ns/t",
           "KUBEFLOW_TRAINER_STATUS_CA_CERT": str(cert), "KUBEFLOW_TRAINER_STATUS_TOKEN": str(tmp_path / "token")}
    yield env, received
    server.shutdown()
    server.server_close()


def test_trainer_status_reports_what_the_trainjob_status_holds(status_server, capsys):
    """Over TLS with the injected CA and token; the payload fits the Trainer v2.3 TrainJob CRD's
    status.trainerStatus; throttled; only rank 0 and only under a TrainJob; a failing endpoint is
    said once and never raises."""
    from kubetune.training.trainer_status import TrainerStatus
    from tests.helpers import schemas

    env, received = status_server
    status = TrainerStatus.from_env(env)
    assert status.report(41.7, 95.2, {"loss": 0.1234567, "epoch": 1}) and not status.report(50, 10, {})  # the second: throttled
    assert status.report(100, 0, {"eval_macro_f1": 0.9}, force=True)
    (first, last) = received
    assert first["auth"] == "Bearer projected-sa-token"
    assert first["body"]["trainerStatus"]["progressPercentage"] == 41 and first["body"]["trainerStatus"]["estimatedRemainingSeconds"] == 95
    assert first["body"]["trainerStatus"]["metrics"] == [{"name": "loss", "value": "0.123457"}, {"name": "epoch", "value": "1"}]
    job = render(JobConfig(), "t", "ns", ["torchrun"])
    for r in received:  # the API server would accept it into the TrainJob's status
        schemas.validate({**job, "status": r["body"]})
    assert TrainerStatus.from_env({}) is None and TrainerStatus.from_env(env, rank=1) is None
    assert TrainerStatus.from_env({**env, "KUBEFLOW_TRAINER_STATUS_URL": "http://127.0.0.1/x"}) is None
    down = TrainerStatus.from_env({**env, "KUBEFLOW_TRAINER_STATUS_URL": "https://127.0.0.1:9/status"})
    assert not down.report(1, None, {}, force=True) and not down.report(2, None, {}, force=True)
    assert capsys.readouterr().out.count("TrainJob progress report to https://127.0.0.1:9/status failed") == 1


def test_the_fine_tune_reports_its_progress_under_a_trainjob(status_server, monkeypatch, tmp_path, small_tokens, tiny_model_dir):
    """The fine-tune, run with the variables the Trainer injects, reports each epoch's end (train
    loss, the eval metric it selects by) and reaches 100%; without them it reports nothing."""
    from kubetune.steps.finetune import FinetuneConfig, finetune

    env, received = status_server
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    finetune(small_tokens, tiny_model_dir, tmp_path / "m", FinetuneConfig(epochs=2, batch_size=8, learning_rate=5e-3))
    ends = [r["body"]["trainerStatus"] for r in received if any(m["name"] == "eval_macro_f1" for m in r["body"]["trainerStatus"]["metrics"])]
    assert [dict((m["name"], m["value"]) for m in e["metrics"])["epoch"] for e in ends] == ["1", "2"]
    assert ends[0]["progressPercentage"] == 50 and ends[-1]["progressPercentage"] == 100 and ends[-1]["estimatedRemainingSeconds"] == 0
    assert all({"step", "train_loss", "eval_macro_f1"} <= {m["name"] for m in e["metrics"]} for e in ends)
    for k in env:
        monkeypatch.delenv(k)
    count = len(received)
    finetune(small_tokens, tiny_model_dir, tmp_path / "n", FinetuneConfig(epochs=1, batch_size=8, learning_rate=5e-3))
    assert len(received) == count
