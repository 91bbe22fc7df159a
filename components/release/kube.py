"""Kubernetes API helpers on the official `kubernetes` Python client: connect (in-cluster or
kubeconfig), server-side apply, get, and wait for a status condition. Used by the KServe deploy
target (components/rollout.py); generic over custom resources (InferenceService,
PyTorchJob, ...), addressed by a `Kind` (group, version, plural).

    python -c "from components import kube; print(kube.connect().get(kube.INFERENCE_SERVICE, 'kubetune', 'sms-spam'))"

Connection: inside a pod the ServiceAccount token (KUBERNETES_SERVICE_HOST is set), else the
kubeconfig (`$KUBECONFIG` or ~/.kube/config, optionally a named context). Server-side apply with
a fixed field manager: re-applying the same manifest is a no-op, and fields owned by other
managers (e.g. an HPA's replicas) are left alone unless they conflict, which `force` resolves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import urllib3

from kubetune.errors import KubetuneError

FIELD_MANAGER = "kubetune"


class KubeError(KubetuneError):
    """The Kubernetes API refused or failed a request (names the object and the API's message)."""


class WaitTimeout(KubeError):
    """An object did not reach the wanted condition in time (carries its last seen status)."""

    def __init__(self, message: str, last: dict | None):
        super().__init__(message)
        self.last = last


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str

    def describe(self, namespace: str, name: str) -> str:
        return f"{self.kind} {namespace}/{name}"


INFERENCE_SERVICE = Kind("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")


def kind_of(obj: dict) -> Kind:
    group, _, version = obj["apiVersion"].rpartition("/")
    if obj["kind"] == INFERENCE_SERVICE.kind and group == INFERENCE_SERVICE.group:
        return INFERENCE_SERVICE
    return Kind(group, version, obj["kind"].lower() + "s", obj["kind"])  # the usual plural; pass a Kind when irregular


def _message(e) -> str:
    """The API server's own reason (its Status.message), not the client's wall of headers."""
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return f"{getattr(e, 'status', '')} {getattr(e, 'reason', e)}"


def _unreachable(e: Exception, what: str) -> KubeError:
    return KubeError(f"{what}: the Kubernetes API is unreachable: {type(e).__name__}: {e}")


class Kube:
    """A thin facade over CustomObjectsApi: one place that turns ApiExceptions into KubeErrors."""

    def __init__(self, api_client):
        from kubernetes import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)

    def get(self, kind: Kind, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise KubeError(f"get {kind.describe(namespace, name)}: {_message(e)} (HTTP {e.status})") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise _unreachable(e, f"get {kind.describe(namespace, name)}") from None

    def config_map(self, namespace: str, name: str) -> dict | None:
        """A ConfigMap's data, or None when it does not exist or this ServiceAccount may not read it."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            return client.CoreV1Api(self.api_client).read_namespaced_config_map(name, namespace).data or {}
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise KubeError(f"get ConfigMap {namespace}/{name}: {_message(e)} (HTTP {e.status})") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise _unreachable(e, f"get ConfigMap {namespace}/{name}") from None

    def pods(self, namespace: str, selector: str) -> list[dict]:
        """The pods matching a label selector, as plain dicts (oldest first)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            items = client.CoreV1Api(self.api_client).list_namespaced_pod(namespace, label_selector=selector).items
        except ApiException as e:
            raise KubeError(f"list pods {namespace} -l {selector}: {_message(e)} (HTTP {e.status})") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise _unreachable(e, f"list pods {namespace} -l {selector}") from None
        pods = [self.api_client.sanitize_for_serialization(p) for p in items]
        return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def pod_log(self, namespace: str, name: str, *, since_seconds: int | None = None, tail_lines: int | None = None) -> list[str]:
        """A pod's log lines, each prefixed by its RFC 3339 timestamp (the API's timestamps=true)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        kw = {k: v for k, v in (("since_seconds", since_seconds), ("tail_lines", tail_lines)) if v}
        try:
            text = client.CoreV1Api(self.api_client).read_namespaced_pod_log(name, namespace, timestamps=True, **kw)
        except ApiException as e:
            raise KubeError(f"logs of pod {namespace}/{name}: {_message(e)} (HTTP {e.status})") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise _unreachable(e, f"logs of pod {namespace}/{name}") from None
        return [line for line in (text or "").splitlines() if line.strip()]

    def apply(self, obj: dict, *, kind: Kind | None = None, force: bool = True) -> dict:
        """Server-side apply of a full manifest: PATCH with application/apply-patch+yaml (JSON is
        YAML; the client JSON-encodes it). Through ApiClient.call_api: CustomObjectsApi only sends merge patches."""
        from kubernetes.client.exceptions import ApiException

        kind = kind or kind_of(obj)
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            return self.api_client.call_api(
                f"/apis/{kind.group}/{kind.version}/namespaces/{ns}/{kind.plural}/{name}", "PATCH",
                # Strict: a field the cluster's CRD does not know is an error, not silently pruned (e.g. spec.canary before KServe 0.20)
                query_params=[("fieldManager", FIELD_MANAGER), ("force", "true" if force else "false"), ("fieldValidation", "Strict")],
                header_params={"Accept": "application/json", "Content-Type": "application/apply-patch+yaml"},
                body=obj, response_type="object", auth_settings=["BearerToken"],
                _return_http_data_only=True, _preload_content=True)
        except ApiException as e:
            hint = " (does the ServiceAccount have RBAC to patch it? see k8s/base/deployer-rbac.yaml)" if e.status == 403 else ""
            raise KubeError(f"apply {kind.describe(ns, name)}: {_message(e)} (HTTP {e.status}){hint}") from None
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise _unreachable(e, f"apply {kind.describe(ns, name)}") from None

    def wait(self, kind: Kind, namespace: str, name: str, ready: Callable[[dict], bool | None], *,
             timeout: float, interval: float = 5.0) -> dict:
        """Poll until `ready(obj)` is True; it returns False to keep waiting and None when the
        object has failed for good (stop early). Polling, not a watch: it survives API server
        restarts and needs only `get` RBAC."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.get(kind, namespace, name)
            verdict = ready(last) if last is not None else False
            if verdict:
                return last
            if verdict is None:
                raise WaitTimeout(f"{kind.describe(namespace, name)} failed: {condition_summary(last)}", last)
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{kind.describe(namespace, name)} not ready after {timeout:.0f}s: {condition_summary(last)}", last)
            time.sleep(interval)


def connect(kubeconfig: str = "", context: str = "") -> Kube:
    """In-cluster config inside a pod, else the kubeconfig. Never touches the client's global
    default configuration, so two clients (tests, several clusters) do not interfere."""
    import os

    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if not kubeconfig and not context and os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return Kube(client.ApiClient(cfg))
        return Kube(config.new_client_from_config(config_file=kubeconfig or None, context=context or None))
    except ConfigException as e:
        raise KubeError(f"no Kubernetes access: {e} (run in a pod with a ServiceAccount, or set KUBECONFIG / --kubeconfig)") from None


def conditions(obj: dict | None) -> dict[str, dict]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def condition_summary(obj: dict | None) -> str:
    if obj is None:
        return "object not found"
    conds = conditions(obj)
    if not conds:
        return "no status conditions yet"
    return "; ".join(f"{t}={c.get('status')}" + (f" ({c.get('reason') or ''}: {c.get('message') or ''})" if c.get("status") != "True" else "")
                     for t, c in conds.items())


def is_ready(obj: dict, generation: int | None = None) -> bool:
    """Ready=True for the spec we applied: a Ready condition of an older generation (the
    previous revision still serving) does not count."""
    observed = (obj.get("status") or {}).get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return False
    return conditions(obj).get("Ready", {}).get("status") == "True"


def strip_server_fields(obj: dict) -> dict:
    """A live object reduced to what can be applied again: spec, labels and annotations."""
    meta = obj["metadata"]
    keep = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if meta.get(k)}
    keep["annotations"] = {k: v for k, v in (keep.get("annotations") or {}).items()
                           if k != "kubectl.kubernetes.io/last-applied-configuration"}
    if not keep["annotations"]:
        del keep["annotations"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": keep, "spec": obj.get("spec", {})}
