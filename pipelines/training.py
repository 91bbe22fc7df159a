"""The training pipeline: validate -> freshness -> [data changed] tokenize -> finetune -> evaluate -> [gate] -> export -> deploy,
with a summary written by an exit handler whatever happens. Pure wiring plus cluster settings.

    kubetune compile --output kubetune-training.yaml     # upload in the Kubeflow UI
    kubetune run                                          # the same pipeline under kfp.local
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as real types
from kfp import dsl, kubernetes

from kubetune.steps.distributed import JobConfig
from kubetune.steps.evaluate import GateConfig
from kubetune.steps.export import ExportConfig
from kubetune.steps.finetune import FinetuneConfig
from kubetune.release.manifests import ServingConfig
from kubetune.release.rollout import DeployConfig
from kubetune.steps.tokenize import TokenizeConfig
from kubetune.steps.validate import ValidateConfig
from kubetune.pipelines.components import make_components
from kubetune.pipelines.config import GIT_SECRET_KEYS, S3_CONFIG_KEYS, S3_SECRET_KEYS, ClusterConfig

PIPELINE_NAME = "kubetune-training"
# Retried on failure: their work is mostly store I/O (cache, champion download, registry publish).
# Not validate: its failures are input errors that a retry only delays (boto3 already retries
# transient S3 errors within a call); not export: deterministic failures.
NETWORK_STEPS = ("freshness", "tokenize", "evaluate", "deploy", "summarize", "batch-plan", "batch-score", "batch-collect")
# Retried because a retry resumes from the store checkpoint (a lost node costs minutes, not the run);
# their deterministic failures (bad options, labels) fail within seconds, before any training.
RESUMABLE_STEPS = ("finetune", "finetune_distributed")


def configure(task, step: str, cluster: ClusterConfig) -> None:
    """Resources, GPU, retries, S3 settings from the Secret/ConfigMap, no KFP caching (every step
    writes run records, which a cached task would skip)."""
    res = cluster.resources[step]
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if res.gpus:
        task.set_accelerator_type(cluster.accelerator).set_accelerator_limit(res.gpus)
        kubernetes.add_toleration(task, key=cluster.accelerator, operator="Exists", effect="NoSchedule")
    if (step in NETWORK_STEPS or step in RESUMABLE_STEPS) and cluster.retries:
        task.set_retry(num_retries=cluster.retries, backoff_duration="30s", backoff_factor=2.0, backoff_max_duration="300s")
    task.set_caching_options(False)
    kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env={k: k for k in S3_SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, config_map_name=cluster.s3_config_map, config_map_key_to_env={k: k for k in S3_CONFIG_KEYS})
    if step == "deploy":  # credentials of the gitops target; optional: the other targets need none
        kubernetes.use_secret_as_env(task, secret_name=cluster.git_secret, secret_key_to_env={k: k for k in GIT_SECRET_KEYS}, optional=True)


def build_training_pipeline(cluster: ClusterConfig | None = None, default_store: str = "s3://kubetune"):
    cluster = cluster or ClusterConfig()
    ops = make_components(cluster)

    @dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a Hugging Face text or NER classifier, gate it, export it to ONNX and publish it.",
                  pipeline_root=cluster.pipeline_root or None)
    def training(
        task: str = ValidateConfig.task,
        train_uri: str = "builtin:sms-spam",
        eval_uri: str = "",
        test_uri: str = "",
        text_column: str = ValidateConfig.text_column,
        label_column: str = ValidateConfig.label_column,
        header: bool = ValidateConfig.header,
        tag_column: int = ValidateConfig.tag_column,
        repair_tags: bool = ValidateConfig.repair_tags,
        model_uri: str = "builtin:all-minilm-l6-v2",
        model_name: str = "sms-spam",
        store: str = default_store,
        run_id: str = "",
        limit: int = ValidateConfig.limit,
        seed: int = ValidateConfig.seed,
        eval_fraction: float = ValidateConfig.eval_fraction,
        test_fraction: float = ValidateConfig.test_fraction,
        max_length: int = TokenizeConfig.max_length,
        epochs: int = FinetuneConfig.epochs,
        batch_size: int = FinetuneConfig.batch_size,
        learning_rate: float = FinetuneConfig.learning_rate,
        finetune_backend: str = "pod",
        finetune_workers: int = JobConfig.workers,
        finetune_gpus_per_worker: int = JobConfig.gpus_per_worker,
        gate_metric: str = GateConfig.metric,
        gate_threshold: float = GateConfig.threshold,
        gate_tolerance: float = GateConfig.tolerance,
        onnx_variants: str = ExportConfig.variants,
        namespace: str = ServingConfig.namespace,
        serving_image: str = cluster.image,
        force: bool = False,
        deploy_target: str = DeployConfig.target,
        canary_traffic_percent: int = DeployConfig.canary_traffic_percent,
        gitops_repo: str = DeployConfig.gitops_repo,
        gitops_branch: str = DeployConfig.gitops_branch,
        gitops_path: str = DeployConfig.gitops_path,
    ):
        """Fine-tune, gate, export and publish a text classifier.

        Args:
            task: sequence-classification (a label per text) or token-classification (NER: an IOB2 tag per word).
            train_uri: Training data at s3://bucket/key: CSV, TSV, JSONL, Parquet or builtin:sms-spam; NER: CoNLL, JSONL or builtin:conll2003.
            eval_uri: Optional eval file; empty = split eval_fraction off the training data.
            test_uri: Optional test file; empty = split test_fraction off the training data.
            text_column: Column (field) holding the text.
            label_column: Column (field) holding the label.
            header: Whether CSV/TSV files start with a header row (else columns are named 0, 1, ...).
            tag_column: token-classification, CoNLL files: the column holding the tag (0-based; -1 = the last).
            repair_tags: token-classification: an I-<type> that continues nothing becomes B-<type> instead of an error.
            model_uri: Pretrained transformers model folder (s3:// prefix) or builtin:all-minilm-l6-v2.
            model_name: Registry name; also the InferenceService name (lowercase, digits, '-').
            store: Artifact store for run records, the tokenization cache and the model registry (s3://bucket/prefix).
            run_id: Leave empty to use the KFP run id.
            limit: Use at most this many rows per input file (seeded stratified sample); 0 = all.
            seed: Seed for splitting, sampling and training.
            eval_fraction: Share of training rows held out for eval when no eval file is given.
            test_fraction: Share of training rows held out for test when no test file is given.
            max_length: Truncate texts to this many tokens.
            epochs: Training epochs (the best epoch on eval is kept; early stopping after 2 without gain).
            batch_size: Training batch size.
            learning_rate: Peak AdamW learning rate (linear warm-up over 10% of steps, then linear decay).
            finetune_backend: pod = fine-tune in one pod with 1 GPU; pytorchjob = a Kubeflow Training Operator PyTorchJob,
                trainjob = a Kubeflow Trainer TrainJob, each with finetune_workers x finetune_gpus_per_worker (DDP).
            finetune_workers: Worker pods of the distributed job (pytorchjob/trainjob only).
            finetune_gpus_per_worker: GPUs (one torchrun process each) per worker pod; 0 = CPU workers (pytorchjob/trainjob only).
            gate_metric: Test metric the gate checks; empty = macro_f1, or entity_micro_f1 for NER (see the README for all).
            gate_threshold: Minimum gate_metric on the test split.
            gate_tolerance: How much worse than the current production model the new one may be.
            onnx_variants: Comma-separated ONNX variants: fp32 (required), optimized, int8 (CPU), fp16 (GPU); each passes a held-out check.
            namespace: Namespace of the rendered KServe InferenceService.
            serving_image: Image of the predictor container in the rendered InferenceService.
            force: Train even when the data equals that of the current production model (else the run is skipped).
            deploy_target: registry (move the production alias), kserve (apply, wait for Ready, else roll back) or gitops (commit for Argo CD).
            canary_traffic_percent: kserve only: share of traffic (1-99) for the new model as a canary; 0 = all traffic.
            gitops_repo: gitops only: Git URL the Argo CD Application watches (credentials from the kubetune-git Secret).
            gitops_branch: gitops only: branch to commit to.
            gitops_path: gitops only: folder in the repository; the manifest is <model_name>.yaml.
        """
        common = {"store": store, "run_id": run_id, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        summary = ops.summarize(**common)
        configure(summary, "summarize", cluster)
        with dsl.ExitHandler(summary, name="train-and-publish"):
            validate = ops.validate(
                **common, task=task, train_uri=train_uri, eval_uri=eval_uri, test_uri=test_uri, text_column=text_column,
                label_column=label_column, header=header, tag_column=tag_column, repair_tags=repair_tags, limit=limit, seed=seed,
                eval_fraction=eval_fraction, test_fraction=test_fraction,
            )
            freshness = ops.freshness(**common, model_name=model_name, force=force, dataset=validate.outputs["dataset"])
            with dsl.If(freshness.outputs["Output"] == True, name="data-changed"):  # noqa: E712 (KFP condition)
                tokenize = ops.tokenize(**common, model_uri=model_uri, max_length=max_length, dataset=validate.outputs["dataset"])
                train_args = {"model_uri": model_uri, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                              "seed": seed, "tokens": tokenize.outputs["tokens"]}

                def gate_export_deploy(model) -> list:
                    """evaluate -> gate -> export -> deploy on `model`. Wired inside each fine-tune
                    branch: kfp.local cannot resolve a dsl.OneOf of the two branches' models."""
                    evaluate = ops.evaluate(**common, model_name=model_name, gate_metric=gate_metric, gate_threshold=gate_threshold,
                                            gate_tolerance=gate_tolerance, model=model,
                                            tokens=tokenize.outputs["tokens"], dataset=validate.outputs["dataset"])
                    with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
                        export = ops.export(**common, onnx_variants=onnx_variants, model=model, tokens=tokenize.outputs["tokens"])
                        deploy = ops.deploy(**common, model_name=model_name, namespace=namespace, serving_image=serving_image,
                                            deploy_target=deploy_target, canary_traffic_percent=canary_traffic_percent,
                                            gitops_repo=gitops_repo, gitops_branch=gitops_branch, gitops_path=gitops_path,
                                            onnx_model=export.outputs["onnx_model"], evaluation=evaluate.outputs["evaluation"])
                    return [("evaluate", evaluate), ("export", export), ("deploy", deploy)]

                with dsl.If(finetune_backend == "pod", name="finetune-in-pod"):
                    finetune = ops.finetune(**common, **train_args)
                    downstream = gate_export_deploy(finetune.outputs["model"])
                with dsl.Else(name="finetune-distributed"):
                    finetune_job = ops.finetune_distributed(**common, **train_args, backend=finetune_backend, workers=finetune_workers,
                                                            gpus_per_worker=finetune_gpus_per_worker, image=cluster.gpu_image)
                    downstream += gate_export_deploy(finetune_job.outputs["model"])
        for step, task in (("validate", validate), ("freshness", freshness), ("tokenize", tokenize), ("finetune", finetune),
                           ("finetune_distributed", finetune_job), *downstream):
            configure(task, step, cluster)

    return training
