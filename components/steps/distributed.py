"""Fine-tune as a distributed job on Kubernetes: N workers x M GPUs, torchrun in every worker.

    python -m kubetune.steps.distributed --tokens /tmp/kt/tokens --model builtin:all-minilm-l6-v2 \
        --out /tmp/kt/model --store s3://bucket/kubetune --run-id dev --backend pytorchjob \
        --workers 2 --gpus-per-worker 4 --image ghcr.io/kubetune/kubetune:0.1.0-cuda --namespace team-ml
    python -m kubetune.steps.distributed ... --dry-run     # print the manifest instead of creating it

Backends: `trainjob` (the default: Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1 TrainJob on the
`torch-distributed` ClusterTrainingRuntime) and `pytorchjob` (legacy: Kubeflow Training Operator v1,
kubeflow.org/v1 PyTorchJob, one Master and N-1 Workers; the operator is documented as legacy now).
Both operators set the PET_* variables torchrun reads (nodes, processes per node, node rank, master
address), so every worker runs the same command:
`torchrun -m kubetune.steps.finetune ...` (kubetune.training.parallel: DDP, nccl on GPUs).

The worker pods cannot see KFP's artifact paths, so this launcher, running in the pipeline's pod,
publishes the tokens to <store>/runs/<run_id>/finetune/tokens, starts the job (which reads them
from there, checkpoints to the store and publishes the model to <store>/runs/<run_id>/finetune/model),
waits for it to succeed or fail, and downloads the model into the step's output folder. While it
waits, the step's log shows rank 0's log lines as they come and the job's progress (TrainJob
status.trainerStatus: percent, ETA, loss and eval metric, which the fine-tune reports through the
Trainer's progress API, kubetune.training.trainer_status); when the job fails, the failing pod's
reason and last lines. A re-run of
the launcher with the same run id finds the job (or its published model) and does not start a
second one; a restarted worker resumes from the store checkpoint.

k8s/training/ holds the same job as kustomize templates for `kubectl apply -k`, and the Role the
pipeline's ServiceAccount needs to create jobs (see docs/finetune.md, "On Kubernetes").
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from kubetune.core.config import add_config_args, config_from_args, opt, param
from kubetune.core.context import run_main, step_context, step_parser
from kubetune.core.progress import fmt_seconds, log
from kubetune.errors import ConfigError, KubetuneError
from kubetune.release.kube import Kind, Kube, KubeError, WaitTimeout, connect
from kubetune.steps.finetune import STEP, FinetuneConfig
from kubetune.storage.store import S3_CONFIG_KEYS, S3_SECRET_KEYS

BACKENDS = ("pytorchjob", "trainjob")
KINDS = {
    "pytorchjob": Kind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"),
    "trainjob": Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"),
}
# settings forwarded to the workers' fine-tune (device is the workers' business: cuda when they have GPUs)
FORWARDED = [f.name for f in fields(FinetuneConfig) if f.name not in ("device", "cpu_threads")]


class JobFailed(KubetuneError):
    """The distributed job ended in Failed, or did not finish in time."""


@dataclass(frozen=True)
class JobConfig:
    backend: str = opt("trainjob", "Job kind: trainjob (Kubeflow Trainer TrainJob) or pytorchjob (legacy: Kubeflow Training "
                                   "Operator PyTorchJob).")
    workers: int = param(1, "Worker pods of the distributed job (pytorchjob/trainjob only).", name="finetune_workers", flag="-")
    # GPUs and torchrun processes per pod; 0 = CPU workers (1 process each)
    gpus_per_worker: int = param(1, "GPUs (one torchrun process each) per worker pod; 0 = CPU workers (pytorchjob/trainjob only).",
                                 name="finetune_gpus_per_worker", flag="-")
    image: str = opt("ghcr.io/kubetune/kubetune:0.1.0-cuda", "Image of the worker pods (the CUDA trainer image).")
    namespace: str = opt("", "Namespace of the job; empty: the launcher pod's own namespace.")
    cpu_per_worker: str = opt("8", "CPU request and limit of each worker pod.")
    memory_per_worker: str = opt("32Gi", "Memory request and limit of each worker pod.")
    accelerator: str = opt("nvidia.com/gpu", "Resource name of the GPUs a worker pod requests (and whose taint it tolerates).")
    runtime: str = opt("torch-distributed", "trainjob: the ClusterTrainingRuntime to use.")
    # the pipeline passes its own (ClusterConfig, kubetune compile --s3-secret)
    s3_secret: str = opt("kubetune-s3", "Secret with the S3 credentials, put into the workers' environment.")
    s3_config_map: str = opt("kubetune-s3-config", "ConfigMap with the S3 settings (endpoint, region), put into the workers' "
                                                   "environment.")
    service_account: str = opt("", "pytorchjob: ServiceAccount of the worker pods; empty: the namespace's default.")
    timeout_s: int = opt(24 * 3600, "Seconds to wait for the job to succeed before the step fails.")
    poll_s: float = opt(15.0, "Seconds between checks of the job's status.")

    def check(self) -> None:
        problems = []
        if self.backend not in BACKENDS:
            problems.append(f"backend={self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.workers < 1 or self.gpus_per_worker < 0:
            problems.append(f"workers={self.workers}, gpus_per_worker={self.gpus_per_worker}: need >= 1 worker and >= 0 GPUs")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def processes_per_worker(self) -> int:
        return max(self.gpus_per_worker, 1)


def job_name(run_id: str) -> str:
    """A DNS-1035 name for the run's job (stable: a retried launcher finds its own job)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"kubetune-ft-{run_id}".lower()).strip("-")[:52].rstrip("-")
    return name


def worker_command(*, store: str, run_id: str, model_uri: str, tokens_uri: str, publish: str, cfg: FinetuneConfig) -> list[str]:
    """What every worker runs: torchrun (sizes from the operator's PET_* variables) over the step."""
    args = ["torchrun", "-m", "kubetune.steps.finetune", "--store", store, "--run-id", run_id, "--tokens", tokens_uri,
            "--model", model_uri, "--out", "/tmp/kubetune-model", "--publish", publish]
    for name in FORWARDED:
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return args


def container(job: JobConfig, command: list[str], name: str) -> dict:
    resources = {"cpu": job.cpu_per_worker, "memory": job.memory_per_worker}
    if job.gpus_per_worker:
        resources[job.accelerator] = str(job.gpus_per_worker)
    return {
        "name": name, "image": job.image, "command": command[:1], "args": command[1:],
        "envFrom": [{"secretRef": {"name": job.s3_secret}}, {"configMapRef": {"name": job.s3_config_map}}],
        "resources": {"requests": resources, "limits": resources},
        # torch's DDP shares tensors between local processes through /dev/shm
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def pod_template(job: JobConfig, command: list[str], name: str) -> dict:
    spec = {"containers": [container(job, command, name)], "restartPolicy": "OnFailure",
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if job.gpus_per_worker:
        spec["tolerations"] = [{"key": job.accelerator, "operator": "Exists", "effect": "NoSchedule"}]
    if job.service_account:
        spec["serviceAccountName"] = job.service_account
    return {"metadata": {"labels": {"app.kubernetes.io/part-of": "kubetune", "app.kubernetes.io/component": "finetune"}},
            "spec": spec}


def render(job: JobConfig, name: str, namespace: str, command: list[str]) -> dict:
    """The PyTorchJob or TrainJob manifest."""
    group, version, kind = KINDS[job.backend].group, KINDS[job.backend].version, KINDS[job.backend].kind
    meta = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "kubetune",
                                                              "app.kubernetes.io/component": "finetune"}}
    if job.backend == "pytorchjob":
        replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod_template(job, command, "pytorch")}}
        if job.workers > 1:
            replicas["Worker"] = {"replicas": job.workers - 1, "restartPolicy": "OnFailure",
                                  "template": pod_template(job, command, "pytorch")}
        spec = {"nprocPerNode": str(job.processes_per_worker), "pytorchReplicaSpecs": replicas,
                "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3, "ttlSecondsAfterFinished": 7 * 86400}}
    else:
        # Trainer >= v2.2 (runtimePatches; v2.1's podTemplateOverrides is gone and would be pruned). A
        # patched container may only set env, volumeMounts and securityContext (no envFrom), so the S3
        # settings go into trainer.env key by key; optional like envFrom's: an absent key stays unset.
        c = container(job, command, "node")
        env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": job.s3_secret, "key": k, "optional": True}}} for k in S3_SECRET_KEYS]
        env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": job.s3_config_map, "key": k, "optional": True}}}
                for k in S3_CONFIG_KEYS]
        pod = {"containers": [{"name": "node", "volumeMounts": c["volumeMounts"]}],
               "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
               **({"tolerations": [{"key": job.accelerator, "operator": "Exists", "effect": "NoSchedule"}]}
                  if job.gpus_per_worker else {})}
        spec = {"runtimeRef": {"name": job.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"},
                "trainer": {"image": job.image, "command": c["command"], "args": c["args"], "numNodes": job.workers,
                            "numProcPerNode": job.processes_per_worker, "env": env,
                            "resourcesPerNode": c["resources"]},
                "runtimePatches": [{"manager": "kubetune.io/finetune", "trainingRuntimeSpec": {"template": {"spec": {
                    "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}]}
    return {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": meta, "spec": spec}


def job_state(obj: dict) -> tuple[str, str]:
    """("succeeded" | "failed" | "running", message) from a PyTorchJob's or TrainJob's conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Succeeded", "Complete"):
            return "succeeded", cond.get("message", "")
        if cond.get("type") == "Failed":
            return "failed", cond.get("message") or cond.get("reason", "")
    return "running", ""


# rank 0's pod, and every pod, of a job (the operators' labels)
RANK0 = {"pytorchjob": "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
         "trainjob": "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"}
PODS = {"pytorchjob": "training.kubeflow.org/job-name={name}", "trainjob": "jobset.sigs.k8s.io/jobset-name={name}"}
LAST_LINES = 20  # of the failing pod's log, in the error


class JobWatch:
    """What the launcher shows while the job runs: rank 0's new log lines and the job's progress
    status, at each poll. Reading pods needs get/list on pods and pods/log (k8s/training/rbac); without
    it the launcher says so once and only waits."""

    def __init__(self, kube: Kube, backend: str, namespace: str, name: str, poll_s: float):
        self.kube, self.backend, self.namespace, self.name = kube, backend, namespace, name
        self.window = int(max(poll_s, 1) * 2 + 10)  # seconds of log read each poll: overlaps the last read
        self.seen: set[str] = set()  # the lines of the last window (timestamped), so none is shown twice
        self.pod, self.progress, self.blind = "", None, False

    def poll(self, obj: dict) -> None:
        self._progress(obj)
        if not self.blind:
            try:
                self._stream()
            except KubeError as e:
                self.blind = True
                log(STEP, f"cannot read the workers' logs ({e}); waiting without them (RBAC: k8s/training/rbac)")

    def _progress(self, obj: dict) -> None:
        ts = (obj.get("status") or {}).get("trainerStatus") or {}
        shown = (ts.get("progressPercentage"), tuple((m["name"], m["value"]) for m in ts.get("metrics") or []))
        if not ts or shown == self.progress:
            return
        self.progress = shown
        eta = ts.get("estimatedRemainingSeconds")
        metrics = ", ".join(f"{m['name']} {m['value']}" for m in ts.get("metrics") or [])
        log(STEP, f"job progress {ts.get('progressPercentage', '?')}%" + (f", ETA {fmt_seconds(eta)}" if eta is not None else "")
            + (f", {metrics}" if metrics else ""))

    def _stream(self) -> None:
        pods = self.kube.pods(self.namespace, RANK0[self.backend].format(name=self.name))
        if not pods:
            return
        pod = pods[0]["metadata"]["name"]
        first = pod != self.pod
        self.pod = pod
        lines = self.kube.pod_log(self.namespace, pod, tail_lines=100) if first else self.kube.pod_log(self.namespace, pod,
                                                                                                         since_seconds=self.window)
        fresh = [line for line in lines if line not in self.seen]
        self.seen = set(lines)
        for line in fresh:
            log(STEP, f"[{pod}] {line.split(' ', 1)[-1]}")  # without the API's timestamp: the line has its own context

    def failure(self) -> str:
        """The failing pod's reason and last lines, for the error ("" when none can be found)."""
        try:
            pods = self.kube.pods(self.namespace, PODS[self.backend].format(name=self.name))
        except KubeError:
            return ""
        for pod in pods:
            reason = pod_failure(pod)
            if not reason:
                continue
            name = pod["metadata"]["name"]
            try:
                tail = [line.split(" ", 1)[-1] for line in self.kube.pod_log(self.namespace, name, tail_lines=LAST_LINES)]
            except KubeError:
                tail = []
            return f"pod {name}: {reason}" + ("; its last lines:\n    " + "\n    ".join(tail) if tail else "")
        return ""


def pod_failure(pod: dict) -> str:
    """Why a pod failed ("" if it did not): a container that ended with a non-zero code, or one that
    cannot start (image pull, crash loop), or the pod's own failed phase."""
    status = pod.get("status") or {}
    for c in status.get("containerStatuses") or []:
        state = c.get("state") or {}
        last = (c.get("lastState") or {}).get("terminated")
        ended = state.get("terminated") or last
        if ended and ended.get("exitCode"):
            return f"container {c['name']} {ended.get('reason') or 'Error'} (exit code {ended['exitCode']})"
        waiting = (state.get("waiting") or {}).get("reason")
        if waiting in ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError"):
            return f"container {c['name']} {waiting}: {(state.get('waiting') or {}).get('message') or ''}".rstrip(": ")
    if status.get("phase") == "Failed":
        return f"{status.get('reason') or 'Failed'}: {status.get('message') or ''}".rstrip(": ")
    return ""


def current_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def run_job(manifest: dict, backend: str, job: JobConfig, kube: Kube | None = None) -> None:
    """Applies the job (server-side apply: a retried launcher re-applies the same spec instead of
    starting a second job) and waits until it ends (kubetune.release.kube)."""
    kube = kube or connect()
    kind = KINDS[backend]
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    try:
        kube.apply(manifest, kind=kind)
    except KubeError as e:
        if "HTTP 404" in str(e):
            raise ConfigError(f"{kind.kind} is not installed in the cluster ({kind.group}/{kind.version}): install the Kubeflow "
                              f"{'Training Operator' if backend == 'pytorchjob' else 'Trainer'}, or use finetune_backend=pod") from None
        if "HTTP 403" in str(e):
            raise ConfigError(f"not allowed to create {kind.plural} in namespace {namespace}: apply k8s/training/rbac "
                              "(kubectl apply -k k8s/training) for the pipeline's ServiceAccount") from None
        raise
    log(STEP, f"applied {kind.describe(namespace, name)}: {job.workers} worker(s) x {job.processes_per_worker} process(es)")
    watch = JobWatch(kube, backend, namespace, name, job.poll_s)

    def done(obj: dict) -> bool | None:
        watch.poll(obj)  # rank 0's new lines and the progress, at every poll
        state, _ = job_state(obj)
        return True if state == "succeeded" else None if state == "failed" else False

    try:
        kube.wait(kind, namespace, name, done, timeout=job.timeout_s, interval=job.poll_s)
    except WaitTimeout as e:
        message = job_state(e.last)[1] if e.last else ""
        pod = watch.failure()
        raise JobFailed(f"{e}{': ' + message if message else ''}" + (f"; {pod}" if pod else "")
                        + f" (kubectl -n {namespace} logs -l {PODS[backend].format(name=name)})") from None
    log(STEP, f"{kind.describe(namespace, name)} succeeded")


def run_step(*, store_uri: str, run_id: str, tokens_dir: Path, model_uri: str, out_dir: Path, cfg: FinetuneConfig,
             job: JobConfig, dry_run: bool = False, kube: Kube | None = None) -> dict:
    """The pipeline's distributed fine-tune: publish tokens, run the job, fetch the model."""
    cfg.check()
    job.check()
    with step_context(f"{STEP}-launcher", store_uri=store_uri, run_id=run_id, config={"model": model_uri, **vars(job)},
                      record=not dry_run) as ctx:
        store, record = ctx.store, ctx.record
        tokens_key, model_key = record.key(STEP, "tokens"), record.key(STEP, "model")
        command = worker_command(store=store_uri, run_id=record.run_id, model_uri=model_uri, tokens_uri=store.url(tokens_key),
                                 publish=model_key, cfg=cfg)
        manifest = render(job, job_name(record.run_id), job.namespace or current_namespace(), command)
        if dry_run:
            print(json.dumps(manifest, indent=2))
            return {"manifest": manifest}
        ctx.outputs.update(job=manifest["metadata"]["name"], kind=manifest["kind"])
        if not store.is_published(model_key):  # a retried launcher whose job already finished skips the job
            store.publish_dir(tokens_dir, tokens_key)
            run_job(manifest, job.backend, job, kube)
        store.download_dir(model_key, out_dir)
        result = json.loads((out_dir / "training.json").read_text())
        ctx.outputs.update(processes=result["processes"], best_epoch=result["best_epoch"], train_samples_per_s=result["train_samples_per_s"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = step_parser("kubetune.steps.distributed", __doc__)
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the job manifest and exit")
    add_config_args(p, FinetuneConfig)
    add_config_args(p, JobConfig)
    a = p.parse_args(argv)
    job = config_from_args(JobConfig, a)
    return run_main(lambda: run_step(store_uri=a.store, run_id=a.run_id, tokens_dir=a.tokens, model_uri=a.model, out_dir=a.out,
                                     cfg=config_from_args(FinetuneConfig, a), job=job, dry_run=a.dry_run))


if __name__ == "__main__":
    sys.exit(main())
