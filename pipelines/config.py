"""Compile-time settings for running the pipeline on a cluster (typed data, no logic).

One image setting: CPU steps run `image`, the GPU fine-tune runs the same name with a `-cuda` tag
suffix (both built from images/ with the same lock). Override it with `kubetune compile --image`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.release.manifests import DEFAULT_IMAGE
from kubetune.storage.store import S3_CONFIG_KEYS, S3_SECRET_KEYS  # noqa: F401 (the pipeline's pods get these)

# the compiled pipelines' default store (`kubetune compile|upload|submit|schedule --store`): one the
# cluster reaches, not DEFAULT_STORE (kubetune.core.context), a folder on this machine
CLUSTER_STORE = "s3://kubetune"


def cuda_variant(image: str) -> str:
    """ghcr.io/x/kubetune:0.1.0 -> ghcr.io/x/kubetune:0.1.0-cuda (a digest-pinned image cannot be
    derived: pass the CUDA image explicitly then)."""
    if "@" in image:
        raise ValueError(f"image {image!r} is pinned by digest; give the CUDA trainer image explicitly")
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    return f"{name}:{tag}-cuda"


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    gpus: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    image: str = DEFAULT_IMAGE
    trainer_image: str = ""  # default: cuda_variant(image)
    s3_secret: str = "kubetune-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    s3_config_map: str = "kubetune-s3-config"  # keys AWS_ENDPOINT_URL, AWS_REGION, KUBETUNE_S3_ADDRESSING_STYLE
    git_secret: str = "kubetune-git"  # optional; keys GIT_SECRET_KEYS, for the gitops deploy target
    accelerator: str = "nvidia.com/gpu"
    retries: int = 3  # for the steps whose work is mostly network I/O
    pipeline_root: str = ""  # "" = the KFP installation's default artifact store
    resources: dict = field(default_factory=lambda: {
        "validate-plan": Resources("250m", "500m", "512Mi", "1Gi"),  # lists the input files
        "validate-piece": Resources("1", "2", "2Gi", "4Gi"),  # the checks over a piece's files; memory holds a batch
        "validate": Resources("1", "2", "2Gi", "4Gi"),
        "freshness": Resources("250m", "500m", "512Mi", "1Gi"),
        "tokenize-piece": Resources("2", "4", "2Gi", "4Gi"),  # one piece of a large dataset; memory holds one shard
        "tokenize": Resources("2", "4", "2Gi", "4Gi"),
        "finetune": Resources("4", "8", "16Gi", "32Gi", gpus=1),
        # launches a PyTorchJob/TrainJob and waits: moves the tokens and the model, trains nothing
        "finetune_distributed": Resources("500m", "1", "2Gi", "4Gi"),
        "evaluate": Resources("2", "4", "4Gi", "8Gi"),
        "export": Resources("2", "4", "4Gi", "8Gi"),
        "deploy": Resources("500m", "1", "1Gi", "2Gi"),
        "summarize": Resources("250m", "500m", "512Mi", "1Gi"),
        "batch-plan": Resources("1", "2", "2Gi", "4Gi"),
        "batch-score": Resources("4", "4", "4Gi", "8Gi"),  # ONNX Runtime uses every core it is given
        "batch-collect": Resources("250m", "1", "1Gi", "2Gi"),  # merges the shard profiles, runs the drift report
        "batch-retrain": Resources("100m", "500m", "256Mi", "512Mi"),  # compiles and submits the training pipeline
    })
    batch_parallelism: int = 8  # shard pods at a time in the batch-inference pipeline

    @property
    def gpu_image(self) -> str:
        return self.trainer_image or cuda_variant(self.image)


GIT_SECRET_KEYS = ("KUBETUNE_GIT_USERNAME", "KUBETUNE_GIT_TOKEN")  # kubetune.release.rollout.GitAuth
