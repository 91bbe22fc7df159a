"""The parameter table of the training pipeline: every parameter declared once, on a config field.

A pipeline parameter is a field declared with `param(default, help, ...)` (kubetune.core.config) on
one of the configs in CONFIGS: the step configs, and RunInputs below for the parameters that belong
to the run rather than a step. From that one declaration come

  - the `kubetune run` flags (`add_run_flags`, `from_args`),
  - the pipeline's signature and docstring (`signature`, `docstring`: kubetune.pipelines.training),
  - the values each KFP wrapper receives (the pipeline body passes every parameter a wrapper names)
    and the configs it builds from them (`config`), and
  - the one check that `run`, `submit` and `schedule` apply before anything runs (`check`).

tests/pipelines/test_parameters.py fails when a wrapper, a config or the compiled pipeline disagrees
with the table. Adding a parameter: declare the field with `param(...)`, name it in the wrapper that
uses it.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from typing import Any, Mapping

from kubetune import tasks
from kubetune.core.config import choices_of, from_params, param, params_of, parse_bool
from kubetune.core.context import DEFAULT_STORE
from kubetune.errors import ConfigError
from kubetune.release.manifests import ServingConfig
from kubetune.release.rollout import DeployConfig
from kubetune.steps.distributed import BACKENDS, JobConfig
from kubetune.steps.evaluate import GateConfig
from kubetune.steps.export import ExportConfig
from kubetune.steps.finetune import FinetuneConfig
from kubetune.steps.tokenize import TokenizeConfig
from kubetune.steps.validate import ValidateConfig

FINETUNE_BACKENDS = ("pod", *BACKENDS)


@dataclass(frozen=True)
class RunInputs:
    """The parameters of the run itself (inputs, names, where records go), not of one step."""

    train_uri: str = param("", "Training data: CSV, TSV, JSONL, Parquet (NER: CoNLL, JSONL) file, folder or s3:// prefix, or "
                               "builtin:; empty = the task's built-in data (builtin:sms-spam, builtin:conll2003, builtin:newsgroups-answers).",
                           flag="--train")
    eval_uri: str = param("", "Optional eval file; empty = split eval_fraction off the training data.", flag="--eval")
    test_uri: str = param("", "Optional test file; empty = split test_fraction off the training data.", flag="--test")
    model_uri: str = param("builtin:all-minilm-l6-v2", "Pretrained transformers model folder (local or s3:// prefix) or "
                                                       "builtin:all-minilm-l6-v2.", flag="--model")
    model_name: str = param("", "Registry name, also the InferenceService name (lowercase, digits, '-'); empty = derived from "
                                "the training data's name.", flag="--name")
    store: str = param(DEFAULT_STORE, "Artifact store for run records, the tokenization cache and the model registry "
                                      "(a local folder or s3://bucket/prefix).")
    run_id: str = param("", "Records go to <store>/runs/<run_id>; empty = the KFP run id (kubetune run: <UTC time>-<random>).")
    force: bool = param(False, "Train even when the data equals that of the current production model (else the run is skipped).")
    finetune_backend: str = param("pod", "pod = fine-tune in one pod with 1 GPU; trainjob = a Kubeflow Trainer TrainJob (its "
                                         "progress and rank 0's log shown in the step's log), pytorchjob = a Kubeflow Training "
                                         "Operator PyTorchJob (legacy), each with finetune_workers x finetune_gpus_per_worker (DDP).",
                                  flag="-", choices=FINETUNE_BACKENDS)


# (config, `kubetune run --help` group): the order is the table's
CONFIGS = (
    (ValidateConfig, "data"), (RunInputs, "run"), (TokenizeConfig, "model and training"), (FinetuneConfig, "model and training"),
    (JobConfig, "distributed fine-tune (cluster only)"), (GateConfig, "quality gate"), (ExportConfig, "ONNX export"),
    (ServingConfig, "serving manifest"), (DeployConfig, "deploy target (see kubetune deploy --help)"),
)


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    help: str
    config: type
    field: str
    group: str
    flag: str  # "" when the parameter has no `kubetune run` flag (cluster-only)
    choices: tuple
    invert: bool

    @property
    def type(self) -> type:
        return type(self.default)


def _table() -> tuple[Parameter, ...]:
    out: dict[str, Parameter] = {}
    for cls, group in CONFIGS:
        for f, p in params_of(cls):
            if not p.declared:
                continue
            if p.name in out:
                raise TypeError(f"pipeline parameter {p.name!r} is declared twice ({out[p.name].config.__name__}, {cls.__name__}); "
                                "declare it once and use shared() elsewhere")
            flag = "" if p.flag == "-" else (p.flag or "--" + p.name.replace("_", "-"))
            out[p.name] = Parameter(p.name, f.default, p.help, cls, f.name, group, flag, choices_of(p), p.invert)
    return tuple(out.values())


TABLE = _table()
BY_NAME = {p.name: p for p in TABLE}


def defaults(**overrides) -> dict[str, Any]:
    """Every parameter's default, with `overrides` (e.g. the compiled pipeline's store)."""
    return {**{p.name: p.default for p in TABLE}, **overrides}


def config(cls, values: Mapping[str, Any], **overrides):
    """`cls` built from parameter values (a wrapper's locals(), or the CLI's): see from_params."""
    return from_params(cls, values, **overrides)


def check(values: Mapping[str, Any]) -> None:
    """The check `kubetune run`, `submit` and `schedule` make before anything runs: every config
    built from the values passes its own check, and the settings fit together (a gate metric the
    task can score, a fine-tune backend that exists). Unknown names are a ConfigError."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown pipeline parameter(s) {', '.join(unknown)}; the pipeline has {', '.join(sorted(BY_NAME))}")
    full = defaults(**values)
    for cls, _ in CONFIGS:
        cfg = config(cls, full)
        if hasattr(cfg, "check"):
            cfg.check()
    tasks.resolve_metric(full["task"], full["gate_metric"], "gate_metric", gate=True)  # e.g. macro_f1 for NER: rejected now, not after training
    supported = tasks.get(full["task"]).truncations
    if full["truncation"] not in supported:
        raise ConfigError(f"truncation={full['truncation']!r}: a {full['task']} model supports {', '.join(supported)}")
    if full["finetune_backend"] not in FINETUNE_BACKENDS:
        raise ConfigError(f"finetune_backend={full['finetune_backend']!r}: use one of {', '.join(FINETUNE_BACKENDS)}")


# ---- the pipeline's signature ---------------------------------------------------------------------


def signature(**default_overrides) -> inspect.Signature:
    """The training pipeline function's signature: one typed, defaulted keyword per parameter."""
    values = defaults(**default_overrides)
    return inspect.Signature([inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[p.name], annotation=p.type)
                              for p in TABLE])


def docstring(summary: str) -> str:
    """The pipeline's docstring: KFP takes each parameter's description in the UI from its Args."""
    return summary + "\n\nArgs:\n" + "".join(f"    {p.name}: {p.help}\n" for p in TABLE)


# ---- `kubetune run` flags ---------------------------------------------------------------------------


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter that has one, grouped as in CONFIGS, typed and defaulted from the table."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for p in TABLE:
        if not p.flag:
            continue
        g = groups.get(p.group) or groups.setdefault(p.group, parser.add_argument_group(p.group))
        dest = {"dest": p.name, "help": p.help.replace("%", "%%")}  # argparse formats help with %
        if p.type is bool and p.default == p.invert:  # a switch: --force sets False -> True, --no-header True -> False
            g.add_argument(p.flag, action="store_false" if p.invert else "store_true", default=p.default, **dest)
        elif p.type is bool:
            g.add_argument(p.flag, type=parse_bool, default=p.default, metavar="BOOL", **dest)
        else:
            g.add_argument(p.flag, type=p.type, default=p.default, **dest, **({"choices": p.choices} if p.choices else {}))


def from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """Parameter values from `kubetune run`'s parsed flags (parameters without a flag: their default)."""
    return {p.name: getattr(ns, p.name) if p.flag else p.default for p in TABLE}

