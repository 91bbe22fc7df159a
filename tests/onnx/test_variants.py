"""ONNX variants (optimized, int8, fp16) of the real fine-tuned model: built, gated on held-out rows,
recorded, and picked by OnnxClassifier."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest

from kubetune.errors import ConfigError, InputError
from kubetune.onnx.model import OnnxClassifier, accepted_variants
from kubetune.onnx.variants import VariantRejected, accept_variants, check_variant, parse_variants
from kubetune.steps.export import ExportConfig
from kubetune.storage.shards import TokenizedSplit, load_split


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_exported_variants_are_real_and_recorded(exported_model):
    variants = accepted_variants(exported_model)
    assert set(variants) == {"fp32", "optimized", "int8"}  # the default ExportConfig.variants
    for name, v in variants.items():
        assert (exported_model / v["file"]).is_file(), name
        assert v["agreement"] >= 0.995 and v["accuracy_drop"] <= 0.005 and v["rows"] > 0, (name, v)
    # the transformer fusions happened (not just a copy of the fp32 graph) and int8 is quantized
    assert ops(exported_model / "model.optimized.onnx")["Attention"] == 6
    int8 = ops(exported_model / "model.int8.onnx")
    assert int8["DynamicQuantizeLinear"] + int8["QAttention"] + int8["MatMulInteger"] > 0
    assert variants["int8"]["size_bytes"] < variants["fp32"]["size_bytes"] / 3
    parity = json.loads((exported_model / "parity.json").read_text())
    assert parity["variants"]["optimized"]["source"] == "torchscript exporter"


def test_classifier_picks_a_variant(exported_model, sms_rows):
    texts = [t for _, t in sms_rows[2000:2040]]
    auto = OnnxClassifier(exported_model)
    assert auto.variant == "optimized"  # the best accepted CPU variant (int8 only on request)
    fp32 = OnnxClassifier(exported_model, variant="fp32")
    want = fp32.predict(texts)
    for name in ("optimized", "int8"):
        got = OnnxClassifier(exported_model, variant=name).predict(texts)
        assert [g["label"] for g in got] == [w["label"] for w in want], name
        assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) < (1e-4 if name == "optimized" else 0.05), name
    with pytest.raises(InputError, match="has no accepted fp16 variant; it has fp32, optimized, int8"):
        OnnxClassifier(exported_model, variant="fp16")
    with pytest.raises(ConfigError, match="ONNX variant 'bf16'"):
        OnnxClassifier(exported_model, variant="bf16")


def test_variant_settings_are_checked():
    assert parse_variants("fp32, int8,int8") == ["fp32", "int8"]
    with pytest.raises(ConfigError, match="unknown int4"):
        parse_variants("fp32,int4")
    with pytest.raises(ConfigError, match="must include fp32"):
        ExportConfig(variants="int8").check()
    with pytest.raises(ConfigError, match="max_accuracy_drop=2"):
        ExportConfig(max_accuracy_drop=2).check()


def test_a_failing_variant_fails_the_step_with_its_numbers(exported_model, small_tokens, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(exported_model, folder)
    split = load_split(small_tokens, "eval")
    clf = OnnxClassifier(folder, variant="int8")
    good = clf.logits(split)
    ok = check_variant("int8", clf, split, good, 0.995, 0.005)
    assert ok["passed"] and ok["agreement"] == 1.0 and ok["accuracy_drop"] == 0.0
    # a torch reference that is right on every row (labels = its argmax) and differs from the graph
    # on one row: agreement and accuracy both fail, and the message names the variant and the numbers
    reference = good.copy()
    reference[0] = reference[0, ::-1]
    truth = TokenizedSplit(split.ids, split.offsets, reference.argmax(-1))
    with pytest.raises(VariantRejected) as err:
        accept_variants(None, [], folder, ["fp32"], truth, reference, device="cpu", min_agreement=0.995, max_accuracy_drop=0.005, work=tmp_path)
    n = len(split)
    assert str(err.value) == (
        f"ONNX variant check failed on the eval split: fp32: argmax agreement {(n - 1) / n:.4f} < 0.995, accuracy {(n - 1) / n:.4f} "
        f"vs torch 1.0000 drops {100 / n:.2f} points > 0.50 ({n} rows); nothing is published")


@pytest.mark.slow
def test_fp16_builds_and_is_checked_on_cpu(exported_model, trained_model, small_tokens, tmp_path):
    """fp16 is for CUDA, but its check also runs on the CPU provider (through casts): a real check
    of the fp16 graph where no GPU exists, with the provider recorded."""
    from transformers import AutoModelForSequenceClassification

    from kubetune.training.modeling import predict_logits

    folder = tmp_path / "onnx"
    shutil.copytree(exported_model, folder)
    meta = json.loads((small_tokens / "meta.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(trained_model).eval()
    split = load_split(small_tokens, "eval")
    import torch

    reference = predict_logits(model, split, batch_size=32, pad_id=meta["pad_token_id"], input_names=meta["model_input_names"],
                               device=torch.device("cpu"))
    result = accept_variants(model, meta["model_input_names"], folder, ["fp32", "fp16"], split, reference, device="cpu",
                             min_agreement=0.995, max_accuracy_drop=0.005, work=tmp_path / "work")
    assert result["fp16"]["fused"]["Attention"] == 6
    graph = onnx.load(str(folder / "model.fp16.onnx"), load_external_data=False).graph
    assert onnx.TensorProto.FLOAT16 in {i.data_type for i in graph.initializer}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers still get float32
    assert result["fp16"]["passed"] and result["fp16"]["provider"] == "CPUExecutionProvider"
    assert 0 < result["fp16"]["max_abs_diff"] < 0.1 and np.isfinite(result["fp16"]["accuracy"])
