"""One way to make flags: every config field is a documented flag (add_config_args), and model
references are read by one parser (kubetune.release.registry.parse_ref)."""

from __future__ import annotations

import argparse

import pytest

from kubetune.core.config import add_config_args
from kubetune.errors import InputError
from kubetune.monitoring.drift import Thresholds
from kubetune.pipelines import parameters
from kubetune.release import registry
from kubetune.serving.serve import ServeConfig
from kubetune.steps.batch_infer import BatchConfig
from kubetune.steps.drift import DriftConfig


def test_every_config_flag_has_a_help_text():
    for cls in {c for c, _ in parameters.CONFIGS} | {ServeConfig, BatchConfig, DriftConfig, Thresholds}:
        p = argparse.ArgumentParser()
        add_config_args(p, cls)
        for action in p._actions:
            assert action.help, f"{cls.__name__}: {action.option_strings} has no help"


@pytest.mark.parametrize("text, ref", [
    ("sms-spam", registry.ModelRef("sms-spam", "production")),
    ("sms-spam@canary", registry.ModelRef("sms-spam", "canary")),
    ("sms-spam/v20261201-000000-one", registry.ModelRef("sms-spam", "v20261201-000000-one")),
    ("models/sms-spam/production", registry.ModelRef("sms-spam", "production")),
    ("/models/sms-spam/canary/", registry.ModelRef("sms-spam", "canary")),
    ("./kubetune-store/models/sms-spam/production", registry.ModelRef("sms-spam", "production", "./kubetune-store")),
    ("s3://b/kt/models/sms-spam/staging", registry.ModelRef("sms-spam", "staging", "s3://b/kt")),
])
def test_one_parser_reads_every_model_reference(text, ref):
    assert registry.parse_ref(text) == ref


@pytest.mark.parametrize("text", ["", "Bad Name@v1", "sms-spam@", "a/b/c", "s3://b/kt/exports/m1", "./folder"])
def test_malformed_model_references_are_input_errors(text):
    with pytest.raises(InputError, match="model reference"):
        registry.parse_ref(text)


def test_resolve_refuses_a_reference_with_a_store(tmp_path):
    from kubetune.storage.store import open_store

    with pytest.raises(InputError, match="names a store"):
        registry.resolve(open_store(str(tmp_path)), "./elsewhere/models/sms-spam/production")
