"""The one prediction path (kubetune.tasks.predictor): the reference profile evaluate builds on the torch
model sees what serving and batch inference see, and a served request is tokenized once."""

from __future__ import annotations

import asyncio
import json
import shutil

import pandas as pd

from kubetune import tasks
from kubetune.monitoring import profile
from kubetune.onnx.model import OnnxClassifier
from kubetune.steps.evaluate import GateConfig, reference_profile
from kubetune.storage.contracts import ModelInputs, TokensMeta
from kubetune.storage.store import LocalStore
from kubetune.training.modeling import TorchBackend

MAX_LENGTH = 16  # short enough that most SMS are cut, so head and head+tail keep different tokens


def head_tail_folder(exported_model, tmp_path, truncation: str):
    """The exported tiny model with its settings switched to `truncation` at MAX_LENGTH tokens."""
    folder = tmp_path / f"onnx-{truncation}"
    shutil.copytree(exported_model, folder)
    info = json.loads((folder / "kubetune.json").read_text())
    (folder / "kubetune.json").write_text(json.dumps({**info, "truncation": truncation, "max_length": MAX_LENGTH}))
    return folder


def test_a_head_tail_reference_profile_equals_the_serving_paths_profile(exported_model, trained_model, sms_rows, tmp_path):
    from transformers import AutoModelForSequenceClassification

    texts = [t for _, t in sms_rows[1000:1200]]
    served = OnnxClassifier(head_tail_folder(exported_model, tmp_path, "head+tail"), variant="fp32")
    # evaluate's reference profile: the torch model, the tokenize step's meta (truncation head+tail)
    tokens_dir = tmp_path / "tokens"
    shutil.copytree(exported_model, tokens_dir / "tokenizer")
    inputs = ModelInputs(MAX_LENGTH, "head+tail", tuple(served.tokenizer.model_input_names), served.tokenizer.pad_token_id)
    meta = TokensMeta("", "sequence-classification", served.labels, inputs, {}, {})
    backend = TorchBackend(AutoModelForSequenceClassification.from_pretrained(trained_model).eval(), inputs, "cpu")
    frame = pd.DataFrame({"text": texts, "label": [label for label, _ in sms_rows[1000:1200]]})
    reference = reference_profile(tasks.get("sequence-classification"), backend, tokens_dir, meta, frame, GateConfig())

    serving = profile.build(served, texts)  # what serving's request log and batch inference's shard profiles are made of
    assert reference["counts"] == serving["counts"] and reference["counts"]["truncated_rows"] > 50
    assert reference["embedding"] == serving["embedding"]
    assert reference["histograms"]["token_length"] == serving["histograms"]["token_length"]
    assert reference["distributions"]["predicted_label"] == serving["distributions"]["predicted_label"]
    # and the setting matters: the same texts cut at the head give another embedding sample
    head = profile.build(OnnxClassifier(head_tail_folder(exported_model, tmp_path, "head"), variant="fp32"), texts)
    assert head["embedding"] != serving["embedding"]


class CountingTokenizer:
    """A tokenizer that counts its encode calls (attribute reads pass through)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_served_request_is_tokenized_once(exported_model, sms_rows, tmp_path):
    """Prediction, the monitoring metrics and the features-mode request log share one encoding."""
    from prometheus_client import CollectorRegistry

    from kubetune.serving import serve
    from kubetune.serving.requestlog import RequestLog
    from kubetune.serving.serve import ServeConfig

    with serve.kserve_argv():
        from kubetune.serving import server
    cfg = ServeConfig(request_log="features", request_log_rate=1.0)
    registry = CollectorRegistry()
    metrics = server.ServeMetrics("sms-spam", "v1", "t", registry)
    model = server.TextModel("sms-spam", exported_model, "v1", cfg, metrics)
    model.load()
    counting = model.classifier.tokenizer = CountingTokenizer(model.classifier.tokenizer)
    model.request_log = RequestLog(LocalStore(tmp_path / "log"), "sms-spam", "v1", model.classifier, cfg,
                                   (metrics.logged, metrics.log_dropped))
    texts = [t for _, t in sms_rows[:5]]
    answer = asyncio.run(model.predict({"instances": texts}))
    model.request_log.close()

    assert counting.calls == 1
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in OnnxClassifier(exported_model).predict(texts)]
    logged = [json.loads(line) for f in sorted((tmp_path / "log").rglob("*.jsonl")) for line in f.read_text().splitlines()]
    want = [len(ids) for ids in counting.tokenizer(texts, truncation=True, max_length=model.classifier.max_length)["input_ids"]]
    assert [r["features"]["token_length"] for r in logged] == want  # the log's features are the encoding's
    assert registry.get_sample_value("kubetune_serve_input_tokens_sum", {"model_name": "sms-spam"}) == sum(want)
