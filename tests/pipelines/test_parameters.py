"""The parameter table (kubetune.pipelines.parameters) against everything derived from it or
written beside it: the config fields, the KFP wrappers, the compiled pipeline, the `kubetune run`
flags, and the one check run/submit/schedule share."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from kubetune import tasks
from kubetune.core.config import params_of
from kubetune.errors import ConfigError
from kubetune.pipelines import components, parameters
from kubetune.pipelines.cli import build_parser, pipeline_arguments
from kubetune.pipelines.config import ClusterConfig

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}
# wrapper inputs that are not pipeline parameters: the KFP job id, artifacts, earlier steps' outputs,
# compile-time settings (ClusterConfig) and the exit handler's status
WIRED = {"job_id", "status", "image", "s3_secret", "s3_config_map"}
TRAINING_WRAPPERS = ("validate", "freshness", "tokenize", "finetune", "finetune_distributed", "evaluate", "export", "deploy", "summarize")


def wrapper_parameters(name: str) -> dict[str, inspect.Parameter]:
    """A wrapper's parameters that are plain values (not Input/Output artifacts)."""
    sig = inspect.signature(getattr(components, name))
    return {k: p for k, p in sig.parameters.items() if p.annotation in KFP_TYPES or k in WIRED}


def test_every_parameter_is_declared_once_and_typed():
    names = [p.name for p in parameters.TABLE]
    assert len(names) == len(set(names))
    for p in parameters.TABLE:
        assert p.help and p.type in KFP_TYPES, p.name
        field = next(f for f in dataclasses.fields(p.config) if f.name == p.field)
        assert field.default == p.default
        if p.choices:
            assert p.default in p.choices, p.name


def test_shared_fields_take_the_declared_default():
    for cls, _ in parameters.CONFIGS:
        for f, p in params_of(cls):
            assert p.name in parameters.BY_NAME, f"{cls.__name__}.{f.name} names an undeclared parameter {p.name!r}"
            assert f.default == parameters.BY_NAME[p.name].default, f"{cls.__name__}.{f.name}"


def test_wrappers_take_only_table_parameters_with_their_types_and_use_them_all():
    used = set()
    for name in TRAINING_WRAPPERS:
        for arg, p in wrapper_parameters(name).items():
            if arg in WIRED:
                continue
            assert arg in parameters.BY_NAME, f"{name}({arg}) is not a pipeline parameter"
            assert p.annotation is parameters.BY_NAME[arg].type, f"{name}({arg}: {p.annotation})"
            used.add(arg)
    assert used == set(parameters.BY_NAME), f"declared but no wrapper takes them: {sorted(set(parameters.BY_NAME) - used)}"


def test_wrappers_build_their_configs_from_the_table():
    """The config a wrapper builds from its arguments (from_params over locals()) carries every value."""
    values = {p.name: p.default for p in parameters.TABLE}
    values.update(epochs=7, gate_metric="accuracy", onnx_variants="fp32", deploy_target="gitops", gitops_repo="x", finetune_workers=3)
    from kubetune.release.rollout import DeployConfig
    from kubetune.steps.distributed import JobConfig
    from kubetune.steps.evaluate import GateConfig
    from kubetune.steps.export import ExportConfig
    from kubetune.steps.finetune import FinetuneConfig

    assert parameters.config(FinetuneConfig, values).epochs == 7
    assert parameters.config(GateConfig, values).metric == "accuracy"
    assert parameters.config(ExportConfig, values).variants == "fp32"
    assert parameters.config(DeployConfig, values).target == "gitops"
    assert parameters.config(JobConfig, values).workers == 3
    for cls, _ in parameters.CONFIGS:  # the defaults give each config its own defaults
        assert parameters.config(cls, parameters.defaults()) == cls()


@pytest.mark.slow
def test_the_compiled_pipeline_has_exactly_the_table(tmp_path):
    from kfp import compiler

    from kubetune.pipelines.training import build_training_pipeline

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_training_pipeline(ClusterConfig(image="r/kubetune:1"), default_store="s3://b/kt"), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert set(spec) == set(parameters.BY_NAME)
    overridden = {"store": "s3://b/kt", "serving_image": "r/kubetune:1"}  # compile-time defaults
    for name, p in parameters.BY_NAME.items():
        assert spec[name]["parameterType"] == KFP_TYPES[p.type], name
        assert spec[name]["description"] == p.help, name
        want = overridden.get(name, p.default)
        got = spec[name].get("defaultValue", None)
        assert got == want or (got is None and want in ("", 0, False)), (name, got, want)


def test_every_command_prints_its_help(capsys):
    for command in ("run", "compile", "upload", "submit", "schedule", "deploy", "rollback", "models", "serve", "infer"):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0, command
        assert "usage: kubetune " + command in capsys.readouterr().out


def test_run_flags_come_from_the_table():
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    flags = {a.dest: a for a in run._actions if a.option_strings}
    for p in parameters.TABLE:
        if not p.flag:
            assert p.name not in flags, p.name
            continue
        action = flags[p.name]
        assert p.flag in action.option_strings and action.default == p.default and action.help % {} == p.help, p.name
    ns = build_parser().parse_args(["run", "--epochs", "3", "--no-header", "--name", "spam-v2", "--gate-metric", "accuracy"])
    args = pipeline_arguments(ns, "/tmp/s", "r1")
    assert set(args) == set(parameters.BY_NAME)
    assert (args["epochs"], args["header"], args["model_name"], args["gate_metric"]) == (3, False, "spam-v2", "accuracy")
    assert args["train_uri"] == tasks.get(args["task"]).default_data  # resolved as validate resolves it


@pytest.mark.parametrize("values, message", [
    ({"task": "token-classification", "gate_metric": "macro_f1"}, "gate_metric='macro_f1' cannot score a token-classification model"),
    ({"deploy_target": "gitops"}, "deploy target gitops needs gitops_repo"),
    ({"canary_traffic_percent": 10}, "needs deploy target kserve"),
    ({"finetune_backend": "slurm"}, "finetune_backend='slurm'"),
    ({"finetune_workers": 0}, "need >= 1 worker"),
    ({"epochs": -1}, "train at least 1 epoch"),
    ({"task": "token-classification", "truncation": "tail"}, "truncation='tail': a token-classification model supports head"),
    ({"truncation": "middle"}, "truncation='middle': use one of head, tail, head\\+tail"),
    ({"onnx_variants": "int8"}, "must include fp32"),
    ({"eval_fraction": 0.5, "test_fraction": 0.5}, "leaves too little to train on"),
    ({"no_such_thing": 1}, "unknown pipeline parameter"),
])
def test_one_check_for_run_submit_and_schedule(values, message):
    with pytest.raises(ConfigError, match=message):
        parameters.check(values)
    assert ConfigError.exit_code == 2


def test_adding_a_parameter_shows_everywhere(monkeypatch):
    """A new field declared with param() is a pipeline parameter, a `run` flag and a docstring line."""
    from kubetune.core.config import param

    @dataclasses.dataclass(frozen=True)
    class Extra:
        dummy_knob: int = param(5, "A dummy parameter.")

    monkeypatch.setattr(parameters, "CONFIGS", (*parameters.CONFIGS, (Extra, "extra")))
    table = parameters._table()
    assert table[-1].name == "dummy_knob" and table[-1].flag == "--dummy-knob" and table[-1].type is int
    monkeypatch.setattr(parameters, "TABLE", table)
    assert "dummy_knob: A dummy parameter." in parameters.docstring("x")
    assert parameters.signature().parameters["dummy_knob"].default == 5
