"""k8s/base renders with kustomize and provides what the pipeline (pipelines/config.py) and the
rendered InferenceService (components/manifests.py) expect to find in the cluster."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from components.manifests import ServingConfig
from components.store import S3Settings
from pipelines.config import S3_CONFIG_KEYS, S3_SECRET_KEYS, ClusterConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "k8s" / "base"
NAMESPACE = ServingConfig.namespace  # where the InferenceService goes by default
CLUSTER = ClusterConfig()
RUNNER = "kubetune-pipeline-runner"
PLACEHOLDERS = {"REPLACE_ME", ""}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl not installed: k8s/base is rendered with `kubectl kustomize`")


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {BASE} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "k8s/base renders to nothing"
    return docs


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
    assert set(keys) == set(S3_SECRET_KEYS), f"Secret keys {sorted(keys)} != pipelines.config.S3_SECRET_KEYS"
    real = [k for k, v in keys.items() if str(v) not in PLACEHOLDERS]
    assert not real, f"Secret {CLUSTER.s3_secret} holds non-placeholder values for {real}: never commit real keys"


def test_s3_config_map_has_the_pipeline_keys_and_valid_values(rendered):
    data = find(rendered, "ConfigMap", CLUSTER.s3_config_map).get("data") or {}
    assert set(data) == set(S3_CONFIG_KEYS), f"ConfigMap keys {sorted(data)} != pipelines.config.S3_CONFIG_KEYS"
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
