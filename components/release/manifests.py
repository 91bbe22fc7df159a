"""Kubernetes manifests rendered from a registry version (no cluster access here: plain data)."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from kubetune.core.config import opt, param

# the project's CPU image: every CPU step and the predictor of the rendered InferenceService
DEFAULT_IMAGE = "ghcr.io/kubetune/kubetune:0.1.0"


@dataclass(frozen=True)
class ServingConfig:
    namespace: str = param("kubetune", "Namespace of the rendered KServe InferenceService.")
    image: str = param(DEFAULT_IMAGE, "Image of the predictor container in the rendered InferenceService.",
                       name="serving_image")
    service_account: str = opt("kubetune-serving", "ServiceAccount of the predictor pods; it carries the S3 credentials for "
                                                   "KServe's storage initializer.")
    cpu_request: str = opt("500m", "CPU request of the predictor container.")
    cpu_limit: str = opt("2", "CPU limit of the predictor container.")
    memory_request: str = opt("1Gi", "Memory request of the predictor container.")
    memory_limit: str = opt("2Gi", "Memory limit of the predictor container.")
    min_replicas: int = opt(1, "Fewest predictor replicas (the InferenceService's minReplicas).")
    max_replicas: int = opt(3, "Most predictor replicas the autoscaler may run (maxReplicas).")


def inference_service(name: str, version: str, storage_uri: str, run_id: str, cfg: ServingConfig) -> dict:
    """A KServe v1beta1 InferenceService with kubetune's custom predictor: KServe's storage
    initializer copies `storage_uri` to /mnt/models, and the container serves raw text in,
    labels out (`kubetune serve`)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "kubetune"},
            "annotations": {"kubetune.io/model-version": version, "kubetune.io/run-id": run_id},
        },
        "spec": {
            "predictor": {
                "serviceAccountName": cfg.service_account,
                "minReplicas": cfg.min_replicas,
                "maxReplicas": cfg.max_replicas,
                "containers": [
                    {
                        "name": "kserve-container",
                        "image": cfg.image,
                        "command": ["kubetune", "serve"],
                        "args": ["--model", "/mnt/models", "--name", name, "--host", "0.0.0.0", "--port", "8080"],  # a pod: every interface
                        "env": [{"name": "STORAGE_URI", "value": storage_uri}],
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "resources": {
                            "requests": {"cpu": cfg.cpu_request, "memory": cfg.memory_request},
                            "limits": {"cpu": cfg.cpu_limit, "memory": cfg.memory_limit},
                        },
                        "securityContext": {
                            "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        # KServe ModelServer endpoints: ready once the model is loaded, alive while the process answers
                        "readinessProbe": {"httpGet": {"path": f"/v1/models/{name}", "port": 8080},
                                           "initialDelaySeconds": 5, "periodSeconds": 10, "failureThreshold": 3},
                        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": 8080},
                                          "initialDelaySeconds": 30, "periodSeconds": 20, "failureThreshold": 3},
                        # the root filesystem is read-only: scratch space for the runtime (tokenizer caches, temp files)
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
            }
        },
    }


def to_yaml(obj: dict) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
