"""`kubetune upload / submit / schedule` with the real kfp.Client against a fake KFP API server
over HTTP (tests/helpers/fake_kfp.py): what reaches the server is what a Kubeflow installation gets."""

from __future__ import annotations

import pytest

from kubetune.pipelines.cli import main
from kubetune.pipelines.training import PIPELINE_NAME
from tests.helpers.fake_kfp import FakeKfp

pytestmark = pytest.mark.slow  # compiles the pipelines and talks to a fake KFP API: seconds a test

COMMON = ["--image", "reg.example/kubetune:1.0", "--store", "s3://ml/kubetune"]


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    with FakeKfp() as fake:
        yield fake


def test_upload_creates_the_pipeline_then_versions(kfp_server, capsys):
    assert main(["upload", "--host", kfp_server.url, *COMMON]) == 0
    (pipeline,) = kfp_server.pipelines.values()
    assert pipeline["display_name"] == PIPELINE_NAME
    spec = kfp_server.versions[pipeline["pipeline_id"]][0]["pipeline_spec"][0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["store"]["defaultValue"] == "s3://ml/kubetune" and all(p.get("description") for p in params.values())
    assert main(["upload", "--host", kfp_server.url, *COMMON, "--version", "v2"]) == 0
    assert [v["display_name"] for v in kfp_server.versions[pipeline["pipeline_id"]]] == [PIPELINE_NAME, "v2"]
    assert "uploaded version v2" in capsys.readouterr().out


def test_submit_creates_a_run_with_typed_parameters(kfp_server):
    args = ["submit", "--host", kfp_server.url, *COMMON, "--experiment", "spam", "--run-name", "try-1",
            "--param", "train_uri=s3://ml/data/sms.csv", "--param", "epochs=3", "--param", "force=true",
            "--param", "gate_threshold=0.9"]
    assert main(args) == 0
    (experiment,) = kfp_server.experiments.values()
    (run,) = kfp_server.runs
    assert experiment["display_name"] == "spam" and run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == "try-1" and run["service_account"] == "kubetune-pipeline-runner"
    assert run["runtime_config"]["parameters"] == {"train_uri": "s3://ml/data/sms.csv", "epochs": 3, "force": True, "gate_threshold": 0.9}
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"reg.example/kubetune:1.0", "reg.example/kubetune:1.0-cuda"}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-finetune"]["secretAsEnv"][0]["secretName"] == "kubetune-s3"  # the cluster settings travel with the run
    assert main(args) == 0 and len(kfp_server.experiments) == 1  # the experiment is reused


def test_schedule_creates_a_recurring_run(kfp_server):
    assert main(["schedule", "--host", kfp_server.url, *COMMON, "--cron", "0 0 3 * * *", "--job-name", "nightly",
                 "--param", "train_uri=s3://ml/data/sms.csv"]) == 0
    (job,) = kfp_server.recurring_runs
    assert job["display_name"] == "nightly" and int(job["max_concurrency"]) == 1 and job["no_catchup"] is True
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}} and job["mode"] == "ENABLE"
    assert job["runtime_config"]["parameters"] == {"train_uri": "s3://ml/data/sms.csv"}
    assert job["experiment_id"] in kfp_server.experiments


@pytest.mark.parametrize("args,message", [
    (["schedule", "--cron", "0 3 * * *"], "KFP expects 6 fields, seconds first"),
    (["submit", "--param", "epoch=3"], "the pipeline has no such parameter"),
    (["submit", "--param", "epochs=three"], "--param epochs='three': expected integer"),
    (["submit", "--param", "force=yes"], "expected boolean"),
    (["schedule", "--cron", "0 0 3 * * *", "--param", "deploy_target=gitops"], "deploy target gitops needs gitops_repo"),
])
def test_bad_arguments_fail_before_reaching_the_server(kfp_server, args, message, capsys):
    assert main([*args, "--host", kfp_server.url]) == 2
    assert message in capsys.readouterr().err
    assert not kfp_server.runs and not kfp_server.recurring_runs


def test_batch_retrain_submits_like_kubetune_submit_from_inside_a_kfp_task(kfp_server, monkeypatch):
    """The batch pipeline's retraining trigger, as its task runs it: kfp in runtime mode (a KFP task
    sets _KFP_RUNTIME=true, where kfp.Client is absent and compiling fails on a circular import)."""
    from kubetune.pipelines.cluster import retrain

    monkeypatch.setenv("_KFP_RUNTIME", "true")
    run_id = retrain(store="s3://ml/kubetune", model_ref="models/sms-spam/production", train_uri="s3://ml/data/fresh.csv",
                     experiment="retrain", host=kfp_server.url, image="reg.example/kubetune:1.0", s3_secret="kubetune-s3",
                     s3_config_map="kubetune-s3-config")
    (run,) = kfp_server.runs
    assert run["run_id"] == run_id and run["runtime_config"]["parameters"] == {"model_name": "sms-spam", "train_uri": "s3://ml/data/fresh.csv"}
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["root"]["inputDefinitions"]["parameters"]["store"]["defaultValue"] == "s3://ml/kubetune"
    assert [e["display_name"] for e in kfp_server.experiments.values()] == ["retrain"]
