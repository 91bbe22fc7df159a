"""KFP components: thin typed wrappers that import a step from kubetune.steps and call it.

KFP ships each wrapper's source into the container, so a wrapper holds nothing but imports and one
call, and its signature is written out. Its parameters are pipeline parameters of the same name
(kubetune.pipelines.parameters: the pipeline passes every parameter a wrapper names) or wired
inputs (artifacts, outputs of earlier steps); `from_params(Config, locals())` builds a step's config
from them. `run_id or job_id`: a local run passes its own id; a run started from the Kubeflow UI
leaves run_id empty and the records go under the KFP run's id.

`make_components(cluster)` turns the wrappers into components with the project's images (decided at
compile time, not import time).
"""

# no `from __future__ import annotations` here: KFP reads the annotations as real types
from types import SimpleNamespace
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from kubetune.pipelines.config import ClusterConfig


def validate_plan(store: str, run_id: str, job_id: str, task: str, train_uri: str, eval_uri: str, test_uri: str, fanout_mb: float) -> List[str]:
    from kubetune.core.config import from_params
    from kubetune.steps.validate import ValidateConfig, plan_step

    return plan_step(store_uri=store, run_id=run_id or job_id, train_uri=train_uri, eval_uri=eval_uri, test_uri=test_uri,
                     cfg=from_params(ValidateConfig, locals()))


def validate_piece(
    store: str, run_id: str, job_id: str, task: str, text_column: str, text_pair_column: str, label_column: str, header: bool,
    fanout_mb: float, piece: str,
) -> str:
    from kubetune.core.config import from_params
    from kubetune.steps.validate import ValidateConfig, piece_step

    return piece_step(store_uri=store, run_id=run_id or job_id, cfg=from_params(ValidateConfig, locals()), piece=piece)


def validate(
    store: str, run_id: str, job_id: str, task: str, train_uri: str, eval_uri: str, test_uri: str, model_name: str, text_column: str,
    text_pair_column: str, label_column: str, choices_column: str, context_column: str, allow_mixed_choices: bool, positive_label: str,
    header: bool, tag_column: int, repair_tags: bool, limit: int, seed: int, eval_fraction: float, test_fraction: float, fanout_mb: float,
    fanout_rows: int, pieces: List[str], dataset: Output[Dataset], report: Output[Markdown], expectations: Output[Artifact],
) -> NamedTuple("Outputs", [("model_name", str), ("token_pieces", List[str])]):
    from collections import namedtuple
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.steps.tokenize import TokenizeConfig, plan_pieces
    from kubetune.steps.validate import ValidateConfig, run_step

    meta = run_step(store_uri=store, run_id=run_id or job_id, train_uri=train_uri, eval_uri=eval_uri, test_uri=test_uri,
                    model_name=model_name, cfg=from_params(ValidateConfig, locals()), dataset_dir=Path(dataset.path),
                    report_path=Path(report.path), expectations_path=Path(expectations.path), pieces=pieces)
    return namedtuple("Outputs", ["model_name", "token_pieces"])(meta["model_name"], plan_pieces(meta, from_params(TokenizeConfig, locals())))


def freshness(store: str, run_id: str, job_id: str, model_name: str, force: bool, dataset: Input[Dataset]) -> bool:
    from pathlib import Path

    from kubetune.steps.freshness import run_step

    return run_step(store_uri=store, run_id=run_id or job_id, model_name=model_name, dataset_dir=Path(dataset.path), force=force)


def tokenize_piece(store: str, run_id: str, job_id: str, model_uri: str, max_length: int, truncation: str, max_unknown_share: float,
                   fail_on_unknown: bool, fanout_rows: int, dataset: Input[Dataset], piece: str) -> str:
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.steps.tokenize import TokenizeConfig, piece_step

    return piece_step(store_uri=store, run_id=run_id or job_id, dataset_dir=Path(dataset.path), model_uri=model_uri, piece=piece,
                      cfg=from_params(TokenizeConfig, locals()))


def tokenize(store: str, run_id: str, job_id: str, model_uri: str, max_length: int, truncation: str, max_unknown_share: float,
             fail_on_unknown: bool, fanout_rows: int, pieces: List[str], dataset: Input[Dataset], tokens: Output[Dataset]):
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.steps.tokenize import TokenizeConfig, run_step

    run_step(store_uri=store, run_id=run_id or job_id, dataset_dir=Path(dataset.path), model_uri=model_uri,
             out_dir=Path(tokens.path), cfg=from_params(TokenizeConfig, locals()), pieces=pieces)


def finetune(store: str, run_id: str, job_id: str, model_uri: str, epochs: int, batch_size: int, learning_rate: float,
             seed: int, keep_checkpoints: bool, tokens: Input[Dataset], model: Output[Model], training_metrics: Output[Metrics]):
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.pipelines.outputs import log_training
    from kubetune.steps.finetune import FinetuneConfig, run_step

    result = run_step(store_uri=store, run_id=run_id or job_id, tokens_dir=Path(tokens.path), model_uri=model_uri,
                      out_dir=Path(model.path), cfg=from_params(FinetuneConfig, locals()))
    log_training(result, training_metrics)


def finetune_distributed(store: str, run_id: str, job_id: str, model_uri: str, epochs: int, batch_size: int,
                         learning_rate: float, seed: int, keep_checkpoints: bool, finetune_backend: str, finetune_workers: int,
                         finetune_gpus_per_worker: int,
                         image: str, s3_secret: str, s3_config_map: str, tokens: Input[Dataset], model: Output[Model],
                         training_metrics: Output[Metrics]):
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.pipelines.outputs import log_training
    from kubetune.steps.distributed import JobConfig, run_step
    from kubetune.steps.finetune import FinetuneConfig

    result = run_step(store_uri=store, run_id=run_id or job_id, tokens_dir=Path(tokens.path), model_uri=model_uri,
                      out_dir=Path(model.path), cfg=from_params(FinetuneConfig, locals()),
                      job=from_params(JobConfig, locals(), backend=finetune_backend, image=image, s3_secret=s3_secret,
                                      s3_config_map=s3_config_map))
    log_training(result, training_metrics)


def evaluate(store: str, run_id: str, job_id: str, model_name: str, gate_metric: str, gate_threshold: float,
             gate_tolerance: float, model: Input[Model], tokens: Input[Dataset], dataset: Input[Dataset],
             evaluation: Output[Artifact], metrics: Output[Metrics], confusion: Output[ClassificationMetrics]) -> bool:
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.pipelines.outputs import log_evaluation
    from kubetune.steps.evaluate import GateConfig, run_step

    result = run_step(store_uri=store, run_id=run_id or job_id, model_dir=Path(model.path), tokens_dir=Path(tokens.path),
                      dataset_dir=Path(dataset.path), model_name=model_name, out_path=Path(evaluation.path),
                      cfg=from_params(GateConfig, locals()))
    return log_evaluation(result, metrics, confusion)


def export(store: str, run_id: str, job_id: str, onnx_variants: str, require_variants: bool, model: Input[Model],
           tokens: Input[Dataset], onnx_model: Output[Model], export_metrics: Output[Metrics]):
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.pipelines.outputs import log_export
    from kubetune.steps.export import ExportConfig, run_step

    result = run_step(store_uri=store, run_id=run_id or job_id, model_dir=Path(model.path), tokens_dir=Path(tokens.path),
                      out_dir=Path(onnx_model.path), out_uri=onnx_model.uri, cfg=from_params(ExportConfig, locals()))
    log_export(result, export_metrics)


def deploy(store: str, run_id: str, job_id: str, model_name: str, namespace: str, serving_image: str, deploy_target: str,
           canary_traffic_percent: int, kserve_mode: str, gitops_repo: str, gitops_branch: str, gitops_path: str,
           onnx_model: Input[Model], evaluation: Input[Artifact], manifest: Output[Artifact], training_report: Output[HTML]) -> str:
    from pathlib import Path

    from kubetune.core.config import from_params
    from kubetune.release.manifests import ServingConfig
    from kubetune.release.rollout import DeployConfig
    from kubetune.steps.deploy import run_step

    result = run_step(store_uri=store, run_id=run_id or job_id, model_name=model_name, onnx_dir=Path(onnx_model.path),
                      evaluation_path=Path(evaluation.path), manifest_path=Path(manifest.path),
                      cfg=from_params(ServingConfig, locals()), target=from_params(DeployConfig, locals()),
                      report_path=Path(training_report.path))
    return result["model_uri"]


def summarize(store: str, run_id: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    from kubetune.steps.summary import run_step

    run_step(store_uri=store, run_id=run_id or job_id, pipeline_state=status.state)


def batch_plan(store: str, model: str, input_uri: str, output_uri: str, text_column: str, text_pair_column: str, choices_column: str,
               context_column: str, id_column: str, variant: str, shard_rows: int, batch_size: int, max_chars: int) -> List[str]:
    from kubetune.steps.batch_infer import BatchConfig, plan_step

    return plan_step(store_uri=store, model_ref=model, input_uri=input_uri, output_uri=output_uri,
                     cfg=BatchConfig(text_column=text_column, text_pair_column=text_pair_column, choices_column=choices_column,
                                     context_column=context_column, id_column=id_column, variant=variant, shard_rows=shard_rows,
                                     batch_size=batch_size, max_chars=max_chars))


def batch_score(output_uri: str, shard_id: str) -> str:
    from kubetune.steps.batch_infer import score_step

    return score_step(output_uri=output_uri, shard_id=shard_id)


def batch_collect(output_uri: str, shard_ids: List[str], drift_report: Output[HTML],
                  drift_metrics: Output[Metrics]) -> NamedTuple("Outputs", [("manifest", str), ("drifted", bool)]):
    from collections import namedtuple
    from pathlib import Path

    from kubetune.steps.batch_infer import collect_step

    manifest, drifted = collect_step(output_uri=output_uri, html_path=Path(drift_report.path), log_metric=drift_metrics.log_metric)
    return namedtuple("Outputs", ["manifest", "drifted"])(manifest, drifted)


def batch_retrain(store: str, model: str, retrain_train_uri: str, retrain_experiment: str, kfp_host: str, image: str,
                  s3_secret: str, s3_config_map: str) -> str:
    from kubetune.pipelines.cluster import retrain

    return retrain(store=store, model_ref=model, train_uri=retrain_train_uri, experiment=retrain_experiment, host=kfp_host,
                   image=image, s3_secret=s3_secret, s3_config_map=s3_config_map)


def make_components(cluster: ClusterConfig) -> SimpleNamespace:
    def cpu(fn):
        return dsl.component(fn, base_image=cluster.image, install_kfp_package=False)

    return SimpleNamespace(
        validate_plan=cpu(validate_plan), validate_piece=cpu(validate_piece), validate=cpu(validate),
        freshness=cpu(freshness), tokenize_piece=cpu(tokenize_piece), tokenize=cpu(tokenize),
        finetune=dsl.component(finetune, base_image=cluster.gpu_image, install_kfp_package=False),
        finetune_distributed=cpu(finetune_distributed),
        evaluate=cpu(evaluate), export=cpu(export), deploy=cpu(deploy), summarize=cpu(summarize),
        batch_plan=cpu(batch_plan), batch_score=cpu(batch_score), batch_collect=cpu(batch_collect), batch_retrain=cpu(batch_retrain),
    )
