"""The compiled KFP v2 IR: checked against a golden file, and parsed into kfp's own PipelineSpec /
PlatformSpec protos to check what a cluster will do with it.

Regenerate the golden file after an intended change:
    KUBETUNE_UPDATE_GOLDEN=1 python -m pytest tests/pipelines/test_pipeline.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from kubetune.pipelines.cli import main
from kubetune.pipelines.config import GIT_SECRET_KEYS, S3_CONFIG_KEYS, S3_SECRET_KEYS
from kubetune.pipelines.training import NETWORK_STEPS, RESUMABLE_STEPS

pytestmark = pytest.mark.slow  # compiles the pipelines: seconds a test

GOLDEN = Path(__file__).parent / "golden" / "kubetune-training.yaml"
STEPS = ("validate-plan", "validate-piece", "validate", "freshness",
         "tokenize-piece", "tokenize", "finetune", "evaluate", "export", "deploy", "summarize")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "kubetune-training.yaml"
    assert main(["compile", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def specs(compiled):
    pipeline_doc, platform_doc = yaml.safe_load_all(compiled.read_text())
    pipeline = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    return pipeline, platform


def all_tasks(pipeline) -> dict:
    """Task name -> PipelineTaskSpec, across the root DAG and nested DAGs (exit handler, condition)."""
    tasks = dict(pipeline.root.dag.tasks)
    for comp in pipeline.components.values():
        if comp.WhichOneof("implementation") == "dag":
            tasks.update(comp.dag.tasks)
    return tasks


def test_matches_golden_file(compiled):
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(compiled.read_text())
    assert compiled.read_text() == GOLDEN.read_text(), "compiled IR changed: review, then KUBETUNE_UPDATE_GOLDEN=1"


def test_resources_gpu_and_images(specs):
    pipeline, _ = specs
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    for step in STEPS:
        res = executors[f"exec-{step}"]["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(res), step
        accelerator = res.get("accelerator")
        if step == "finetune":
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
            assert executors[f"exec-{step}"]["container"]["image"].endswith("-cuda")
        else:
            assert accelerator is None, step
            assert not executors[f"exec-{step}"]["container"]["image"].endswith("-cuda")


def test_retries_caching_and_control_flow(specs):
    pipeline, _ = specs
    tasks = all_tasks(pipeline)
    assert set(STEPS) <= set(tasks)
    for step in STEPS:
        retry = tasks[step].retry_policy.max_retry_count
        assert retry == (3 if step in NETWORK_STEPS + RESUMABLE_STEPS else 0), step
        assert not tasks[step].caching_options.enable_cache, step  # every step writes run records
    # the summary is the exit handler's task: it runs whatever happened inside
    assert tasks["summarize"].trigger_policy.strategy == pipeline_spec_pb2.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED
    assert tasks["summarize"].inputs.parameters["status"].task_final_status.producer_task
    # training sits under the freshness condition (unchanged data: skipped); fine-tune runs in the pod (GPU)
    # or as a distributed job (launcher), each branch followed by its own evaluate -> gate -> export -> deploy
    # (kfp.local cannot resolve a dsl.OneOf of the branches' models)
    conditions = sorted(t.trigger_policy.condition for t in tasks.values() if t.trigger_policy.condition)
    pod = "inputs.parameter_values['pipelinechannel--finetune_backend'] == 'pod'"
    gate = "inputs.parameter_values['pipelinechannel--{}-Output'] == true"
    assert conditions == sorted([f"!({pod})", gate.format("evaluate"), gate.format("evaluate-2"), gate.format("freshness"), pod])
    condition_tasks = sorted(sorted(c.dag.tasks) for name, c in pipeline.components.items() if name.startswith("comp-condition"))
    nested = sorted([t for t in ts if not t.startswith("condition-")] for ts in condition_tasks)
    assert nested == [[], ["deploy", "export"], ["deploy-2", "export-2"], ["evaluate", "finetune"],
                      ["evaluate-2", "finetune-distributed"], ["for-loop-4", "tokenize"]], nested
    # the fan-outs: a piece task per item of the plan (validate-plan's output, validate's token_pieces),
    # the pieces' outputs collected into the merging step's pieces
    for loop, items, piece, step in (("for-loop-2", "validate-plan-Output", "validate-piece", "validate"),
                                     ("for-loop-4", "validate-token_pieces", "tokenize-piece", "tokenize")):
        assert tasks[loop].parameter_iterator.items.input_parameter == f"pipelinechannel--{items}"
        assert sorted(pipeline.components[tasks[loop].component_ref.name].dag.tasks) == [piece]
        assert tasks[step].inputs.parameters["pieces"].task_output_parameter.producer_task == loop
    assert tasks["evaluate"].inputs.artifacts["model"].task_output_artifact.producer_task == "finetune"
    assert tasks["evaluate-2"].inputs.artifacts["model"].task_output_artifact.producer_task == "finetune-distributed"
    for twin in ("evaluate-2", "export-2", "deploy-2"):  # the distributed branch's copies get the same settings
        assert tasks[twin].retry_policy.max_retry_count == tasks[twin[:-2]].retry_policy.max_retry_count


def test_s3_settings_come_from_the_secret_and_configmap(specs):
    _, platform = specs
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    twins = {"exec-finetune-distributed", "exec-evaluate-2", "exec-export-2", "exec-deploy-2"}  # the distributed branch
    assert set(executors) == {f"exec-{s}" for s in STEPS} | twins
    for name, struct in executors.items():
        config = json_format.ParseDict(json_format.MessageToDict(struct), k8s_pb2.KubernetesExecutorConfig())
        secret, *git = config.secret_as_env
        assert secret.secret_name == "kubetune-s3" and not secret.optional
        assert {(k.secret_key, k.env_var) for k in secret.key_to_env} == {(k, k) for k in S3_SECRET_KEYS}
        if name in ("exec-deploy", "exec-deploy-2"):  # the gitops target's credentials, optional for the other targets
            (git,) = git
            assert git.secret_name == "kubetune-git" and git.optional
            assert {k.env_var for k in git.key_to_env} == set(GIT_SECRET_KEYS)
        else:
            assert git == [], name
        (cm,) = config.config_map_as_env
        assert cm.config_map_name == "kubetune-s3-config"
        assert {k.env_var for k in cm.key_to_env} == set(S3_CONFIG_KEYS)
        tolerations = [(t.key, t.operator, t.effect) for t in config.tolerations]  # the launcher needs no GPU
        assert tolerations == ([("nvidia.com/gpu", "Exists", "NoSchedule")] if name == "exec-finetune" else []), name


def test_parameters_are_documented_for_the_ui(specs):
    pipeline, _ = specs
    params = pipeline.root.input_definitions.parameters
    # empty = the task's built-in data, and a registry name derived from the data (validate resolves both)
    assert params["train_uri"].default_value.string_value == "" and "builtin:sms-spam" in params["train_uri"].description
    assert params["model_name"].default_value.string_value == ""
    assert params["gate_threshold"].default_value.number_value == 0.8
    assert params["deploy_target"].default_value.string_value == "registry"
    assert params["force"].default_value.bool_value is False
    undocumented = [name for name, p in params.items() if not p.description]
    assert undocumented == []


def test_compile_overrides(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", "reg.example/kt:2.0", "--store", "s3://ml/kt",
                 "--pipeline-root", "s3://ml/kfp", "--s3-secret", "ml-s3"]) == 0
    pipeline_doc, platform_doc = yaml.safe_load_all(out.read_text())
    assert pipeline_doc["defaultPipelineRoot"] == "s3://ml/kfp"
    assert pipeline_doc["root"]["inputDefinitions"]["parameters"]["store"]["defaultValue"] == "s3://ml/kt"
    images = {k: v["container"]["image"] for k, v in pipeline_doc["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-finetune") == "reg.example/kt:2.0-cuda" and set(images.values()) == {"reg.example/kt:2.0"}
    secrets = {e["secretAsEnv"][0]["secretName"] for e in platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()}
    assert secrets == {"ml-s3"}


def test_distributed_workers_get_the_compiled_s3_settings(tmp_path):
    """Regression: `--s3-secret X` reached every pod but the PyTorchJob/TrainJob workers, which kept
    kubetune-s3. The launcher now passes the compiled Secret and ConfigMap on to the job it renders."""
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--s3-secret", "team-s3", "--s3-config-map", "team-s3-config"]) == 0
    pipeline_doc, _ = yaml.safe_load_all(out.read_text())
    dag = next(c for name, c in pipeline_doc["components"].items() if name.startswith("comp-condition")
               and "finetune-distributed" in c["dag"]["tasks"])["dag"]["tasks"]["finetune-distributed"]
    given = {k: v["runtimeValue"]["constant"] for k, v in dag["inputs"]["parameters"].items() if "runtimeValue" in v}
    assert given["s3_secret"] == "team-s3" and given["s3_config_map"] == "team-s3-config"

    from kubetune.steps.distributed import JobConfig, render

    manifest = render(JobConfig(backend="pytorchjob", s3_secret=given["s3_secret"], s3_config_map=given["s3_config_map"]), "job", "ns",
                      ["torchrun"])
    env_from = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["envFrom"]
    assert env_from == [{"secretRef": {"name": "team-s3"}}, {"configMapRef": {"name": "team-s3-config"}}]


# ---- the batch-inference pipeline ----------------------------------------------------------------

BATCH_GOLDEN = Path(__file__).parent / "golden" / "kubetune-batch-inference.yaml"
BATCH_STEPS = ("batch-plan", "batch-score", "batch-collect")


@pytest.fixture(scope="module")
def batch_compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "kubetune-batch-inference.yaml"
    assert main(["compile", "--pipeline", "batch-inference", "--output", str(out)]) == 0
    return out


def test_batch_pipeline_matches_golden_file(batch_compiled):
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        BATCH_GOLDEN.write_text(batch_compiled.read_text())
    assert batch_compiled.read_text() == BATCH_GOLDEN.read_text(), "compiled IR changed: review, then KUBETUNE_UPDATE_GOLDEN=1"


def test_batch_pipeline_fans_out_over_shards(batch_compiled):
    pipeline_doc, platform_doc = yaml.safe_load_all(batch_compiled.read_text())
    pipeline = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    tasks = all_tasks(pipeline)
    assert set(BATCH_STEPS) <= set(tasks)
    # one score task per shard id the plan returns, at most 8 pods at a time
    loop_name, loop = next((n, t) for n, t in tasks.items() if t.WhichOneof("iterator") == "parameter_iterator")
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--batch-plan-Output"
    assert loop.iterator_policy.parallelism_limit == 8
    loop_dag = pipeline.components[loop.component_ref.name].dag
    assert set(loop_dag.tasks) == {"batch-score"}
    # the collect step gets every shard's output (dsl.Collected) and runs after all of them
    collect = tasks["batch-collect"]
    assert collect.inputs.parameters["shard_ids"].task_output_parameter.producer_task == loop_name
    for step in BATCH_STEPS:
        assert tasks[step].retry_policy.max_retry_count == 3 and not tasks[step].caching_options.enable_cache, step
    params = pipeline.root.input_definitions.parameters
    assert params["model"].default_value.string_value == "models/sms-spam/production"
    assert not [name for name, p in params.items() if not p.description]
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in (*BATCH_STEPS, "batch-retrain")}
    assert all(e["secretAsEnv"][0]["secretName"] == "kubetune-s3" for e in executors.values())
    # drifted is the pipeline's output; the retraining run starts only with retrain_on_drift and a drifted batch
    assert set(pipeline.root.output_definitions.parameters) == {"Output"}
    assert pipeline.root.dag.outputs.parameters["Output"].value_from_parameter.output_parameter_key == "drifted"
    assert params["retrain_on_drift"].default_value.bool_value is False
    conditions = {t.task_info.name: t.trigger_policy.condition for t in tasks.values() if t.trigger_policy.condition}
    assert conditions == {"retrain-on-drift": "inputs.parameter_values['pipelinechannel--retrain_on_drift'] == true",
                          "drifted": "inputs.parameter_values['pipelinechannel--batch-collect-drifted'] == true"}
    assert "batch-retrain" in tasks
