"""The typed artifact files (kubetune.storage.contracts): what is written reads back equal, and a
missing, unreadable, incomplete or other-format file is one InputError naming the file."""

from __future__ import annotations

import json

import pytest

from kubetune.errors import InputError
from kubetune.storage.contracts import DatasetMeta, ModelInputs, ModelSettings, TokensMeta, read_labels

INPUTS = ModelInputs(max_length=64, truncation="head+tail", input_names=("input_ids", "attention_mask", "token_type_ids"),
                     pad_token_id=0, sep_token_id=102)


def test_each_file_reads_back_what_was_written(tmp_path):
    dataset = DatasetMeta("sequence-classification", ["ham", "spam"], {"train": {"rows": 3, "fingerprint": "ab"}},
                          {"train": "builtin:sms-spam"}, ["eval", "test"], {"seed": 0})
    dataset.write(tmp_path)
    assert DatasetMeta.read(tmp_path) == dataset and read_labels(tmp_path) == ["ham", "spam"]
    assert dataset.fingerprints() == {"train": "ab"}

    tokens = TokensMeta("key", "pair-classification", ["no", "yes"], INPUTS, {"train": "ab"}, {"train": {"rows": 3}})
    tokens.write(tmp_path)
    assert TokensMeta.read(tmp_path) == tokens

    settings = ModelSettings("pair-classification", INPUTS, opset=18, torch="2.x").with_variants({"fp32": {"file": "model.onnx"}}, {})
    settings.write(tmp_path)
    read = ModelSettings.read(tmp_path)
    assert read.inputs.max_length == 64 and read.inputs.truncation == "head+tail" and read.inputs.sep_token_id == 102
    assert read.accepted() == {"fp32": {"file": "model.onnx"}} and read.task == "pair-classification"


def test_a_folder_from_before_the_contracts_still_reads(tmp_path):
    """kubetune.json as export wrote it before "format", truncation and variants existed."""
    (tmp_path / "kubetune.json").write_text(json.dumps({"max_length": 128, "input_names": ["input_ids", "attention_mask"]}))
    old = ModelSettings.read(tmp_path, default_task="sequence-classification")
    assert old.task == "sequence-classification" and old.inputs.truncation == "head" and old.accepted() == {"fp32": {"file": "model.onnx"}}


@pytest.mark.parametrize("content,words", [
    (None, "no kubetune.json; export or download the model again"),
    ("{not json", "kubetune.json: not readable JSON"),
    ("[1, 2]", "kubetune.json: expected a JSON object"),
    (json.dumps({"format": 7, "max_length": 8}), "kubetune.json: format 7, but this kubetune reads format 1"),
    (json.dumps({"task": "sequence-classification"}), "kubetune.json: no max_length"),
])
def test_a_bad_model_settings_file_is_one_error_naming_it(tmp_path, content, words):
    if content is not None:
        (tmp_path / "kubetune.json").write_text(content)
    with pytest.raises(InputError, match=words) as e:
        ModelSettings.read(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_tokens_meta_of_another_shard_format_is_refused(tmp_path):
    tokens = TokensMeta("key", "sequence-classification", ["a", "b"], INPUTS, {}, {}).to_json()
    (tmp_path / "meta.json").write_text(json.dumps({**tokens, "format": 1}))
    with pytest.raises(InputError, match=r"meta.json: format 1, but this kubetune reads format 2; run kubetune.steps.tokenize again"):
        TokensMeta.read(tmp_path)
    with pytest.raises(InputError, match="no meta.json; run kubetune.steps.validate again"):
        DatasetMeta.read(tmp_path / "missing")
