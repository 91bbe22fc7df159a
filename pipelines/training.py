"""The training pipeline: validate -> freshness -> [data changed] tokenize (each, for large data: pieces in parallel, merged)
-> finetune -> evaluate -> [gate] -> export -> deploy, with a summary written by an exit handler whatever happens.
Pure wiring plus cluster settings: the parameters (names, types, defaults, descriptions) come from kubetune.pipelines.parameters, and each
step gets the parameters its wrapper names.

    kubetune compile --output kubetune-training.yaml     # upload in the Kubeflow UI
    kubetune run                                          # the same pipeline under kfp.local
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as real types
from kfp import dsl, kubernetes

from kubetune.pipelines import parameters
from kubetune.pipelines.components import make_components
from kubetune.pipelines.config import CLUSTER_STORE, GIT_SECRET_KEYS, S3_CONFIG_KEYS, S3_SECRET_KEYS, ClusterConfig

PIPELINE_NAME = "kubetune-training"
# Retried on failure: their work is mostly store I/O (cache, champion download, registry publish).
# Not validate and its pieces: their failures are input errors that a retry only delays (boto3 already
# retries transient S3 errors within a call); not export: deterministic failures.
NETWORK_STEPS = ("validate-plan", "freshness", "tokenize-piece", "tokenize", "evaluate", "deploy", "summarize", "batch-plan", "batch-score",
                 "batch-collect")
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


def inputs(op, params: dict, **wired) -> dict:
    """The arguments of `op`: of the pipeline parameters and the wired inputs (artifacts, earlier
    steps' outputs, compile-time settings; they take precedence), those its wrapper names. Every
    wrapper input must be given (tests/pipelines/test_parameters.py checks the table)."""
    names = {k for k, spec in (op.component_spec.inputs or {}).items() if spec.type != "PipelineTaskFinalStatus"}  # KFP fills that one
    given = {**params, **wired}
    missing = [n for n in names if n not in given]
    if missing:
        raise TypeError(f"{op.name}: no pipeline parameter or wired input for {', '.join(missing)}")
    return {k: v for k, v in given.items() if k in names}


def build_training_pipeline(cluster: ClusterConfig | None = None, default_store: str = CLUSTER_STORE):
    cluster = cluster or ClusterConfig()
    ops = make_components(cluster)

    def training(*args):
        p = dict(zip(signature.parameters, args))
        job = {"job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        summary = ops.summarize(**inputs(ops.summarize, p, **job))
        configure(summary, "summarize", cluster)
        with dsl.ExitHandler(summary, name="train-and-publish"):
            # large data: a split's files are checked by parallel pieces, merged by validate; small data: one piece,
            # "whole", that validate reads itself (kfp.local cannot run an empty ParallelFor)
            plan = ops.validate_plan(**inputs(ops.validate_plan, p, **job))
            with dsl.ParallelFor(plan.output, name="validate-pieces") as piece:
                validate_piece = ops.validate_piece(**inputs(ops.validate_piece, p, **job, piece=piece))
            validate = ops.validate(**inputs(ops.validate, p, **job, pieces=dsl.Collected(validate_piece.output)))
            # the registry name as validate resolved it (given, or derived from the data)
            named = {**job, "model_name": validate.outputs["model_name"], "dataset": validate.outputs["dataset"]}
            freshness = ops.freshness(**inputs(ops.freshness, p, **named))
            with dsl.If(freshness.outputs["Output"] == True, name="data-changed"):  # noqa: E712 (KFP condition)
                # the same for tokenize: the pieces validate planned from the splits' rows (fanout_rows)
                with dsl.ParallelFor(validate.outputs["token_pieces"], name="tokenize-pieces") as token_piece:
                    tokenize_piece = ops.tokenize_piece(**inputs(ops.tokenize_piece, p, **named, piece=token_piece))
                tokenize = ops.tokenize(**inputs(ops.tokenize, p, **named, pieces=dsl.Collected(tokenize_piece.output)))
                data = {**named, "tokens": tokenize.outputs["tokens"]}

                def gate_export_deploy(model) -> list:
                    """evaluate -> gate -> export -> deploy on `model`. Wired inside each fine-tune
                    branch: kfp.local cannot resolve a dsl.OneOf of the two branches' models."""
                    evaluate = ops.evaluate(**inputs(ops.evaluate, p, **data, model=model))
                    with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
                        export = ops.export(**inputs(ops.export, p, **data, model=model))
                        deploy = ops.deploy(**inputs(ops.deploy, p, **named, onnx_model=export.outputs["onnx_model"],
                                                     evaluation=evaluate.outputs["evaluation"]))
                    return [("evaluate", evaluate), ("export", export), ("deploy", deploy)]

                with dsl.If(p["finetune_backend"] == "pod", name="finetune-in-pod"):
                    finetune = ops.finetune(**inputs(ops.finetune, p, **data))
                    downstream = gate_export_deploy(finetune.outputs["model"])
                with dsl.Else(name="finetune-distributed"):
                    # the workers get the same S3 Secret/ConfigMap as every other pod of the run
                    finetune_job = ops.finetune_distributed(**inputs(ops.finetune_distributed, p, **data, image=cluster.gpu_image,
                                                                     s3_secret=cluster.s3_secret, s3_config_map=cluster.s3_config_map))
                    downstream += gate_export_deploy(finetune_job.outputs["model"])
        for step, task in (("validate-plan", plan), ("validate-piece", validate_piece), ("validate", validate), ("freshness", freshness),
                           ("tokenize-piece", tokenize_piece), ("tokenize", tokenize),
                           ("finetune", finetune),
                           ("finetune_distributed", finetune_job), *downstream):
            configure(task, step, cluster)

    signature = parameters.signature(store=default_store, serving_image=cluster.image)
    training.__signature__ = signature
    training.__doc__ = parameters.docstring("Fine-tune, gate, export and publish a text classifier.")
    return dsl.pipeline(training, name=PIPELINE_NAME, pipeline_root=cluster.pipeline_root or None,
                        description="Fine-tune a Hugging Face text or NER classifier, gate it, export it to ONNX and publish it.")
