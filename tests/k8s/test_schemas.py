"""Every manifest kubetune ships or renders, checked against a real schema (tests/helpers/schemas.py):
core kinds against the Kubernetes OpenAPI schemas of KUBERNETES_VERSION (kubernetes-validate,
strict), custom resources against the CRDs their projects publish (tests/k8s/crds/SOURCES.md), the
KFP platform spec against kfp-kubernetes' own protobuf schema. A renamed or misplaced field fails."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from kubetune.pipelines.config import ClusterConfig
from kubetune.release.manifests import ServingConfig, inference_service
from kubetune.release.rollout import DeployConfig, rollout_kserve
from kubetune.steps.distributed import JobConfig, render, worker_command
from kubetune.steps.finetune import FinetuneConfig
from tests.helpers import schemas
from tests.helpers.schemas import KUBERNETES_VERSION, SchemaError

pytestmark = pytest.mark.slow  # loads the Kubernetes/CRD OpenAPI schemas and compiles the pipeline: seconds a test

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# every kustomization under k8s/ (a kustomize Component is rendered through the overlays that use it)
TREES = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")
               if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization")
# the newest Kubernetes whose schemas kubernetes-validate ships: the manifests must not use a field removed since
VERSIONS = (KUBERNETES_VERSION, "1.37")


def kustomize(tree: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: k8s/ is rendered with `kubectl kustomize`")
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{tree}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def isvc(version: str = "v20261123-060109-fba4c2", **cfg) -> dict:
    return inference_service("sms-spam", version, f"s3://bucket/kubetune/models/sms-spam/{version}", "20261123-060109-fba4c2",
                             ServingConfig(**cfg))


def jobs() -> dict[str, dict]:
    cmd = worker_command(store="s3://bucket/kubetune", run_id="r1", model_uri="builtin:all-minilm-l6-v2",
                         tokens_uri="s3://bucket/kubetune/runs/r1/tokens", publish="s3://bucket/kubetune/runs/r1/model",
                         cfg=FinetuneConfig())
    out = {}
    for backend in ("pytorchjob", "trainjob"):
        for workers, gpus, sa in ((1, 0, ""), (3, 2, "kubetune-pipeline-runner")):
            job = JobConfig(backend=backend, workers=workers, gpus_per_worker=gpus, image="registry.example/kt:1-cuda", service_account=sa)
            out[f"{backend}-{workers}x{gpus}"] = render(job, "kubetune-ft-r1", "kubetune", cmd)
    return out


class RecordingKube:
    """Records what rollout_kserve applies (the exact object sent to the API server)."""

    def __init__(self):
        self.applied: list[dict] = []

    def get(self, kind, ns, name):
        live = copy.deepcopy(self.applied[-1]) if self.applied else isvc()  # a live service to canary against
        return {**live, "metadata": {**live["metadata"], "generation": len(self.applied) + 1}}

    def config_map(self, ns, name):
        return None  # KServe's default unknown: the mode comes from kserve_mode

    def apply(self, obj):
        self.applied.append(copy.deepcopy(obj))
        return {**obj, "metadata": {**obj["metadata"], "generation": len(self.applied)}}

    def wait(self, kind, ns, name, ready, *, timeout, interval):
        return {"status": {"url": "http://x"}}


def applied_canary(mode: str) -> dict:
    """The canary rollout_kserve applies in `mode` (Standard: a spec.canary entry, KServe 0.20+)."""
    kube = RecordingKube()
    rollout_kserve(isvc(version="v20261207-000000-new"), DeployConfig(target="kserve", canary_traffic_percent=10, kserve_mode=mode),
                   client=kube)
    (obj,) = kube.applied
    if mode == "Serverless":
        assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 10
    else:
        assert obj["spec"]["canary"][0]["trafficPercent"] == 10 and "canaryTrafficPercent" not in obj["spec"]["predictor"]
    return obj


def rendered_by_code() -> dict[str, dict]:
    return {"inferenceservice": isvc(), "inferenceservice-custom": isvc(image="r.example/kt@sha256:" + "a" * 64, cpu_limit="1500m",
                                                                       memory_request="768Mi", min_replicas=0),
            "inferenceservice-canary": applied_canary("Serverless"), "inferenceservice-canary-standard": applied_canary("Standard"),
            **jobs()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_every_shipped_manifest_matches_its_schema(tree, version):
    docs = kustomize(tree)
    assert docs, f"k8s/{tree} renders nothing"
    checked = [schemas.validate(d, version) for d in docs]
    assert len(checked) == len(docs)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(rendered_by_code()))
def test_every_rendered_manifest_matches_its_schema(name, version):
    doc = rendered_by_code()[name]
    assert schemas.validate(doc, version).startswith("CRD ")  # InferenceService, PyTorchJob, TrainJob: from their CRDs


def test_all_custom_resource_kinds_have_a_crd():
    kinds = {k[2] for k in schemas.crd_schemas()}
    assert {"InferenceService", "PyTorchJob", "TrainJob", "Application"} <= kinds, kinds


def test_trainjob_names_a_runtime_and_job_that_the_trainer_ships():
    """The TrainJob's runtimeRef and the job and container its runtimePatches patch must exist in
    Kubeflow Trainer's torch-distributed ClusterTrainingRuntime (tests/k8s/crds/torch_distributed.yaml),
    or the job is rejected or its patches (S3 settings, /dev/shm, GPU toleration) apply to nothing."""
    runtime = yaml.safe_load((schemas.CRD_DIR / "torch_distributed.yaml").read_text())
    for job in (jobs()["trainjob-3x2"], *[d for d in kustomize("training/trainjob") if d["kind"] == "TrainJob"]):
        assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
        assert job["spec"]["runtimeRef"]["kind"] == runtime["kind"]
        replicated = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        (patch,) = job["spec"]["runtimePatches"]
        for target in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            assert target["name"] in replicated, f"patches job {target['name']!r}; the runtime has {sorted(replicated)}"
            have = {c["name"] for c in replicated[target["name"]]["template"]["spec"]["template"]["spec"]["containers"]}
            patched = {c["name"] for c in target["template"]["spec"]["template"]["spec"]["containers"]}
            assert patched <= have, f"patches containers {patched}; the runtime's job has {have}"


def test_trainjob_env_has_the_s3_keys_the_pipeline_uses():
    from kubetune.pipelines.config import S3_CONFIG_KEYS, S3_SECRET_KEYS

    env = {e["name"]: e["valueFrom"] for e in jobs()["trainjob-1x0"]["spec"]["trainer"]["env"]}
    assert set(env) == set(S3_SECRET_KEYS) | set(S3_CONFIG_KEYS)
    assert {k for k, v in env.items() if "secretKeyRef" in v} == set(S3_SECRET_KEYS)


# ---- the compiled pipeline: KFP's platform spec (kfp-kubernetes) and the pod settings in it -----


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    from kfp import compiler

    from kubetune.pipelines.batch import build_batch_pipeline
    from kubetune.pipelines.training import build_training_pipeline

    docs = []
    for build in (build_training_pipeline, build_batch_pipeline):
        path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
        compiler.Compiler().compile(build(ClusterConfig(image="registry.example/kt:1.2")), str(path))
        docs.append(list(yaml.safe_load_all(path.read_text())))
    return docs


def test_pipeline_spec_and_platform_spec_match_the_kfp_protos(compiled):
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    for spec, platform in compiled:
        json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise ParseError
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        assert executors
        for name, cfg in executors.items():
            json_format.ParseDict(cfg, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
            assert cfg["secretAsEnv"] and cfg["configMapAsEnv"], name


def test_pod_settings_in_the_platform_spec_are_valid_kubernetes(compiled):
    """What the KFP backend copies into the pods: tolerations as core/v1 Tolerations, and the
    Secret/ConfigMap keys and env names as Kubernetes accepts them."""
    registry = schemas._registry(KUBERNETES_VERSION)
    import jsonschema

    def check(definition: str, value) -> None:
        ref = {"$ref": f"/api/_definitions.json#/$defs/io.k8s.api.core.v1.{definition}", "$id": "https://kubernetes.io/api/x"}
        jsonschema.Draft202012Validator(ref, registry=registry).validate(value)

    tolerations = 0
    for _, platform in compiled:
        for cfg in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
            for t in cfg.get("tolerations", []):
                check("Toleration", t)
                tolerations += 1
            for source in cfg["secretAsEnv"] + cfg["configMapAsEnv"]:
                for kv in source["keyToEnv"]:
                    key = kv.get("secretKey") or kv.get("configMapKey")
                    check("EnvVar", {"name": kv["envVar"], "valueFrom": {"secretKeyRef": {"name": "x", "key": key}}})
    assert tolerations >= 1  # the GPU fine-tune's


# ---- negative: the checks catch what a cluster would silently drop or reject -------------------


def mutate(doc: dict, path: str, new_key: str | None = None, move_to: str | None = None) -> dict:
    """A copy of `doc` with the field at dotted `path` (list indexes as numbers) renamed to
    `new_key`, or moved into the object at `move_to`."""
    doc = copy.deepcopy(doc)

    def walk(p: str):
        node = doc
        parts = p.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    parent, key = walk(path)
    value = parent.pop(key)
    if new_key:
        parent[new_key] = value
    else:
        node = doc
        for part in move_to.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[key] = value
    return doc


PATCHED_POD = "spec.runtimePatches.0.trainingRuntimeSpec.template.spec.replicatedJobs.0.template.spec.template.spec"
BROKEN = {
    # renamed fields
    "isvc readinessProbe -> readinessprobe": ("inferenceservice", "spec.predictor.containers.0.readinessProbe", "readinessprobe", None),
    "isvc canaryTrafficPercent -> canaryTrafficPercentage": ("inferenceservice-canary", "spec.predictor.canaryTrafficPercent",
                                                            "canaryTrafficPercentage", None),
    "pytorchjob nprocPerNode -> nProcPerNode": ("pytorchjob-3x2", "spec.nprocPerNode", "nProcPerNode", None),
    "trainjob numProcPerNode -> nprocPerNode": ("trainjob-3x2", "spec.trainer.numProcPerNode", "nprocPerNode", None),
    # misplaced fields
    "isvc serviceAccountName in the container": ("inferenceservice", "spec.predictor.serviceAccountName", None,
                                                 "spec.predictor.containers.0"),
    "isvc runAsNonRoot on the predictor": ("inferenceservice", "spec.predictor.containers.0.securityContext.runAsNonRoot", None,
                                           "spec.predictor"),
    "pytorchjob runPolicy under a replica": ("pytorchjob-1x0", "spec.runPolicy", None, "spec.pytorchReplicaSpecs.Master"),
    "trainjob tolerations on the container": ("trainjob-3x2", PATCHED_POD + ".tolerations", None, PATCHED_POD + ".containers.0"),
    "trainjob runtimePatches -> podTemplateOverrides (Trainer v2.1)": ("trainjob-3x2", "spec.runtimePatches", "podTemplateOverrides",
                                                                       None),
    "pytorchjob envFrom on the pod": ("pytorchjob-1x0", "spec.pytorchReplicaSpecs.Master.template.spec.containers.0.envFrom",
                                                None, "spec.pytorchReplicaSpecs.Master.template.spec"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_renamed_or_misplaced_field_fails(case):
    name, path, new_key, move_to = BROKEN[case]
    good = rendered_by_code()[name]
    schemas.validate(good)
    with pytest.raises(SchemaError, match="does not match its CRD schema"):
        schemas.validate(mutate(good, path, new_key, move_to))


@pytest.mark.parametrize("tree, kind, path, new_key, move_to", [
    ("base", "CronJob", "spec.concurrencyPolicy", None, "spec.jobTemplate.spec"),
    ("base", "CronJob", "spec.jobTemplate.spec.template.spec.serviceAccountName", "serviceAccount_name", None),
    ("base", "RoleBinding", "roleRef", "roleref", None),
    ("overlays/dev", "Deployment", "spec.template.spec.containers.0.securityContext", None, "spec.template.spec"),
    ("argocd", "Application", "spec.syncPolicy", None, "spec.source"),
    ("argocd", "Application", "spec.destination.namespace", "namspace", None),
])
def test_a_broken_shipped_manifest_fails(tree, kind, path, new_key, move_to):
    (doc,) = [d for d in kustomize(tree) if d["kind"] == kind][:1]
    schemas.validate(doc)
    with pytest.raises(SchemaError, match="does not match"):
        schemas.validate(mutate(doc, path, new_key, move_to))


def test_a_wrong_type_or_quantity_fails():
    bad = isvc()
    bad["spec"]["predictor"]["containers"][0]["resources"]["limits"]["memory"] = "2 GB"  # not a Kubernetes quantity
    with pytest.raises(SchemaError, match="resources/limits/memory"):
        schemas.validate(bad)
    bad = isvc()
    bad["spec"]["predictor"]["minReplicas"] = "1"
    with pytest.raises(SchemaError, match="minReplicas"):
        schemas.validate(bad)


def test_an_unknown_kind_has_no_schema():
    with pytest.raises(SchemaError, match="no schema for example.com/v1 Widget"):
        schemas.validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_the_fake_api_server_rejects_what_the_crd_rejects(tmp_path):
    """tests/helpers/fake_kube.py checks every applied object like this module does, so the deploy
    and launcher tests that apply through it also apply only valid objects."""
    from kubetune.release import kube
    from tests.helpers import fake_kube

    with fake_kube.FakeKube() as fake:
        client = kube.connect(str(fake.kubeconfig(tmp_path / "kubeconfig")))
        assert client.apply(isvc())["metadata"]["generation"] == 1
        with pytest.raises(kube.KubeError, match="HTTP 422"):
            client.apply(mutate(isvc(), "spec.predictor.minReplicas", "minreplicas"))
