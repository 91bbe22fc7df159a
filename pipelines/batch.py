"""The batch-inference pipeline: plan shards -> score each shard in its own pod (dsl.ParallelFor) ->
collect one manifest and the drift report (output `drifted`) -> with retrain_on_drift, a training
run when it drifted. Pure wiring; the work is kubetune.steps.batch_infer.

    kubetune compile --pipeline batch-inference --output kubetune-batch-inference.yaml   # upload in the Kubeflow UI
    kubetune infer --model models/sms-spam/production --input DIR --output DIR          # the same steps, in one process

Shard tasks are idempotent (a committed shard is skipped), so they are retried like the other
store-heavy steps, and re-running the whole pipeline with the same output prefix resumes it.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's annotations as real types
from kfp import dsl

from kubetune.pipelines.components import make_components
from kubetune.pipelines.config import CLUSTER_STORE, ClusterConfig
from kubetune.pipelines.training import configure
from kubetune.steps.batch_infer import BatchConfig

PIPELINE_NAME = "kubetune-batch-inference"


def build_batch_pipeline(cluster: ClusterConfig | None = None, default_store: str = CLUSTER_STORE):
    cluster = cluster or ClusterConfig()
    ops = make_components(cluster)

    @dsl.pipeline(name=PIPELINE_NAME, description="Score every CSV/JSONL/Parquet file under a prefix with a registry model, in parallel shards.",
                  pipeline_root=cluster.pipeline_root or None)
    def batch_inference(
        input_uri: str,
        output_uri: str,
        model: str = "models/sms-spam/production",
        store: str = default_store,
        text_column: str = BatchConfig.text_column,
        text_pair_column: str = BatchConfig.text_pair_column,
        choices_column: str = BatchConfig.choices_column,
        context_column: str = BatchConfig.context_column,
        id_column: str = BatchConfig.id_column,
        variant: str = BatchConfig.variant,
        shard_rows: int = BatchConfig.shard_rows,
        batch_size: int = BatchConfig.batch_size,
        max_chars: int = BatchConfig.max_chars,
        retrain_on_drift: bool = False,
        retrain_train_uri: str = "",
        retrain_experiment: str = "kubetune",
        kfp_host: str = "",
    ) -> bool:
        """Batch ONNX inference over files in S3-compatible storage.

        Args:
            input_uri: A file or s3:// prefix; every .csv, .tsv, .jsonl and .parquet file under it is scored.
            output_uri: s3:// prefix for shards/<id>/predictions.parquet, rejects, plan.json, manifest.json; reuse it to resume.
            model: Registry model: models/<name>/<alias or version>, or <name> for its production alias.
            store: The store holding the model registry (s3://bucket/prefix).
            text_column: Column (JSONL: field) holding the text (multiple choice: the question; default: text, else question).
            text_pair_column: Pair classifiers: column (field) holding each row's second text; empty for single-text models.
            choices_column: Multiple-choice models: column (field) with each question's choices (CSV: a JSON list), else choice_0 .. choice_N columns.
            context_column: Multiple-choice models: optional column (field) with a passage shared by the choices; empty = none.
            id_column: Column (field) with the row id copied to the predictions; empty = <file>:<row>.
            variant: ONNX variant: auto (optimized > fp32 on CPU), int8 (fastest on CPU; scores vary slightly by batch), fp32, optimized.
            shard_rows: Rows per shard; each shard is one pod and one atomic commit.
            batch_size: Rows per ONNX Runtime batch (rows are sorted by length first).
            max_chars: Longer texts (characters) are rejected; texts over the model's max_length tokens are truncated and flagged.
            retrain_on_drift: When the batch's drift report (output_uri/drift.json) says drifted, start a training-pipeline run.
            retrain_train_uri: Training data of that run (its train_uri); empty = the training pipeline's default.
            retrain_experiment: Experiment of the retraining run.
            kfp_host: KFP API endpoint for the retraining run; empty = the in-cluster API (the pod's ServiceAccount token).

        Returns:
            drifted: Whether the batch drifted from the model version's reference profile (false when it has none).
        """
        plan = ops.batch_plan(store=store, model=model, input_uri=input_uri, output_uri=output_uri, text_column=text_column,
                              text_pair_column=text_pair_column, choices_column=choices_column, context_column=context_column,
                              id_column=id_column, variant=variant, shard_rows=shard_rows,
                              batch_size=batch_size, max_chars=max_chars)
        configure(plan, "batch-plan", cluster)
        with dsl.ParallelFor(plan.output, parallelism=cluster.batch_parallelism, name="shards") as shard_id:
            score = ops.batch_score(output_uri=output_uri, shard_id=shard_id)
            configure(score, "batch-score", cluster)
        collect = ops.batch_collect(output_uri=output_uri, shard_ids=dsl.Collected(score.output))
        configure(collect, "batch-collect", cluster)
        with dsl.If(retrain_on_drift == True, name="retrain-on-drift"):  # noqa: E712 (a KFP condition, not a Python test)
            with dsl.If(collect.outputs["drifted"] == True, name="drifted"):  # noqa: E712
                retrain = ops.batch_retrain(store=store, model=model, retrain_train_uri=retrain_train_uri,
                                            retrain_experiment=retrain_experiment, kfp_host=kfp_host, image=cluster.image,
                                            s3_secret=cluster.s3_secret, s3_config_map=cluster.s3_config_map)
                configure(retrain, "batch-retrain", cluster)
        return collect.outputs["drifted"]

    return batch_inference
