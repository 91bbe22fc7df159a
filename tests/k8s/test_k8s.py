"""k8s/ renders with kustomize (base, every overlay, the Argo CD Application) and provides what the
pipeline (pipelines/config.py), the deploy targets (components/rollout.py) and the rendered
InferenceService (components/manifests.py) expect to find in the cluster, with least-privilege
RBAC and locked-down containers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from kubetune.pipelines.config import S3_CONFIG_KEYS, S3_SECRET_KEYS, ClusterConfig
from kubetune.release.manifests import ServingConfig, inference_service
from kubetune.release.rollout import DeployConfig
from kubetune.storage.store import S3Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
TREES = ("base", "overlays/dev", "overlays/prod")
NAMESPACE = ServingConfig.namespace  # where the InferenceService goes by default
CLUSTER = ClusterConfig()
RUNNER = "kubetune-pipeline-runner"
PLACEHOLDERS = {"REPLACE_ME", ""}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl not installed: k8s/base is rendered with `kubectl kustomize`")


def render(tree: str) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(K8S / tree)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{tree} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"k8s/{tree} renders to nothing"
    return docs


@pytest.fixture(scope="module", params=TREES)
def rendered(request) -> list[dict]:
    return render(request.param)


@pytest.fixture(scope="module")
def dev() -> list[dict]:
    return render("overlays/dev")


@pytest.fixture(scope="module")
def prod() -> list[dict]:
    return render("overlays/prod")


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return hits[0]


def secret_keys(secret: dict) -> dict:
    return {**(secret.get("data") or {}), **(secret.get("stringData") or {})}


def test_namespace_and_every_object_in_it(rendered):
    find(rendered, "Namespace", NAMESPACE)
    outside = [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in rendered
               if d["kind"] != "Namespace" and d["metadata"].get("namespace") != NAMESPACE]
    assert not outside, f"objects outside namespace {NAMESPACE}: {outside}"
    unlabelled = [(d["kind"], d["metadata"]["name"]) for d in rendered
                  if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/part-of") != "kubetune"]
    assert not unlabelled, f"objects without app.kubernetes.io/part-of=kubetune: {unlabelled}"


def test_s3_secret_is_a_template_with_the_pipeline_keys(rendered):
    secret = find(rendered, "Secret", CLUSTER.s3_secret)
    assert secret.get("type") == "Opaque"
    keys = secret_keys(secret)
    assert set(keys) == set(S3_SECRET_KEYS), f"Secret keys {sorted(keys)} != kubetune.pipelines.config.S3_SECRET_KEYS"
    real = [k for k, v in keys.items() if str(v) not in PLACEHOLDERS]
    assert not real, f"Secret {CLUSTER.s3_secret} holds non-placeholder values for {real}: never commit real keys"


def test_s3_config_map_has_the_pipeline_keys_and_valid_values(rendered):
    data = find(rendered, "ConfigMap", CLUSTER.s3_config_map).get("data") or {}
    assert set(data) == set(S3_CONFIG_KEYS), f"ConfigMap keys {sorted(data)} != kubetune.pipelines.config.S3_CONFIG_KEYS"
    settings = S3Settings.from_env(data)  # what every step reads; raises on a bad addressing style
    assert settings.endpoint_url == data["AWS_ENDPOINT_URL"]
    assert urlsplit(settings.endpoint_url).scheme in ("http", "https"), "AWS_ENDPOINT_URL needs http:// or https://"


def test_kserve_annotations_match_the_config_map(rendered):
    """KServe's storage initializer reads the endpoint from the Secret's annotations, the steps from the
    ConfigMap: both must name the same server, or serving downloads from somewhere else."""
    ann = find(rendered, "Secret", CLUSTER.s3_secret)["metadata"].get("annotations") or {}
    data = find(rendered, "ConfigMap", CLUSTER.s3_config_map)["data"]
    url = urlsplit(data["AWS_ENDPOINT_URL"])
    assert ann.get("serving.kserve.io/s3-endpoint") == url.netloc, "s3-endpoint must be AWS_ENDPOINT_URL without scheme"
    assert ann.get("serving.kserve.io/s3-usehttps") == ("1" if url.scheme == "https" else "0")
    assert ann.get("serving.kserve.io/s3-region") == data["AWS_REGION"]
    if "serving.kserve.io/s3-usevirtualbucket" in ann:
        virtual = data["KUBETUNE_S3_ADDRESSING_STYLE"] == "virtual"
        assert ann["serving.kserve.io/s3-usevirtualbucket"] in (("1", "true") if virtual else ("0", "false"))


def test_serving_service_account_carries_the_s3_secret(rendered):
    sa = find(rendered, "ServiceAccount", ServingConfig.service_account)
    assert {"name": CLUSTER.s3_secret} in (sa.get("secrets") or []), \
        f"ServiceAccount {ServingConfig.service_account} does not list Secret {CLUSTER.s3_secret} (KServe finds S3 credentials there)"


def test_pipeline_runner_role_is_get_only_on_the_named_objects(rendered):
    find(rendered, "ServiceAccount", RUNNER)
    role = find(rendered, "Role", RUNNER)
    rules = role.get("rules") or []
    assert rules, "Role has no rules"
    allowed = {"secrets": {CLUSTER.s3_secret}, "configmaps": {CLUSTER.s3_config_map}}
    granted = {}
    for rule in rules:
        assert rule.get("verbs") == ["get"], f"Role grants more than get: {rule}"
        assert rule.get("apiGroups") == [""], f"Role reaches beyond the core API group: {rule}"
        assert rule.get("resourceNames"), f"Role rule not limited by resourceNames: {rule}"
        for resource in rule.get("resources") or []:
            assert resource in allowed, f"Role grants {resource}"
            assert set(rule["resourceNames"]) <= allowed[resource], f"Role grants {resource} {rule['resourceNames']}"
            granted.setdefault(resource, set()).update(rule["resourceNames"])
    assert granted == allowed, f"Role grants {granted}, the pipeline needs {allowed}"
    assert not [d for d in rendered if d["kind"] in ("ClusterRole", "ClusterRoleBinding")], "cluster-wide RBAC in the base"
    binding = find(rendered, "RoleBinding", RUNNER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": RUNNER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RUNNER, "namespace": NAMESPACE}]


# ---- deployer RBAC, workloads, overlays, Argo CD ------------------------------------------------


def test_deployer_may_only_get_create_patch_inferenceservices(rendered):
    find(rendered, "ServiceAccount", "kubetune-deployer")
    role = find(rendered, "Role", "kubetune-deployer")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "create", "patch"]}]
    binding = find(rendered, "RoleBinding", "kubetune-deployer")
    assert binding["roleRef"]["kind"] == "Role"  # namespaced, never a ClusterRole
    # the deploy step runs under the pipeline run's ServiceAccount
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {("kubetune-deployer", NAMESPACE), (RUNNER, NAMESPACE)}


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(workload, pod spec) for every Deployment, Job, CronJob and InferenceService predictor."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "Job"):
            out.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            out.append((name, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif d["kind"] == "InferenceService":
            out.append((name, d["spec"]["predictor"]))
    return out


def test_every_container_is_locked_down_and_pinned(rendered):
    specs = pod_specs(rendered)
    assert specs, "no workloads rendered"
    for workload, spec in specs:
        for c in spec["containers"]:
            sc = c.get("securityContext") or {}
            where = f"{workload} container {c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: image {image} not pinned"
            assert c.get("resources", {}).get("limits"), f"{where}: no resource limits"
            mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
            assert "/tmp" in mounts, f"{where}: read-only root filesystem but no writable /tmp"


def test_retraining_schedule_never_overlaps_or_catches_up(rendered, prod):
    cron = find(rendered, "CronJob", "kubetune-retraining")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and 0 < cron["startingDeadlineSeconds"] <= 3600
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["kubetune", "submit"] and any(a.startswith("--host=") for a in c["args"])
    assert pod["serviceAccountName"] == "kubetune-scheduler"
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    role = find(rendered, "Role", "kubetune-scheduler")
    assert all(r["apiGroups"] == ["pipelines.kubeflow.org"] and "delete" not in r["verbs"] for r in role["rules"])
    assert find(prod, "CronJob", "kubetune-retraining")["spec"]["suspend"] is False  # prod runs it
    assert cron["suspend"] is (rendered != prod)  # base and dev do not


def test_dev_overlay_brings_minio_and_points_s3_at_it(dev):
    minio = find(dev, "Deployment", "minio")
    service = find(dev, "Service", "minio")
    job = find(dev, "Job", "minio-bucket-init")
    assert service["spec"]["selector"] == minio["spec"]["selector"]["matchLabels"]
    assert minio["spec"]["template"]["spec"]["containers"][0]["image"].startswith("quay.io/minio/minio:RELEASE.")
    endpoint = find(dev, "ConfigMap", CLUSTER.s3_config_map)["data"]["AWS_ENDPOINT_URL"]
    assert endpoint == f"http://{service['metadata']['name']}.{NAMESPACE}:9000"
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert endpoint in script and "mb --ignore-existing local/kubetune" in script
    # MinIO and everything else share the one S3 Secret
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {r["name"] for r in env.values()} == {CLUSTER.s3_secret}


def test_inferenceservice_template_is_what_deploy_renders(dev, prod):
    isvc = find(dev, "InferenceService", "sms-spam")
    version = isvc["metadata"]["annotations"]["kubetune.io/model-version"]
    storage = next(e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"] if e["name"] == "STORAGE_URI")
    expected = inference_service("sms-spam", version, storage, "template", ServingConfig())
    assert isvc["spec"] == expected["spec"], "k8s/components/inferenceservice drifted from components/manifests.py"
    probes = isvc["spec"]["predictor"]["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/v1/models/sms-spam" and probes["livenessProbe"]["httpGet"]
    assert not [d for d in prod if d["kind"] == "InferenceService"], "prod: the deploy step or Argo CD owns the InferenceService"


def test_argocd_application_watches_the_gitops_folder():
    (app,) = render("argocd")
    assert app["kind"] == "Application" and app["metadata"]["namespace"] == "argocd"
    assert app["spec"]["source"]["path"] == DeployConfig.gitops_path
    assert app["spec"]["source"]["targetRevision"] == DeployConfig.gitops_branch
    assert app["spec"]["destination"]["namespace"] == NAMESPACE
    assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
